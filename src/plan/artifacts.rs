//! Content-hashed artifacts of a v2 plan: trained parameters kept in
//! safetensors files beside the plan, each listed with its sha256, so a plan
//! never runs with parameters other than the ones it was made with.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{folder_of, write_atomic, PlanFile};

/// One file of trained parameters that belongs to a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    /// What the plan's sections call it.
    pub name: String,
    /// The file, relative to the plan's folder.
    pub file: String,
    /// sha256 of the file's bytes, lowercase hex.
    pub sha256: String,
    /// Tensor names and shapes inside (for people reading the plan).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tensors: BTreeMap<String, Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !ok {
        bail!("artifact name `{name}` must be letters, digits, `_`, `-` or `.`");
    }
    Ok(())
}

/// Refuses entries no build could use: bad or repeated names, paths that
/// leave the plan's folder, hashes that are not sha256.
pub(crate) fn check_entries(artifacts: &[Artifact], origin: &str) -> Result<()> {
    let mut seen = BTreeSet::new();
    for a in artifacts {
        check_name(&a.name).with_context(|| origin.to_string())?;
        if !seen.insert(a.name.as_str()) {
            bail!("{origin} lists artifact `{}` twice", a.name);
        }
        let p = Path::new(&a.file);
        if a.file.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
            bail!(
                "{origin}: artifact `{}` has file `{}`; it must be a path inside the plan's folder \
                 (relative, no `..`)",
                a.name,
                a.file
            );
        }
        if !is_sha256(&a.sha256) {
            bail!(
                "{origin}: artifact `{}` has sha256 `{}`, which is not 64 lowercase hex digits",
                a.name,
                a.sha256
            );
        }
    }
    Ok(())
}

impl PlanFile {
    /// The artifact called `name`.
    pub fn artifact(&self, name: &str) -> Result<&Artifact> {
        self.artifacts
            .iter()
            .find(|a| a.name == name)
            .with_context(|| {
                let names: Vec<&str> = self.artifacts.iter().map(|a| a.name.as_str()).collect();
                format!(
                    "the plan has no artifact `{name}` (it has: {})",
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                )
            })
    }

    fn artifact_path(&self, a: &Artifact) -> Result<PathBuf> {
        let dir = self.dir.as_ref().with_context(|| {
            format!(
                "artifact `{}` has no folder yet: load or save the plan first",
                a.name
            )
        })?;
        Ok(dir.join(&a.file))
    }

    /// An artifact's bytes, refused unless their sha256 is the recorded one.
    fn verified_bytes(&self, a: &Artifact) -> Result<Vec<u8>> {
        let path = self.artifact_path(a)?;
        if !path.is_file() {
            bail!(
                "plan artifact `{}`: {} is missing (the plan records sha256 {}); keep artifact \
                 files beside their plan",
                a.name,
                path.display(),
                a.sha256
            );
        }
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let actual = sha256_hex(&bytes);
        if actual != a.sha256 {
            bail!(
                "plan artifact `{}`: {} has sha256 {actual}, but the plan records {}; the file was \
                 changed or replaced after the plan was written: restore it, or make the plan again",
                a.name,
                path.display(),
                a.sha256
            );
        }
        Ok(bytes)
    }

    /// Checks that every artifact is present with its recorded hash.
    pub fn verify_artifacts(&self) -> Result<()> {
        for a in &self.artifacts {
            self.verified_bytes(a)?;
        }
        Ok(())
    }

    /// Loads an artifact's tensors onto `device`, after checking its hash.
    pub fn load_artifact(&self, name: &str, device: &Device) -> Result<HashMap<String, Tensor>> {
        let a = self.artifact(name)?;
        let bytes = self.verified_bytes(a)?;
        candle_core::safetensors::load_buffer(&bytes, device).with_context(|| {
            format!(
                "plan artifact `{name}` ({}) is not a valid safetensors file",
                a.file
            )
        })
    }

    /// Writes `tensors` as a safetensors file beside the plan that will be
    /// saved at `plan_path` (atomically) and records it as artifact `name`,
    /// replacing an artifact of that name.
    pub fn write_artifact(
        &mut self,
        plan_path: &Path,
        name: &str,
        tensors: &HashMap<String, Tensor>,
        description: Option<&str>,
    ) -> Result<&Artifact> {
        check_name(name)?;
        let dir = folder_of(plan_path);
        // The one being replaced is not needed (it may be gone or broken);
        // the others move with the plan, so all of them share one folder.
        self.artifacts.retain(|a| a.name != name);
        self.copy_artifacts_to(&dir)?;
        let stem = plan_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plan".into());
        let file = format!("{stem}.{name}.safetensors");
        let bytes = safetensors::serialize(tensors.iter(), None)
            .with_context(|| format!("cannot serialise artifact `{name}`"))?;
        write_atomic(&dir.join(&file), &bytes)?;
        let entry = Artifact {
            name: name.to_string(),
            file,
            sha256: sha256_hex(&bytes),
            tensors: tensors
                .iter()
                .map(|(k, t)| (k.clone(), t.dims().to_vec()))
                .collect(),
            description: description.map(str::to_string),
        };
        self.dir = Some(dir);
        self.artifacts.push(entry);
        Ok(self.artifacts.last().expect("just pushed"))
    }

    /// Makes every artifact present, with its hash, in `dir` (copying the
    /// verified files from the plan's own folder where needed).
    pub(crate) fn copy_artifacts_to(&self, dir: &Path) -> Result<()> {
        for a in &self.artifacts {
            let dst = dir.join(&a.file);
            let already = std::fs::read(&dst).is_ok_and(|b| sha256_hex(&b) == a.sha256);
            if already {
                continue;
            }
            let bytes = self.verified_bytes(a)?;
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            write_atomic(&dst, &bytes)
                .with_context(|| format!("cannot copy artifact `{}` beside the plan", a.name))?;
        }
        Ok(())
    }
}
