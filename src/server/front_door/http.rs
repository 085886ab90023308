//! HTTP/1.x framing for the front door: where a client's request ends (its head, then a Content-Length or
//! chunked body), the request handed on to tiny_http, and where tiny_http's answer ends. httparse parses
//! request heads, response heads and chunk sizes; this module decides boundaries and rewrites the
//! hop-by-hop headers, which belong to each connection rather than to the request.
//!
//! What tiny_http receives is always the same simple form: its request line, the client's end-to-end
//! headers (ASCII only, which is all tiny_http can hold), a `Content-Length` and the whole body,
//! de-chunked. It never sees `Connection`, `Expect` or `Transfer-Encoding`, so it keeps every internal
//! connection open and never waits on a slow client.

use std::time::Instant;

/// The largest request head (request line and headers) the door reads before answering 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most header lines a request may have; more is answered 431.
pub const MAX_HEADERS: usize = 128;
/// Marks the requests of the server's own probe; the door removes it from every client's request.
pub const PROBE_HEADER: &str = "X-Embedding-Server-Probe";
/// The longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;

/// Headers that describe one connection, not the request: the door speaks them with each side itself.
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "content-length",
    "x-embedding-server-probe",
];

/// Why the door answers a request itself rather than handing it on.
#[derive(Debug, PartialEq)]
pub enum Refusal {
    /// Not HTTP/1.x as tiny_http can read it (400); the message says what is wrong.
    Malformed(String),
    /// A head over [`MAX_HEAD_BYTES`] or with more than [`MAX_HEADERS`] lines (431).
    HeadTooLarge,
    /// A body over the limit (413).
    BodyTooLarge,
}

/// A whole request, ready for tiny_http.
#[derive(Debug)]
pub struct Request {
    /// The request as tiny_http gets it: head and whole body.
    pub bytes: Vec<u8>,
    pub method: String,
    /// Whether the client keeps the connection open after the answer.
    pub keep_alive: bool,
    /// HTTP/1.0: an open connection must be announced with `Connection: keep-alive`.
    pub http10: bool,
}

impl Request {
    /// Whether the answer carries no body whatever its headers say.
    pub fn head_only(&self) -> bool {
        self.method == "HEAD"
    }
}

/// What the bytes so far amount to.
#[derive(Debug)]
pub enum Progress {
    NeedMore,
    Complete(Request),
    Refused(Refusal),
}

/// The parts of a parsed head the body and the forwarded request need.
#[derive(Debug)]
struct Head {
    /// Request line and end-to-end headers, CRLF-terminated, without the blank line.
    forwarded: Vec<u8>,
    method: String,
    target: String,
    keep_alive: bool,
    http10: bool,
    /// `Expect: 100-continue`: the client waits for a go-ahead before sending its body.
    expects_continue: bool,
    body: BodyKind,
}

#[derive(Debug, Clone, Copy)]
enum BodyKind {
    Length(u64),
    Chunked,
}

/// Follows one client connection's requests as their bytes arrive; one request at a time.
#[derive(Debug, Default)]
pub struct RequestFramer {
    /// How far the buffer has been searched for the end of the head.
    scanned: usize,
    head: Option<Head>,
    chunked: Chunked,
    /// The de-chunked body so far.
    body: Vec<u8>,
    /// When the current head's first byte arrived.
    pub head_started: Option<Instant>,
    /// When the current head was complete (the body's clock).
    pub body_started: Option<Instant>,
    /// Set when the client expects `100 Continue` before it sends its body; the door clears it.
    pub wants_continue: bool,
}

impl RequestFramer {
    /// Whether a request is partly read (its head begun or its body under way).
    pub fn in_progress(&self) -> bool {
        self.head_started.is_some()
    }

    /// The current request's method and target, once its head is read.
    pub fn current(&self) -> Option<(&str, &str)> {
        self.head
            .as_ref()
            .map(|h| (h.method.as_str(), h.target.as_str()))
    }

    /// Bytes held here (the de-chunked body), for the door's buffer bound.
    pub fn buffered(&self) -> usize {
        self.body.len()
    }

