//! The page at `GET /`: one hand-written HTML file, `assets/ui/index.html`, with its CSS and JavaScript
//! inline and compiled in, so it works on a machine with no network. It is served with a
//! Content-Security-Policy that allows exactly that inline code (by its SHA-256) and requests to this
//! server only. The page is a client of the public API like any other: it adds nothing the API lacks.

use sha2::{Digest, Sha256};

use super::api::base64_into;
use super::routes::Outgoing;

/// The page, as written.
const HTML: &str = include_str!("../../assets/ui/index.html");

/// The page and its policy, computed once at start.
pub struct Page {
    policy: String,
}

impl Page {
    pub fn new() -> Page {
        Page {
            policy: policy(HTML),
        }
    }

    pub fn answer(&self) -> Outgoing {
        Outgoing {
            status: 200,
            content_type: "text/html; charset=utf-8",
            body: HTML.to_string(),
            headers: vec![
                ("Content-Security-Policy", self.policy.clone()),
                ("X-Content-Type-Options", "nosniff".to_string()),
                ("Referrer-Policy", "no-referrer".to_string()),
                // A new binary may bring a new page: browsers revalidate instead of showing a stale one.
                ("Cache-Control", "no-cache".to_string()),
            ],
            inputs: 0,
            tokens: 0,
        }
    }
}

/// Nothing is allowed but the page's own inline `<script>` and `<style>` blocks (by hash), calls back to
/// this origin, and `data:` images (the icon is inline). Inline event handlers and `style` attributes are
/// refused, so the page sets styles through the DOM.
fn policy(html: &str) -> String {
    let hashes = |tag: &str| {
        inline_blocks(html, tag)
            .iter()
            .map(|code| {
                let mut hash = String::new();
                base64_into(&mut hash, &Sha256::digest(code.as_bytes()));
                format!("'sha256-{hash}'")
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hashes("script"),
        hashes("style")
    )
}

/// The contents of every `<tag>…</tag>` block, exactly as the browser hashes them. The page writes its
/// blocks without attributes; a unit test keeps it that way.
fn inline_blocks<'a>(html: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut blocks = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find(&open) {
        let body = &rest[start + open.len()..];
        let Some(end) = body.find(&close) else { break };
        blocks.push(&body[..end]);
        rest = &body[end + close.len()..];
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_hashes_every_inline_block_and_the_page_has_no_other_inline_code() {
        for tag in ["script", "style"] {
            let opened = HTML.matches(&format!("<{tag}")).count();
            assert!(opened >= 1, "the page has no <{tag}>");
            assert_eq!(
                inline_blocks(HTML, tag).len(),
                opened,
                "every <{tag}> is written bare, so that its hash is in the policy"
            );
        }
        let lower = HTML.to_ascii_lowercase();
        assert!(
            !lower.contains(" style="),
            "style attributes break the policy"
        );
        assert!(
            !lower.contains("javascript:"),
            "javascript: URLs break the policy"
        );
        for handler in [
            " onclick=",
            " onload=",
            " onsubmit=",
            " oninput=",
            " onchange=",
        ] {
            assert!(
                !lower.contains(handler),
                "{handler} handlers break the policy"
            );
        }
        let policy = policy(HTML);
        let blocks = inline_blocks(HTML, "script").len() + inline_blocks(HTML, "style").len();
        assert_eq!(policy.matches("'sha256-").count(), blocks, "{policy}");
        assert!(!policy.contains("unsafe"), "{policy}");
    }

    #[test]
    fn blocks_are_found_exactly() {
        let html = "<style>a{}</style><p>x</p><script>1</script><script>2</script>";
        assert_eq!(inline_blocks(html, "script"), ["1", "2"]);
        assert_eq!(inline_blocks(html, "style"), ["a{}"]);
    }
}
