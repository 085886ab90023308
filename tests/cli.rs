//! The command line outside `serve`: `embed` in both output formats (from arguments and from stdin), and
//! `health` against a live server and an empty port.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::{cosine, floats, reference, Server, BINARY};

const DIMS: usize = 384;

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BINARY)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start the binary");
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(pipe);
    child.wait_with_output().unwrap()
}

fn reference_case(id: &str) -> (String, Vec<f32>) {
    let reference = reference();
    let case = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no case {id} in the reference"))
        .clone();
    (
        case["text"].as_str().unwrap().to_string(),
        floats(&case["embedding"]),
    )
}

fn little_endian_floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn embed_f32_writes_384_floats_per_text_matching_the_reference() {
    let (text, expected) = reference_case("word-hello");
    let out = run(&["embed", "--format", "f32", &text, "a second text"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), 2 * DIMS * 4);
    let first = little_endian_floats(&out.stdout[..DIMS * 4]);
    assert!(cosine(&first, &expected) >= 0.99999);
}

#[test]
fn embed_f32_from_stdin_writes_one_vector_per_line() {
    // More lines than one internal batch of 64, and the last batch partial.
    let lines: Vec<String> = (0..70).map(|i| format!("line number {i}")).collect();
    let out = run(
        &["embed", "--format", "f32"],
        Some(&(lines.join("\n") + "\n")),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), lines.len() * DIMS * 4);
    // stderr is a pipe here, not a terminal: no progress line in it.
    assert!(!String::from_utf8_lossy(&out.stderr).contains("embedded"));
}

#[test]
fn embed_json_writes_one_object_per_line() {
    let (text, expected) = reference_case("word-hello");
    let out = run(&["embed"], Some(&format!("{text}\nsomething else\n")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["dims"], DIMS);
    assert!(cosine(&floats(&lines[0]["embedding"]), &expected) >= 0.99999);
}

#[test]
fn embed_rejects_an_unknown_format() {
    let out = run(&["embed", "--format", "f16", "hello"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--format"));
}

#[test]
fn health_exits_0_for_a_live_server() {
    let server = Server::start(&[]);
    let port = server.port.to_string();
    let out = run(&["health", "--port", &port], None);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The address a server listening everywhere is configured with reaches it through loopback.
    let out = run(&["health", "--host", "0.0.0.0", "--port", &port], None);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn health_exits_1_when_nothing_answers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = run(&["health", "--port", &port.to_string()], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}