    /// Takes what it can of `input` (removing the bytes it consumes) towards the current request.
    pub fn advance(&mut self, input: &mut Vec<u8>, max_body: u64, probe: bool) -> Progress {
        if self.head.is_none() {
            if self.head_started.is_none() {
                // Empty lines between requests are allowed (RFC 9112 §2.2); they start no clock.
                let blank = input
                    .iter()
                    .take_while(|&&b| b == b'\r' || b == b'\n')
                    .count();
                input.drain(..blank);
                if input.is_empty() {
                    return Progress::NeedMore;
                }
                self.head_started = Some(Instant::now());
            }
            let Some(end) = self.find_head_end(input) else {
                if input.len() > MAX_HEAD_BYTES {
                    return Progress::Refused(Refusal::HeadTooLarge);
                }
                return Progress::NeedMore;
            };
            if end > MAX_HEAD_BYTES {
                return Progress::Refused(Refusal::HeadTooLarge);
            }
            let head = match parse_head(&input[..end]) {
                Ok(head) => head,
                Err(refusal) => return Progress::Refused(refusal),
            };
            input.drain(..end);
            self.body_started = Some(Instant::now());
            // A client that waits for `100 Continue` has sent nothing of its body yet.
            let has_body = !matches!(head.body, BodyKind::Length(0));
            let too_large = matches!(head.body, BodyKind::Length(n) if n > max_body);
            self.wants_continue =
                head.expects_continue && has_body && input.is_empty() && !too_large;
            self.head = Some(head);
            if too_large {
                return Progress::Refused(Refusal::BodyTooLarge);
            }
        }
        let Some(head) = &self.head else {
            return Progress::NeedMore;
        };
        let body = match head.body {
            BodyKind::Length(n) => {
                let n = n as usize;
                if input.len() < n {
                    return Progress::NeedMore;
                }
                input.drain(..n).collect()
            }
            BodyKind::Chunked => {
                let body = &mut self.body;
                let fed = self
                    .chunked
                    .feed(input, &mut |data| body.extend_from_slice(data));
                let (used, done) = match fed {
                    Ok(fed) => fed,
                    Err(why) => return Progress::Refused(Refusal::Malformed(why)),
                };
                input.drain(..used);
                if self.body.len() as u64 > max_body {
                    return Progress::Refused(Refusal::BodyTooLarge);
                }
                if !done {
                    return Progress::NeedMore;
                }
                std::mem::take(&mut self.body)
            }
        };
        let head = self.head.take().expect("checked above");
        *self = RequestFramer::default();
        let mut bytes = head.forwarded;
        bytes.reserve(body.len() + 64);
        bytes.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
        if probe {
            bytes.extend_from_slice(format!("{PROBE_HEADER}: 1\r\n").as_bytes());
        }
        if head.http10 {
            // Without it tiny_http would close the internal connection after answering.
            bytes.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        bytes.extend_from_slice(b"\r\n");
        bytes.extend_from_slice(&body);
        Progress::Complete(Request {
            bytes,
            method: head.method,
            keep_alive: head.keep_alive,
            http10: head.http10,
        })
    }

    /// The end of the head (just past its blank line), searching only bytes not searched before.
    fn find_head_end(&mut self, input: &[u8]) -> Option<usize> {
        let from = self.scanned.saturating_sub(2);
        self.scanned = input.len();
        let at = input[from..].iter().position(|&b| b == b'\n')? + from;
        let mut i = at;
        loop {
            // A line feed followed by an empty line ends the head (httparse takes bare LF too).
            match (input.get(i + 1), input.get(i + 2)) {
                (Some(b'\n'), _) => return Some(i + 2),
                (Some(b'\r'), Some(b'\n')) => return Some(i + 3),
                _ => {}
            }
            i = input[i + 1..].iter().position(|&b| b == b'\n')? + i + 1;
        }
    }
}

fn parse_head(bytes: &[u8]) -> Result<Head, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(Refusal::Malformed("The request head is incomplete.".into()))
        }
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadTooLarge),
        Err(e) => {
            return Err(Refusal::Malformed(format!(
                "The request is not valid HTTP/1.1 ({e})."
            )))
        }
    }
    let method = request.method.unwrap_or("GET").to_string();
    let target = request.path.unwrap_or("/").to_string();
    let http10 = request.version == Some(0);
    let mut forwarded = Vec::with_capacity(bytes.len() + 64);
    forwarded.extend_from_slice(
        format!(
            "{method} {target} HTTP/1.{}\r\n",
            request.version.unwrap_or(1)
        )
        .as_bytes(),
    );
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = false;
    let mut keep_alive = false;
    let mut expects_continue = false;
    for header in request.headers.iter() {
        let name = header.name;
        if !header.value.is_ascii() {
            return Err(Refusal::Malformed(format!(
                "The header {} holds bytes that are not ASCII.",
                super::super::errors::excerpt(name)
            )));
        }
        let value = std::str::from_utf8(header.value)
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                let n: u64 = value
                    .parse()
                    .map_err(|_| Refusal::Malformed("Content-Length is not a number.".into()))?;
                if length.is_some_and(|m| m != n) {
                    return Err(Refusal::Malformed(
                        "The request has two different Content-Lengths.".into(),
                    ));
                }
                length = Some(n);
            }
            "transfer-encoding" => {
                if value != "chunked" {
                    return Err(Refusal::Malformed(
                        "Only the chunked Transfer-Encoding is accepted.".into(),
                    ));
                }
                chunked = true;
            }
            "expect" => expects_continue = value == "100-continue",
            "connection" => {
                for token in value.split(',').map(str::trim) {
                    close |= token == "close";
                    keep_alive |= token == "keep-alive";
                }
            }
            lower if HOP_BY_HOP.contains(&lower) => {}
            _ => {
                forwarded.extend_from_slice(name.as_bytes());
                forwarded.extend_from_slice(b": ");
                forwarded.extend_from_slice(header.value.trim_ascii());
                forwarded.extend_from_slice(b"\r\n");
            }
        }
    }
    if chunked && length.is_some() {
        // RFC 9112 §6.1: a request smuggling vector; refuse rather than guess.
        return Err(Refusal::Malformed(
            "The request has both Transfer-Encoding and Content-Length.".into(),
        ));
    }
    Ok(Head {
        forwarded,
        method,
        target,
        keep_alive: if http10 { keep_alive && !close } else { !close },
        http10,
        expects_continue,
        body: if chunked {
            BodyKind::Chunked
        } else {
            BodyKind::Length(length.unwrap_or(0))
        },
    })
}

