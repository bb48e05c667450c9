//! Windowed perplexity, KL(base ‖ plan) and top-1 agreement, with the
//! protocol of `shared/peers`: non-overlapping windows, each from an empty
//! cache, BOS first only where the model asks for it, position j scored from
//! logits[j-1]. The scores themselves come from `score`, as every other
//! reported number does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Tensor;
use rayon::prelude::*;
use serde::Serialize;

use super::score::{score_rows, Reference, Scores};
use crate::model::{Model, Pass, RunOptions};
use crate::plan::Plan;

#[derive(Debug, Clone, Copy)]
pub struct EvalOptions {
    pub window: usize,
    /// Also run the base model on each window for KL and top-1 agreement.
    pub compare_base: bool,
    pub run: RunOptions,
    /// Score windows concurrently, one per rayon thread. Pays off when each
    /// op runs single-threaded (candle's own pool set to one thread, see
    /// `setup::ThreadUse`); otherwise windows queue on candle's pool.
    pub parallel_windows: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            window: 512,
            compare_base: true,
            run: RunOptions::FAST,
            parallel_windows: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub perplexity: f64,
    pub mean_nll: f64,
    /// Mean KL(base ‖ plan) per scored token, nats; 0 for the base plan.
    pub kl_to_base: f64,
    pub top1_agreement: f64,
    pub tokens: usize,
    pub scored_tokens: usize,
    pub windows: usize,
    /// Forward passes per window: 1, or 2 when the base runs for KL.
    pub forward_passes: usize,
    /// Wall time of the whole evaluation (base passes and scoring included).
    pub seconds: f64,
    /// Tokens through forward passes (plan, and base when compared) per
    /// wall-clock second, scoring included.
    pub tokens_per_sec: f64,
}

/// Splits ids into evaluation windows (BOS + window-1 ids when `bos` is set).
pub fn windows(ids: &[u32], window: usize, bos: Option<u32>) -> Vec<Vec<u32>> {
    let pre: Vec<u32> = bos.into_iter().collect();
    let step = window - pre.len();
    ids.chunks(step)
        .map(|c| pre.iter().chain(c).copied().collect::<Vec<u32>>())
        .filter(|w| w.len() >= 2)
        .collect()
}

pub fn evaluate(
    model: &Model,
    ids: &[u32],
    plan: &Plan,
    opts: EvalOptions,
    cancel: &AtomicBool,
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    if opts.window < 2 {
        bail!("--window must be at least 2 tokens");
    }
    if ids.is_empty() {
        bail!("the evaluation text is empty");
    }
    if ids.len() < opts.window {
        bail!(
            "the evaluation text has {} tokens, fewer than one window of {}; give a longer text \
             or a smaller --window",
            ids.len(),
            opts.window
        );
    }
    if opts.window > model.transformer.max_positions() {
        bail!(
            "--window {} exceeds the model's {} positions",
            opts.window,
            model.transformer.max_positions()
        );
    }
    model.check_plan(plan)?;
    let cfg = model.cfg();
    let bos = if cfg.add_bos { cfg.bos_token_id } else { None };
    let wins = windows(ids, opts.window, bos);
    let compare = opts.compare_base && *plan != Plan::base();
    let start = Instant::now();
    let stop = AtomicBool::new(false);
    let score = |w: &Vec<u32>| -> Result<Scores> {
        if cancel.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed) {
            bail!("evaluation cancelled");
        }
        score_one_window(model, w, plan, compare, opts.run)
    };
    // Windows finish on worker threads; this thread reports progress and
    // sums them in window order, so the result does not depend on timing.
    let mut per_window: Vec<Option<Scores>> = (0..wins.len()).map(|_| None).collect();
    let (tx, rx) = mpsc::channel::<(usize, Result<Scores>)>();
    std::thread::scope(|s| -> Result<()> {
        let wins = &wins;
        let score = &score;
        s.spawn(move || {
            let send = |tx: &mut mpsc::Sender<_>, (i, w): (usize, &Vec<u32>)| {
                let _ = tx.send((i, score(w)));
            };
            if opts.parallel_windows {
                wins.par_iter().enumerate().for_each_with(tx, send);
            } else {
                let mut tx = tx;
                wins.iter().enumerate().for_each(|iw| send(&mut tx, iw));
            }
        });
        for (done, (i, result)) in rx.iter().enumerate() {
            match result {
                Ok(t) => per_window[i] = Some(t),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
            progress(done + 1, wins.len());
        }
        Ok(())
    })?;
    let mut totals = Scores::default();
    for t in per_window.into_iter().flatten() {
        totals.add(&t);
    }
    let seconds = start.elapsed().as_secs_f64();
    let tokens: usize = wins.iter().map(Vec::len).sum();
    let passes = if compare { 2 } else { 1 };
    let mean_nll = totals.mean_nll();
    let (kl, agree) = if compare {
        (totals.mean_kl(), totals.agreement())
    } else {
        (0.0, 1.0)
    };
    Ok(EvalReport {
        perplexity: mean_nll.exp(),
        mean_nll,
        kl_to_base: kl,
        top1_agreement: agree,
        tokens,
        scored_tokens: totals.scored,
        windows: wins.len(),
        forward_passes: passes,
        seconds,
        tokens_per_sec: (tokens * passes) as f64 / seconds,
    })
}

/// The plan's (and, with `compare`, the base's) scores on one window.
fn score_one_window(
    model: &Model,
    window: &[u32],
    plan: &Plan,
    compare: bool,
    run: RunOptions,
) -> Result<Scores> {
    let input = Tensor::new(window, model.device())?.unsqueeze(0)?;
    let hidden = |plan: &Plan| -> Result<Tensor> {
        let h = model
            .transformer
            .forward_hidden(&input, &mut Pass::plan(plan, run))?;
        Ok(h.squeeze(0)?)
    };
    let plan_hidden = hidden(plan)?;
    let base_hidden = if compare {
        Some(hidden(&Plan::base())?)
    } else {
        None
    };
    // Positions 1..len, scored from the hidden states at 0..len-1.
    let n = window.len() - 1;
    let base_rows = base_hidden.map(|h| h.narrow(0, 0, n)).transpose()?;
    score_rows(
        model,
        &plan_hidden.narrow(0, 0, n)?,
        base_rows.as_ref().map(Reference::Hidden),
        &window[1..],
        run,
    )
}

#[cfg(test)]
mod tests {
    use super::windows;

    #[test]
    fn windows_follow_the_peer_protocol() {
        let ids: Vec<u32> = (0..10).collect();
        let w = windows(&ids, 4, None);
        assert_eq!(w, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]);
        let w = windows(&ids, 4, Some(99));
        assert_eq!(w[0], vec![99, 0, 1, 2]);
        assert_eq!(w.last().unwrap(), &vec![99, 9]);
        // A trailing single token cannot be scored and is dropped.
        assert_eq!(windows(&(0..5).collect::<Vec<_>>(), 4, None).len(), 1);
    }
}
