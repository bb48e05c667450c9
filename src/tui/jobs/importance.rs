//! Block importance from the `surgery` engine (Δloss and block influence on
//! the calibration set), cached per model so the next start is instant; the
//! job that scores them at start (`ImportanceJob`) and its result (`Scored`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::activity::Busy;
use super::interface::{Apply, Job, JobCx, JobLane};
use super::Setup;
use crate::model::Model;
use crate::plan::{write_atomic, BlockId};
use crate::surgery::importance::compute_importance;
use crate::tui::app::{App, BlockScores, JobKind, Request, Update};

/// Loads the cached scores, or scores every block and caches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportanceJob;

impl Job for ImportanceJob {
    fn name(&self) -> String {
        JobKind::Importance.label()
    }

    fn lane(&self) -> JobLane {
        JobLane::Long
    }

    fn run(self: Box<Self>, cx: &JobCx) {
        let hash = &cx.model.identity.content_hash;
        let calib_desc = cx.setup.describe_calibration();
        let path = cache_path(hash);
        if let Some(blocks) = load_cache(&path, hash, &calib_desc, cx.model.n_layers()) {
            for (block, scores) in blocks {
                cx.apply(Scored { block, scores });
            }
            cx.send(Update::JobFinished(format!(
                "importance loaded from {}",
                path.display()
            )));
            return;
        }
        let _busy = cx.busy(Busy::Importance);
        cx.send(Update::JobStarted(JobKind::Importance));
        let r = compute(cx.model, cx.setup, cx.cancel(), |done, total| {
            cx.send(Update::JobProgress {
                done,
                total,
                loss: None,
                detail: format!("{done}/{total} calibration sequences"),
            })
        });
        match r {
            Ok(all) => {
                for (block, scores) in &all {
                    cx.apply(Scored {
                        block: *block,
                        scores: *scores,
                    });
                }
                let saved = save_cache(&path, hash, &calib_desc, &all);
                cx.send(Update::JobFinished(match saved {
                    Ok(()) => "importance scored and cached".into(),
                    Err(e) => format!("importance scored; cache not written: {e:#}"),
                }));
            }
            Err(_) if cx.cancelled() => cx.send(Update::JobCancelled),
            Err(e) => cx.send(Update::JobFailed(format!("importance: {e:#}"))),
        }
    }
}

/// One block's scores (they arrive block by block).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub block: BlockId,
    pub scores: BlockScores,
}

impl Apply for Scored {
    fn apply(self: Box<Self>, app: &mut App) -> Vec<Request> {
        app.importance
            .entry(self.block)
            .or_default()
            .merge(self.scores);
        vec![]
    }
}

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