/// A chunked body (RFC 9112 §7.1) read as it arrives: chunk sizes by httparse, then data, then trailers,
/// which are dropped.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
    /// The partial chunk-size or trailer line.
    line: Vec<u8>,
    /// Trailer bytes so far, held to [`MAX_HEAD_BYTES`].
    trailers: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    /// The CRLF after a chunk's data; how many of its bytes have been seen.
    DataEnd(u8),
    Trailers,
    Done,
}

impl Chunked {
    /// Reads from `input` what belongs to the body, handing chunk data to `data`; returns how many bytes
    /// it took and whether the body is complete (the rest of `input` is the next message's).
    pub fn feed(
        &mut self,
        input: &[u8],
        data: &mut dyn FnMut(&[u8]),
    ) -> Result<(usize, bool), String> {
        let mut at = 0;
        while at < input.len() && self.state != ChunkState::Done {
            match self.state {
                ChunkState::Size | ChunkState::Trailers => {
                    let rest = &input[at..];
                    let (line_end, complete) = match rest.iter().position(|&b| b == b'\n') {
                        Some(i) => (i + 1, true),
                        None => (rest.len(), false),
                    };
                    self.line.extend_from_slice(&rest[..line_end]);
                    at += line_end;
                    if self.state == ChunkState::Size && self.line.len() > MAX_CHUNK_LINE {
                        return Err("A chunk-size line is too long.".into());
                    }
                    if self.state == ChunkState::Trailers {
                        self.trailers += line_end;
                        if self.trailers > MAX_HEAD_BYTES {
                            return Err("The chunked body's trailers are too long.".into());
                        }
                    }
                    if !complete {
                        continue;
                    }
                    let line = std::mem::take(&mut self.line);
                    self.state = if self.state == ChunkState::Trailers {
                        if line == b"\r\n" || line == b"\n" {
                            ChunkState::Done
                        } else {
                            ChunkState::Trailers
                        }
                    } else {
                        let size = match httparse::parse_chunk_size(&line) {
                            Ok(httparse::Status::Complete((_, size)))
                                if line.first().is_some_and(u8::is_ascii_hexdigit) =>
                            {
                                size
                            }
                            _ => return Err("A chunk size is not valid.".into()),
                        };
                        if size == 0 {
                            ChunkState::Trailers
                        } else {
                            ChunkState::Data(size)
                        }
                    };
                }
                ChunkState::Data(left) => {
                    let take = (input.len() - at).min(usize::try_from(left).unwrap_or(usize::MAX));
                    data(&input[at..at + take]);
                    at += take;
                    self.state = match left - take as u64 {
                        0 => ChunkState::DataEnd(0),
                        left => ChunkState::Data(left),
                    };
                }
                ChunkState::DataEnd(seen) => {
                    let expected = b"\r\n"[usize::from(seen)];
                    if input[at] != expected {
                        return Err("A chunk's data is longer than its size.".into());
                    }
                    at += 1;
                    self.state = if seen == 1 {
                        ChunkState::Size
                    } else {
                        ChunkState::DataEnd(1)
                    };
                }
                ChunkState::Done => {}
            }
        }
        Ok((at, self.state == ChunkState::Done))
    }
}

