//! What the black-box tests share: the built binary, a server on a free port that dies with the test, a
//! minimal HTTP client, and the shared reference data beside the project.
#![allow(dead_code)]

pub mod expected;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const BINARY: &str = env!("CARGO_BIN_EXE_embedding-server");

/// `../shared` beside the project root; a clear failure when it is missing.
pub fn shared_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("shared");
    assert!(
        dir.join("reference").is_dir(),
        "the shared test data is missing: expected {} (with reference/ and bench/) beside the project root",
        dir.display()
    );
    dir
}

pub fn reference() -> serde_json::Value {
    let path = shared_dir().join("reference").join("all-MiniLM-L6-v2.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("the reference file is not JSON")
}

/// A running server, killed when dropped.
pub struct Server {
    child: Child,
    pub port: u16,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        Server::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut command = Command::new(BINARY);
        command
            .args(["serve", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        Server::from_command(command)
    }

    /// Runs `command`, which must start the server with `--port 0` (e.g. through a shell that first moves
    /// itself into a cgroup), and waits until it listens.
    pub fn from_command(mut command: Command) -> Server {
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("cannot start the server binary");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let mut lines = BufReader::new(stdout).lines();
        let port = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(addr) = line.strip_prefix("listening on http://") {
                        break addr.rsplit(':').next().unwrap().trim().parse().unwrap();
                    }
                }
                _ => panic!(
                    "the server exited before listening; its log:\n{}",
                    log.lock().unwrap()
                ),
            }
        };
        std::thread::spawn(move || for _ in lines {});
        // A server kept in a static is never dropped: this watcher kills it when the test process is gone.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {} 2>/dev/null; do sleep 0.5; done; kill -9 {} 2>/dev/null",
                std::process::id(),
                child.id()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        Server {
            child,
            port,
            stderr: log,
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. "TERM") to the server process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} failed");
    }

    /// Waits up to `limit` for the process to exit; its exit code, or None if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let started = std::time::Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        let mut headers = vec![];
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        self.raw_request(method, path, &headers, body.unwrap_or("").as_bytes())
    }

    pub fn post(&self, path: &str, body: &serde_json::Value) -> Response {
        self.request("POST", path, Some(&body.to_string()))
    }

    /// One request on a fresh connection, with exactly these headers (plus Host, Content-Length, Connection).
    pub fn raw_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("cannot connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        Response::parse(&raw)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn parse(raw: &[u8]) -> Response {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("no end of headers in the response");
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut body = raw[split + 4..].to_vec();
        if headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
        {
            body = dechunk(&body);
        }
        Response {
            status,
            headers,
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let end = body.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&body[..end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[end + 2..end + 2 + size]);
        body = &body[end + 4 + size..];
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs())
        .fold(0.0, f64::max)
}

pub fn floats(value: &serde_json::Value) -> Vec<f32> {
    value
        .as_array()
        .expect("an array of numbers")
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

/// The nomic-tiny fixture in ../shared/reference (a tiny random NomicBERT with nomic's own outputs).
pub fn nomic_fixture_dir() -> PathBuf {
    let dir = shared_dir().join("reference").join("nomic-tiny");
    assert!(
        dir.join("expected.json").is_file(),
        "the nomic-tiny fixture is missing: expected {}",
        dir.display()
    );
    dir
}

/// A temporary `--model-dir` holding nomic-embed-text-v1 and v1.5 as symlinks to the nomic-tiny fixture's
/// files; removed on drop.
pub struct NomicModelDir(pub PathBuf);

impl NomicModelDir {
    pub fn new() -> NomicModelDir {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let root = std::env::temp_dir().join(format!(
            "embedding-server-nomic-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let fixture = nomic_fixture_dir();
        for name in ["nomic-embed-text-v1", "nomic-embed-text-v1.5"] {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            for file in ["config.json", "tokenizer.json", "model.safetensors"] {
                std::os::unix::fs::symlink(fixture.join(file), dir.join(file)).unwrap();
            }
        }
        NomicModelDir(root)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for NomicModelDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A Python that can import every module of `modules`: `$EMBEDDING_SERVER_TEST_PYTHON` if it can, else
/// `target/<venv>/bin/python`, created with `python3 -m venv` and filled by pip with `packages` on first
/// use. `Err` says why there is none.
pub fn python_with(venv: &str, modules: &[&str], packages: &[&str]) -> Result<PathBuf, String> {
    let imports = format!("import {}", modules.join(", "));
    let can_import = |python: &PathBuf| {
        Command::new(python)
            .args(["-c", &imports])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if let Some(python) = std::env::var_os("EMBEDDING_SERVER_TEST_PYTHON").map(PathBuf::from) {
        if can_import(&python) {
            return Ok(python);
        }
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(venv);
    let python = venv.join("bin").join("python");
    if can_import(&python) {
        return Ok(python);
    }
    // Tests of one binary run in parallel, and two pips installing into one venv at once break each other
    // (a half-written dist-info): one installs while the others wait on this lock, then find it done.
    let lock_path = venv.with_extension("lock");
    let _ = std::fs::create_dir_all(lock_path.parent().unwrap());
    let lock = std::fs::File::create(&lock_path)
        .map_err(|e| format!("cannot create {}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
    if can_import(&python) {
        return Ok(python);
    }
    let run = |command: &mut Command, what: &str| match command.output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("{what} could not run: {e}")),
    };
    run(
        Command::new("python3").arg("-m").arg("venv").arg(&venv),
        "python3 -m venv",
    )?;
    run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(packages),
        &format!("pip install {}", packages.join(" ")),
    )?;
    Ok(python)
}

/// A scratch copy of a model directory, with some files changed: `root()/m` is the model, so that
/// `--model-dir root()` with `--model m` serves it. Removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(from: &std::path::Path, edit: impl FnOnce(&std::path::Path)) -> Scratch {
        let root = std::env::temp_dir().join(format!(
            "embedding-server-scratch-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let model = root.join("m");
        copy_dir(from, &model);
        edit(&model);
        Scratch(root)
    }

    /// The directory to give as `--model-dir`; the model is its `m`.
    pub fn root(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Rewrites the JSON file at `path` through `edit`.
pub fn edit_json(path: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut value);
    std::fs::write(path, value.to_string()).unwrap();
}
