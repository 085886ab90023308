//! API keys: `Authorization: Bearer <key>` on every route but /health, the page at `GET /` (which holds
//! no data; it asks for the key when the API answers 401; `POST /` embeds and needs the key) and /metrics
//! unless `--metrics-auth`. Keys are compared in constant time and never logged.

use super::errors::ApiError;

pub struct Auth {
    keys: Vec<Vec<u8>>,
    protect_metrics: bool,
}

impl Auth {
    /// `keys` from `--api-key`, plus one key per non-empty line of each `--api-key-file`.
    pub fn new(keys: &[String], files: &[String], protect_metrics: bool) -> Result<Auth, String> {
        let mut all: Vec<Vec<u8>> = keys.iter().map(|k| k.trim().as_bytes().to_vec()).collect();
        for file in files {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read --api-key-file {file}: {e}"))?;
            all.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(|l| l.as_bytes().to_vec()),
            );
        }
        if all.iter().any(Vec::is_empty) {
            return Err("an API key must not be empty".into());
        }
        Ok(Auth {
            keys: all,
            protect_metrics,
        })
    }

    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Checks the request's Authorization header for `method` on `path`.
    pub fn check(
        &self,
        method: &str,
        path: &str,
        authorization: Option<&str>,
    ) -> Result<(), ApiError> {
        let public = path == "/health"
            || (path == "/" && method == "GET")
            || (!self.protect_metrics && (path == "/metrics" || path == "/metrics/"));
        if !self.enabled() || public {
            return Ok(());
        }
        let presented = authorization
            .and_then(|v| {
                v.trim()
                    .strip_prefix("Bearer ")
                    .or_else(|| v.trim().strip_prefix("bearer "))
            })
            .map(str::trim)
            .unwrap_or("");
        // Every key is compared, so the time taken says nothing about which key came close.
        let matched = self.keys.iter().fold(false, |found, key| {
            found | constant_time_eq(key, presented.as_bytes())
        });
        if matched {
            Ok(())
        } else {
            Err(ApiError::unauthorized(if presented.is_empty() {
                "This server requires an API key: send Authorization: Bearer <key>."
            } else {
                "The API key is not valid."
            }))
        }
    }
}

/// Equal-length inputs take the same time whatever their content; a length mismatch only reveals the length.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_guard_everything_but_health_the_page_and_by_default_metrics() {
        let auth = Auth::new(&["k1".into(), "k2".into()], &[], false).unwrap();
        assert!(auth
            .check("POST", "/v1/embeddings", Some("Bearer k2"))
            .is_ok());
        assert_eq!(
            auth.check("POST", "/v1/embeddings", Some("Bearer k3"))
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(
            auth.check("GET", "/v1/models", None).unwrap_err().status,
            401
        );
        assert!(auth.check("GET", "/health", None).is_ok());
        assert!(auth.check("GET", "/", None).is_ok());
        // POST / is text-embeddings-inference's embed, not the page.
        assert_eq!(auth.check("POST", "/", None).unwrap_err().status, 401);
        assert_eq!(
            auth.check("GET", "/index.html", None).unwrap_err().status,
            401
        );
        assert!(auth.check("GET", "/metrics", None).is_ok());
        let strict = Auth::new(&["k1".into()], &[], true).unwrap();
        assert_eq!(
            strict.check("GET", "/metrics", None).unwrap_err().status,
            401
        );
        assert!(Auth::new(&[], &[], false)
            .unwrap()
            .check("GET", "/v1/models", None)
            .is_ok());
    }
}