/// Follows one of tiny_http's answers on an internal connection, copying it to the client's buffer.
#[derive(Debug)]
pub struct ResponseFramer {
    head_only: bool,
    state: ResponseState,
    /// The partial head.
    head: Vec<u8>,
    chunked: Chunked,
    /// The status of the final (non-1xx) head, once seen.
    pub status: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ResponseState {
    Head,
    Length(u64),
    Chunked,
    /// No length: the answer ends when tiny_http closes the connection.
    UntilClose,
    Done,
}

/// What the door adds to an answer's head for the client.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ConnectionHeader {
    None,
    Close,
    KeepAlive,
}

impl ResponseFramer {
    /// For the answer to a request; `head_only` for HEAD, whose answer has no body.
    pub fn new(head_only: bool) -> ResponseFramer {
        ResponseFramer {
            head_only,
            state: ResponseState::Head,
            head: Vec::new(),
            chunked: Chunked::default(),
            status: None,
        }
    }

    pub fn done(&self) -> bool {
        self.state == ResponseState::Done
    }

    /// Whether the answer runs until tiny_http closes the connection.
    pub fn until_close(&self) -> bool {
        self.state == ResponseState::UntilClose
    }

    /// Copies what belongs to the answer from `input` to `out`, adding `connection` to its final head;
    /// returns how many bytes it took. Bytes past the end of the answer are not taken.
    pub fn feed(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        connection: ConnectionHeader,
    ) -> Result<usize, String> {
        let mut at = 0;
        while at < input.len() && self.state != ResponseState::Done {
            match self.state {
                ResponseState::Head => {
                    let before = self.head.len();
                    let rest = &input[at..];
                    self.head.extend_from_slice(rest);
                    let search_from = before.saturating_sub(3);
                    let Some(end) = self.head[search_from..]
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map(|i| search_from + i + 4)
                    else {
                        if self.head.len() > MAX_HEAD_BYTES {
                            return Err("an answer's head is too long".into());
                        }
                        at = input.len();
                        continue;
                    };
                    at += end - before;
                    self.head.truncate(end);
                    let head = std::mem::take(&mut self.head);
                    self.state = self.start_body(&head, out, connection)?;
                }
                ResponseState::Length(left) => {
                    let take = (input.len() - at).min(usize::try_from(left).unwrap_or(usize::MAX));
                    out.extend_from_slice(&input[at..at + take]);
                    at += take;
                    self.state = match left - take as u64 {
                        0 => ResponseState::Done,
                        left => ResponseState::Length(left),
                    };
                }
                ResponseState::Chunked => {
                    let (used, done) = self.chunked.feed(&input[at..], &mut |_| {})?;
                    out.extend_from_slice(&input[at..at + used]);
                    at += used;
                    if done {
                        self.state = ResponseState::Done;
                    }
                }
                ResponseState::UntilClose => {
                    out.extend_from_slice(&input[at..]);
                    at = input.len();
                }
                ResponseState::Done => {}
            }
        }
        Ok(at)
    }

