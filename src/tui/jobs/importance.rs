//! Per-block importance on the calibration window, with the engine alone:
//! block influence (1 − cos between a block's input and output residual
//! stream, one pass) and Δloss (calibration NLL with that block alone
//! skipped, minus the base NLL; one pass per block). Cached per model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::eval::calibration_nll;
use crate::model::transformer::BlockObserver;
use crate::model::{Model, RunOptions, Scales};
use crate::plan::{write_atomic, BlockId, Plan};
use crate::tui::app::BlockScores;

const CACHE_VERSION: u32 = 1;

/// Mean 1 − cos(input, output) over positions, per computed block.
struct Influence(BTreeMap<BlockId, f64>);

impl BlockObserver for Influence {
    fn observe(
        &mut self,
        block: BlockId,
        input: &Tensor,
        output: &Tensor,
    ) -> candle_core::Result<()> {
        let dot = (input * output)?.sum(D::Minus1)?;
        let norms =
            (input.sqr()?.sum(D::Minus1)?.sqrt()? * output.sqr()?.sum(D::Minus1)?.sqrt()?)?;
        let cos = (dot / norms)?
            .mean_all()?
            .to_dtype(candle_core::DType::F64)?;
        self.0.insert(block, 1.0 - cos.to_scalar::<f64>()?);
        Ok(())
    }
}

pub fn influence(model: &Model, ids: &[u32]) -> Result<BTreeMap<BlockId, f64>> {
    let input = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    let x = model.transformer.embed_tokens(&input)?;
    let mut obs = Influence(BTreeMap::new());
    model.transformer.run_layers(
        x,
        0..model.n_layers(),
        0,
        None,
        &Plan::base(),
        Scales::FromPlan,
        RunOptions::FAST,
        Some(&mut obs),
    )?;
    Ok(obs.0)
}

/// Calls `on_block` with each block's Δloss as soon as it is measured.
pub fn delta_loss(
    model: &Model,
    ids: &[u32],
    cancel: &AtomicBool,
    mut on_block: impl FnMut(BlockId, f64, usize, usize),
) -> Result<()> {
    let base = calibration_nll(model, ids, &Plan::base(), cancel)?;
    let blocks = all_blocks(model.n_layers());
    for (i, b) in blocks.iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            bail!("cancelled");
        }
        let nll = calibration_nll(model, ids, &Plan::with_skips([*b]), cancel)?;
        on_block(*b, nll - base, i + 1, blocks.len());
    }
    Ok(())
}

pub fn all_blocks(n_layers: usize) -> Vec<BlockId> {
    (0..n_layers)
        .flat_map(|l| [BlockId::attn(l), BlockId::mlp(l)])
        .collect()
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
