//! Exporting a pruned model to the formats serving stacks load: a
//! Nemotron-NAS (DeciLM) Hugging Face folder, a llama.cpp `deci` GGUF and a
//! mergekit passthrough recipe. Scales are folded into the weights first,
//! and a healed plan's low-rank corrections merged into them (`fold`). Every output is built beside its destination and renamed into
//! place, so a failure never leaves a partial file behind.

pub mod decilm;
pub mod fold;
pub mod gguf;
pub mod mergekit;

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::plan::PlanFile;

/// What one export format can carry of a v2 plan beyond its skips and
/// scales (which every format expresses, the scales folded into weights).
pub struct Expresses {
    pub format: &'static str,
    /// Plan sections the format has a place for.
    pub sections: &'static [&'static str],
    /// Whether the format can carry a plan's artifacts (trained parameters).
    pub artifacts: bool,
}

pub const DECILM: Expresses = Expresses {
    format: "decilm (Nemotron-NAS)",
    sections: &[crate::plan::HEAL_SECTION],
    artifacts: false,
};
pub const GGUF: Expresses = Expresses {
    format: "gguf (llama.cpp deci)",
    sections: &[crate::plan::HEAL_SECTION],
    artifacts: false,
};
pub const MERGEKIT: Expresses = Expresses {
    format: "mergekit",
    sections: &[],
    artifacts: false,
};

/// Refuses, by name, a model architecture the format cannot express.
/// Gemma 3 has no form in any of them: Nemotron-NAS and llama.cpp `deci`
/// are Llama layers (no sandwich or q/k norms, one RoPE base, SiLU), and a
/// mergekit slice renumbers layers, which moves Gemma's every-6th-layer
/// global attention onto other layers.
pub fn check_architecture(cfg: &crate::model::ModelConfig, target: &Expresses) -> Result<()> {
    if cfg.gemma3.is_some() {
        bail!(
            "a {} export cannot express Gemma 3 (gemma3): its sandwich and q/k norms, GELU MLP \
             and interleaved local/global layers have no form there. Run the plan with scalpel \
             itself",
            target.format
        );
    }
    Ok(())
}

/// Refuses, by name, a plan section or artifact the format cannot express:
/// an export without it would not compute what the plan computes.
pub fn check_expressible(file: &PlanFile, target: &Expresses) -> Result<()> {
    if let Some(name) = file.sections.names().find(|n| !target.sections.contains(n)) {
        bail!(
            "plan section `{name}` cannot be expressed in a {} export; the exported model would \
             compute something other than the plan. Export a plan without it, or run the plan \
             with scalpel itself",
            target.format
        );
    }
    // An expressed section's own artifact (a heal's factors, merged) is carried with it.
    let carried = |a: &&crate::plan::Artifact| target.sections.contains(&a.name.as_str());
    if let Some(a) = file
        .artifacts
        .iter()
        .find(|a| !target.artifacts && !carried(a))
    {
        bail!(
            "plan artifact `{}` ({}) cannot be expressed in a {} export: the format has no place \
             for a plan's trained parameters. Export a plan without it, or run the plan with \
             scalpel itself",
            a.name,
            a.file,
            target.format
        );
    }
    Ok(())
}

/// Refuses an existing output unless `force`.
pub fn check_output(out: &Path, force: bool) -> Result<()> {
    if out.exists() && !force {
        bail!(
            "{} already exists; pass --force to replace it",
            out.display()
        );
    }
    Ok(())
}

/// The folder a file at `out` is written into (`.` for a bare name).
pub fn parent_of(out: &Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes one file through a temporary file in the same folder, renamed
/// into place only once complete and synced.
pub fn write_file_atomic<T>(
    out: &Path,
    force: bool,
    fill: impl FnOnce(&mut BufWriter<&std::fs::File>) -> Result<T>,
) -> Result<T> {
    check_output(out, force)?;
    if out.is_dir() {
        bail!("{} is a folder; give a file name", out.display());
    }
    let dir = parent_of(out);
    let tmp = tempfile::Builder::new()
        .prefix(".scalpel-export-")
        .tempfile_in(&dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let value = {
        let mut w = BufWriter::new(tmp.as_file());
        let v = fill(&mut w).with_context(|| format!("cannot write {}", out.display()))?;
        w.flush()
            .with_context(|| format!("cannot write {}", out.display()))?;
        v
    };
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("cannot write {}", out.display()))?;
    // Temporary files are private; the export is for others to read.
    set_mode(tmp.path(), 0o644)?;
    tmp.persist(out)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot move the finished file to {}", out.display()))?;
    Ok(value)
}

/// Builds a folder in a temporary folder beside `out`, then renames it into
/// place (replacing an old one only with `force`, and only once complete).
pub fn write_dir_atomic<T>(
    out: &Path,
    force: bool,
    fill: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    check_output(out, force)?;
    if out.exists() && !out.is_dir() {
        bail!("{} exists and is not a folder", out.display());
    }
    let dir = parent_of(out);
    let tmp = tempfile::Builder::new()
        .prefix(".scalpel-export-")
        .tempdir_in(&dir)
        .with_context(|| format!("cannot create a folder in {}", dir.display()))?;
    let value = fill(tmp.path()).with_context(|| format!("cannot write {}", out.display()))?;
    set_mode(tmp.path(), 0o755)?;
    let staged = tmp.keep();
    let result = (|| -> Result<()> {
        if out.exists() {
            let old = tempfile::Builder::new()
                .prefix(".scalpel-old-")
                .tempdir_in(&dir)?
                .keep();
            std::fs::rename(out, old.join("previous"))?;
            std::fs::rename(&staged, out)?;
            std::fs::remove_dir_all(&old)?;
        } else {
            std::fs::rename(&staged, out)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(e)
            .with_context(|| format!("cannot move the finished folder to {}", out.display()));
    }
    Ok(value)
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set permissions on {}", path.display()))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> Result<()> {
    Ok(())
}