    /// Writes a complete head to `out` and says how its body is framed.
    fn start_body(
        &mut self,
        head: &[u8],
        out: &mut Vec<u8>,
        connection: ConnectionHeader,
    ) -> Result<ResponseState, String> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            other => return Err(format!("an answer's head does not parse: {other:?}")),
        }
        let status = response.code.unwrap_or(500);
        if (100..200).contains(&status) {
            // Informational: passed on as is; the real answer follows.
            out.extend_from_slice(head);
            return Ok(ResponseState::Head);
        }
        self.status = Some(status);
        let mut length = None;
        let mut chunked = false;
        for header in response.headers.iter() {
            if header.name.eq_ignore_ascii_case("content-length") {
                length = std::str::from_utf8(header.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
            } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = header.value.eq_ignore_ascii_case(b"chunked");
            }
        }
        out.extend_from_slice(&head[..head.len() - 2]);
        match connection {
            ConnectionHeader::None => {}
            ConnectionHeader::Close => out.extend_from_slice(b"Connection: close\r\n"),
            ConnectionHeader::KeepAlive => out.extend_from_slice(b"Connection: keep-alive\r\n"),
        }
        out.extend_from_slice(b"\r\n");
        Ok(if self.head_only || status == 204 || status == 304 {
            ResponseState::Done
        } else if chunked {
            ResponseState::Chunked
        } else {
            match length {
                Some(0) => ResponseState::Done,
                Some(n) => ResponseState::Length(n),
                None => ResponseState::UntilClose,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(framer: &mut RequestFramer, input: &mut Vec<u8>) -> Progress {
        framer.advance(input, 1000, false)
    }

    fn complete(progress: Progress) -> Request {
        match progress {
            Progress::Complete(request) => request,
            other => panic!("not complete: {other:?}"),
        }
    }

    #[test]
    fn a_request_arriving_in_pieces_is_forwarded_whole_with_hop_by_hop_headers_replaced() {
        let mut framer = RequestFramer::default();
        let mut input = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nExpect: 100-continue\r\nContent-Length: 5\r".to_vec();
        assert!(matches!(frame(&mut framer, &mut input), Progress::NeedMore));
        assert!(framer.in_progress());
        input.extend_from_slice(b"\n\r\nab");
        assert!(matches!(frame(&mut framer, &mut input), Progress::NeedMore));
        assert!(framer.body_started.is_some());
        assert!(!framer.wants_continue, "the body is already coming");
        input.extend_from_slice(b"cdeGET /next HTTP/1.1\r\n");
        let request = complete(frame(&mut framer, &mut input));
        assert_eq!(
            String::from_utf8(request.bytes).unwrap(),
            "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde"
        );
        assert!(request.keep_alive && !request.http10);
        assert_eq!(input, b"GET /next HTTP/1.1\r\n", "the next request stays");
        assert!(!framer.in_progress());
    }

    #[test]
    fn a_client_that_expects_100_continue_is_told_to_go_on() {
        let mut framer = RequestFramer::default();
        let mut input =
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n".to_vec();
        assert!(matches!(frame(&mut framer, &mut input), Progress::NeedMore));
        assert!(framer.wants_continue);
        framer.wants_continue = false;
        input.extend_from_slice(b"ok");
        let request = complete(frame(&mut framer, &mut input));
        assert!(!String::from_utf8_lossy(&request.bytes).contains("Expect"));
    }

    #[test]
    fn pipelined_requests_come_out_one_at_a_time() {
        let mut framer = RequestFramer::default();
        let mut input =
            b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /c HTTP/1.0\r\n\r\n"
                .to_vec();
        let a = complete(frame(&mut framer, &mut input));
        assert!(a.bytes.starts_with(b"GET /a HTTP/1.1\r\n"));
        let b = complete(frame(&mut framer, &mut input));
        assert!(b.keep_alive && b.http10);
        assert!(String::from_utf8_lossy(&b.bytes).contains("Connection: keep-alive\r\n"));
        let c = complete(frame(&mut framer, &mut input));
        assert!(!c.keep_alive, "HTTP/1.0 closes by default");
        assert!(input.is_empty());
        assert!(matches!(frame(&mut framer, &mut input), Progress::NeedMore));
    }

    #[test]
    fn chunked_bodies_are_decoded_and_trailers_dropped() {
        let mut framer = RequestFramer::default();
        let mut input =
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n".to_vec();
        assert!(matches!(frame(&mut framer, &mut input), Progress::NeedMore));
        assert_eq!(framer.buffered(), 3);
        input.extend_from_slice(b"A\r\n0123456789\r\n0\r\nX-Trailer: y\r\n\r\nnext");
        let request = complete(frame(&mut framer, &mut input));
        let text = String::from_utf8(request.bytes).unwrap();
        assert!(
            text.ends_with("Content-Length: 13\r\n\r\nabc0123456789"),
            "{text}"
        );
        assert!(!text.to_ascii_lowercase().contains("transfer-encoding"));
        assert_eq!(input, b"next");
    }

    /// Every way of cutting a stream into pieces frames the same requests as the whole stream.
    #[test]
    fn requests_frame_the_same_however_the_bytes_are_cut() {
        let stream: &[u8] = b"\r\nPOST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.0\nConnection: keep-alive\n\nPOST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\n0123\r\n1\r\n4\r\n0\r\nT: 1\r\n\r\nGET /d HTTP/1.1\r\n\r\n";
        let frame_all = |pieces: &mut dyn Iterator<Item = usize>| {
            let mut framer = RequestFramer::default();
            let mut input = Vec::new();
            let mut out = Vec::new();
            let mut at = 0;
            while at < stream.len() {
                let n = pieces.next().unwrap().clamp(1, stream.len() - at);
                input.extend_from_slice(&stream[at..at + n]);
                at += n;
                loop {
                    match framer.advance(&mut input, 100, false) {
                        Progress::Complete(request) => out.push(request.bytes),
                        Progress::NeedMore => break,
                        Progress::Refused(r) => panic!("refused {r:?}"),
                    }
                }
            }
            out
        };
        let whole = frame_all(&mut std::iter::repeat(stream.len()));
        assert_eq!(whole.len(), 4);
        assert!(String::from_utf8_lossy(&whole[2]).ends_with("Content-Length: 5\r\n\r\n01234"));
        // A simple linear congruential generator: the same cuts every run.
        let mut seed = 12345u64;
        let mut random = std::iter::from_fn(move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            Some((seed >> 33) as usize % 9 + 1)
        });
        for _ in 0..200 {
            assert_eq!(frame_all(&mut random), whole);
        }
        assert_eq!(frame_all(&mut std::iter::repeat(1)), whole);
    }

    #[test]
    fn refusals() {
        let refuse = |bytes: &[u8]| {
            let mut framer = RequestFramer::default();
            match framer.advance(&mut bytes.to_vec(), 10, false) {
                Progress::Refused(r) => r,
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bytes)),
            }
        };
        assert_eq!(
            refuse(b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n"),
            Refusal::BodyTooLarge
        );
        assert_eq!(
            refuse(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nb\r\n01234567890\r\n"),
            Refusal::BodyTooLarge
        );
        for bad in [
            &b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: caf\xc3\xa9\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET /a b HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
        ] {
            assert!(
                matches!(refuse(bad), Refusal::Malformed(_)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        assert_eq!(refuse(&long), Refusal::HeadTooLarge);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(refuse(&many), Refusal::HeadTooLarge);
    }

    #[test]
    fn the_probe_header_comes_only_from_the_door() {
        let mut framer = RequestFramer::default();
        let mut input = b"GET /health HTTP/1.1\r\nX-Embedding-Server-Probe: 1\r\n\r\n".to_vec();
        let forged = complete(framer.advance(&mut input, 10, false));
        assert!(!String::from_utf8_lossy(&forged.bytes).contains("Probe"));
        let mut input = b"GET /health HTTP/1.1\r\n\r\n".to_vec();
        let probe = complete(framer.advance(&mut input, 10, true));
        assert!(String::from_utf8_lossy(&probe.bytes).contains("X-Embedding-Server-Probe: 1"));
    }

    #[test]
    fn answers_are_followed_to_their_end_in_every_framing() {
        let run = |head_only: bool, pieces: &[&[u8]], connection: ConnectionHeader| {
            let mut framer = ResponseFramer::new(head_only);
            let mut out = Vec::new();
            let mut leftover = Vec::new();
            for piece in pieces {
                let used = framer.feed(piece, &mut out, connection).unwrap();
                leftover.extend_from_slice(&piece[used..]);
            }
            (
                framer.done(),
                String::from_utf8(out).unwrap(),
                leftover,
                framer.status,
            )
        };
        let (done, out, rest, status) = run(
            false,
            &[
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r",
                b"\nab",
                b"cdX",
            ],
            ConnectionHeader::Close,
        );
        assert!(done);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcd"
        );
        assert_eq!((rest, status), (b"X".to_vec(), Some(200)));

        let (done, out, _, _) = run(
            false,
            &[
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
                b"lo\r\n0\r\n",
                b"\r\n",
            ],
            ConnectionHeader::None,
        );
        assert!(done);
        assert!(out.ends_with("5\r\nhello\r\n0\r\n\r\n"), "{out}");
        assert!(out.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"));

        let (done, out, _, _) = run(
            true,
            &[b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"],
            ConnectionHeader::KeepAlive,
        );
        assert!(done, "a HEAD answer has no body");
        assert!(out.contains("Connection: keep-alive\r\n"));

        let mut framer = ResponseFramer::new(false);
        let mut out = Vec::new();
        framer
            .feed(
                b"HTTP/1.0 200 OK\r\n\r\nuntil close",
                &mut out,
                ConnectionHeader::None,
            )
            .unwrap();
        assert!(framer.until_close() && !framer.done());
    }
}
