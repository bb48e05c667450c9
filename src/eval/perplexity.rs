//! Windowed perplexity, KL(base ‖ plan) and top-1 agreement, with the
//! protocol of `shared/peers`: non-overlapping windows, each from an empty
//! cache, BOS first only where the model asks for it, position j scored from
//! logits[j-1].

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use serde::Serialize;

use crate::model::{Model, RunOptions, Scales};
use crate::plan::Plan;

/// Positions scored per logits chunk: bounds memory at chunk × vocab floats.
const LOGIT_CHUNK: usize = 128;

#[derive(Debug, Clone, Copy)]
pub struct EvalOptions {
    pub window: usize,
    /// Also run the base model on each window for KL and top-1 agreement.
    pub compare_base: bool,
    pub run: RunOptions,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            window: 512,
            compare_base: true,
            run: RunOptions::FAST,
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
    /// Wall time of the whole evaluation (base reference passes included).
    pub seconds: f64,
    /// Time in the plan's own forward passes (logits for all positions).
    pub plan_forward_seconds: f64,
    /// Tokens through the plan's forward pass per second.
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

/// Running sums over scored positions.
#[derive(Default)]
struct Totals {
    nll: f64,
    kl: f64,
    agree: usize,
    scored: usize,
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
    let mut forward_secs = 0.0;
    let mut totals = Totals::default();
    let mut tokens = 0;
    let base = Plan::base();
    for (wi, w) in wins.iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            bail!("evaluation cancelled");
        }
        let input = Tensor::new(w.as_slice(), model.device())?.unsqueeze(0)?;
        let t0 = Instant::now();
        let hidden =
            model
                .transformer
                .forward_hidden(&input, 0, None, plan, Scales::FromPlan, opts.run)?;
        let hidden = hidden.squeeze(0)?;
        forward_secs += t0.elapsed().as_secs_f64();
        let base_hidden = if compare {
            let h = model.transformer.forward_hidden(
                &input,
                0,
                None,
                &base,
                Scales::FromPlan,
                opts.run,
            )?;
            Some(h.squeeze(0)?)
        } else {
            None
        };
        score_window(
            model,
            w,
            &hidden,
            base_hidden.as_ref(),
            opts.run,
            &mut totals,
            &mut forward_secs,
        )?;
        tokens += w.len();
        progress(wi + 1, wins.len());
    }
    let mean_nll = totals.nll / totals.scored as f64;
    let (kl, agree) = if compare {
        (
            totals.kl / totals.scored as f64,
            totals.agree as f64 / totals.scored as f64,
        )
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
        seconds: start.elapsed().as_secs_f64(),
        plan_forward_seconds: forward_secs,
        tokens_per_sec: tokens as f64 / forward_secs,
    })
}

/// Scores positions 1..len of one window from the hidden states at 0..len-1.
fn score_window(
    model: &Model,
    window: &[u32],
    hidden: &Tensor,
    base_hidden: Option<&Tensor>,
    run: RunOptions,
    totals: &mut Totals,
    forward_secs: &mut f64,
) -> Result<()> {
    let n = window.len() - 1;
    let device = model.device();
    for start in (0..n).step_by(LOGIT_CHUNK) {
        let len = LOGIT_CHUNK.min(n - start);
        let t0 = Instant::now();
        let logits = model
            .transformer
            .logits(&hidden.narrow(0, start, len)?, run)?;
        *forward_secs += t0.elapsed().as_secs_f64();
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let targets = Tensor::new(&window[start + 1..start + 1 + len], device)?;
        let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
        let nll: f32 = picked.sum_all()?.to_scalar()?;
        totals.nll -= f64::from(nll);
        totals.scored += len;
        if let Some(bh) = base_hidden {
            let base_logits = model.transformer.logits(&bh.narrow(0, start, len)?, run)?;
            let base_logp = candle_nn::ops::log_softmax(&base_logits, D::Minus1)?;
            let kl = (base_logp.exp()? * (&base_logp - &logp)?)?
                .sum_all()?
                .to_scalar::<f32>()?;
            totals.kl += f64::from(kl);
            let a: Vec<u32> = base_logits.argmax(D::Minus1)?.to_vec1()?;
            let b: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
            totals.agree += a.iter().zip(&b).filter(|(x, y)| x == y).count();
        }
    }
    Ok(())
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
