//! Block importance from the `surgery` engine (Δloss and block influence on
//! the calibration set), cached per model so the next start is instant.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::Setup;
use crate::model::Model;
use crate::plan::{write_atomic, BlockId};
use crate::surgery::importance::compute_importance;
use crate::tui::app::BlockScores;

const CACHE_VERSION: u32 = 2;

pub fn compute(
    model: &Model,
    setup: &Setup,
    cancel: &AtomicBool,
    progress: impl FnMut(usize, usize),
) -> Result<BTreeMap<BlockId, BlockScores>> {
    let imp = compute_importance(model, &setup.calibration, cancel, progress)?;
    Ok(imp
        .blocks
        .iter()
        .map(|b| {
            (
                b.block,
                BlockScores {
                    delta_loss: Some(b.delta_loss),
                    influence: Some(b.block_influence),
                },
            )
        })
        .collect())
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    model_hash: String,
    calibration: String,
    blocks: BTreeMap<BlockId, BlockScores>,
}

/// `<cache>/importance/<model hash>.json`.
pub fn cache_path(model_hash: &str) -> PathBuf {
    let id = &model_hash[..model_hash.len().min(16)];
    crate::model::source::cache_dir()
        .join("importance")
        .join(format!("{id}.json"))
}

/// Scores cached for this model and calibration set, if complete.
pub fn load_cache(
    path: &Path,
    model_hash: &str,
    calibration: &str,
    n_layers: usize,
) -> Option<BTreeMap<BlockId, BlockScores>> {
    let text = std::fs::read_to_string(path).ok()?;
    let file: CacheFile = serde_json::from_str(&text).ok()?;
    let complete = file.blocks.len() == 2 * n_layers
        && file
            .blocks
            .values()
            .all(|s| s.delta_loss.is_some() && s.influence.is_some());
    (file.version == CACHE_VERSION
        && file.model_hash == model_hash
        && file.calibration == calibration
        && complete)
        .then_some(file.blocks)
}

pub fn save_cache(
    path: &Path,
    model_hash: &str,
    calibration: &str,
    blocks: &BTreeMap<BlockId, BlockScores>,
) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let file = CacheFile {
        version: CACHE_VERSION,
        model_hash: model_hash.into(),
        calibration: calibration.into(),
        blocks: blocks.clone(),
    };
    write_atomic(path, serde_json::to_string_pretty(&file)?.as_bytes())
}
