//! Arbitrary bytes as an embedding request body: parsing must answer with a request or a 400 whose body is
//! OpenAI's error JSON and whose message quotes no more than an excerpt of the body, and never panic.
#![no_main]

use embedding_server::server::api::parse_embed_request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    match parse_embed_request(body) {
        Ok(request) => {
            // An accepted request is one the handlers can act on.
            assert!(!request.inputs.is_empty());
            assert!(request.dimensions.is_none_or(|d| d > 0));
        }
        Err(error) => {
            assert_eq!(error.status, 400, "{}", error.message);
            let parsed: serde_json::Value =
                serde_json::from_str(&error.body()).expect("the error body is JSON");
            assert_eq!(parsed["error"]["message"], error.message.as_str());
            // Messages name what is wrong; they never repeat the client's data wholesale.
            assert!(error.message.chars().count() <= 200, "{}", error.message);
        }
    }
});
