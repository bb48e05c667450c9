//! Greedy skip search on the engine alone: at each step, skip the one more
//! block whose removal raises the calibration loss least. This is
//! Hopscotch's selection rule without its scale fitting.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};

use super::eval::calibration_nll;
use super::importance::all_blocks;
use crate::model::Model;
use crate::plan::Plan;

pub const NAME: &str = "greedy skip search (calibration Δloss, no scale fitting)";

pub struct Progress {
    pub done: usize,
    pub total: usize,
    pub best_loss: Option<f64>,
    pub step: usize,
}

/// Adds `k` blocks to `from`, calling `on_step` with each chosen plan.
pub fn greedy(
    model: &Model,
    calibration: &[u32],
    from: &Plan,
    k: usize,
    cancel: &AtomicBool,
    mut on_progress: impl FnMut(Progress),
    mut on_step: impl FnMut(&Plan, f64) -> Result<()>,
) -> Result<Plan> {
    let mut plan = from.clone();
    let free = all_blocks(model.n_layers())
        .into_iter()
        .filter(|b| !plan.is_skipped(*b))
        .count();
    if k == 0 || k > free {
        bail!("K must be between 1 and {free}");
    }
    let total: usize = (0..k).map(|s| free - s).sum();
    let mut done = 0;
    for step in 1..=k {
        let mut best: Option<(crate::plan::BlockId, f64)> = None;
        for b in all_blocks(model.n_layers()) {
            if plan.is_skipped(b) {
                continue;
            }
            if cancel.load(Ordering::Relaxed) {
                bail!("cancelled");
            }
            let mut candidate = plan.clone();
            candidate.skip.insert(b);
            let nll = calibration_nll(model, calibration, &candidate, cancel)?;
            if best.is_none_or(|(_, l)| nll < l) {
                best = Some((b, nll));
            }
            done += 1;
            on_progress(Progress {
                done,
                total,
                best_loss: best.map(|(_, l)| l),
                step,
            });
        }
        let (b, loss) = best.expect("at least one free block");
        plan.skip.insert(b);
        on_step(&plan, loss)?;
    }
    Ok(plan)
}
