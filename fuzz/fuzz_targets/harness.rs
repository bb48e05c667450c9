//! What each fuzz target feeds its input to: the calls scalpel makes on a
//! file a user hands over, from the header parse to a built model. Shared by
//! the fuzz targets and `tests/parser_corpus.rs` (which replays the corpus).

use std::path::Path;

use anyhow::{ensure, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use scalpel::model::{LocalModel, Model, Resolved};
use scalpel::plan::{ModelIdentity, PlanFile};

/// The micro Llama the seeds describe (hidden 4, one layer, vocabulary 4).
pub const MICRO_CONFIG: &str = include_str!("../seeds/hf_config/micro-llama.json");
pub const MICRO_SAFETENSORS: &[u8] =
    include_bytes!("../seeds/safetensors/micro-llama-f32.safetensors");

fn load(local: LocalModel) -> Result<()> {
    let resolved = Resolved {
        local,
        origin: "fuzz input".into(),
    };
    Model::load_as(&resolved, &Device::Cpu, DType::F32).map(drop)
}

/// A GGUF file: header, metadata, tokenizer, tensors, transformer.
pub fn gguf(data: &[u8]) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, data)?;
    load(LocalModel::Gguf(path))
}

fn hf_dir(dir: &Path, config: &str, weights: &[u8]) -> Result<()> {
    std::fs::write(dir.join("config.json"), config)?;
    std::fs::write(dir.join("model.safetensors"), weights)?;
    Ok(())
}

/// A `model.safetensors` beside the micro config: every tensor as the
/// loader reads it, then the whole model.
pub fn safetensors(data: &[u8]) -> Result<()> {
    let dir = tempfile::tempdir()?;
    hf_dir(dir.path(), MICRO_CONFIG, data)?;
    // SAFETY: the file is private to this call and not written while mapped.
    let st = unsafe { MmapedSafetensors::new(dir.path().join("model.safetensors"))? };
    for (name, _) in st.tensors() {
        st.load(&name, &Device::Cpu)?.to_dtype(DType::F32)?;
    }
    load(LocalModel::HfDir(dir.path().to_path_buf()))
}

/// A `config.json` beside the micro weights.
pub fn hf_config(data: &[u8]) -> Result<()> {
    let text = std::str::from_utf8(data)?;
    let dir = tempfile::tempdir()?;
    hf_dir(dir.path(), text, MICRO_SAFETENSORS)?;
    load(LocalModel::HfDir(dir.path().to_path_buf()))
}

/// A plan file. A plan that loads and validates must survive a save and
/// reload unchanged.
pub fn plan(data: &[u8]) -> Result<()> {
    let text = std::str::from_utf8(data)?;
    let pf = PlanFile::from_json(text, "fuzz input")?;
    // The refusal of a plan for another model formats the plan's identity.
    let other = ModelIdentity {
        name: "other".into(),
        architecture: "llama".into(),
        n_layers: 4,
        content_hash: "0".repeat(64),
        shape: None,
    };
    let _ = pf.check_model(&other).map_err(|e| e.to_string());
    pf.check_model(&pf.model)?;
    let saved = serde_json::to_string_pretty(&pf)?;
    let back = PlanFile::from_json(&saved, "saved fuzz plan")
        .unwrap_or_else(|e| panic!("a valid plan does not reload: {e:#}\n{saved}"));
    assert_eq!(back.plan, pf.plan, "a plan changed through save and reload");
    ensure!(
        back.model == pf.model,
        "the model identity changed on reload"
    );
    Ok(())
}
