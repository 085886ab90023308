//! Other APIs' dialects, so that the clients people already have work by changing one URL: Ollama's,
//! Cohere's (v2) and text-embeddings-inference's. Each module is a thin translation from its API's request
//! into the one embedding pipeline (`pipeline::EmbedJob`) and from the pipeline's answer, or its
//! [`ApiError`], into that API's response and error shapes. The engine, queue, limits, metrics and API keys
//! are the same for every dialect.

pub mod cohere;
pub mod ollama;
pub mod tei;

use super::errors::ApiError;

/// Whose error body a route writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    /// `{"error": {"message", "type", "param", "code"}}`: OpenAI's routes and the original's.
    OpenAi,
    /// `{"error": "…"}`.
    Ollama,
    /// `{"message": "…"}`.
    Cohere,
    /// `{"error": "…", "error_type": "Validation"}`, with text-embeddings-inference's statuses.
    Tei,
}

impl ErrorShape {
    /// The status and body of `error` in this shape.
    pub fn render(self, error: &ApiError) -> (u16, String) {
        match self {
            ErrorShape::OpenAi => (error.status, error.body()),
            ErrorShape::Ollama => ollama::error(error),
            ErrorShape::Cohere => cohere::error(error),
            ErrorShape::Tei => tei::error(error),
        }
    }
}
