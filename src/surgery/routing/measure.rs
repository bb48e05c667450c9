//! A routed plan's quality, with routing carried out for real (gathered
//! rows, skipped blocks) and the compute it realised, measured.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Tensor;
use rayon::prelude::*;
use serde::Serialize;

use crate::eval::data::TokenSet;
use crate::eval::perplexity::windows;
use crate::eval::score::{score_rows, Reference, Scores};
use crate::model::routing::{slot, KvPolicy, RouterPolicy, Routers, RoutingSection};
use crate::model::{Model, Pass, RunOptions};
use crate::plan::Plan;
use crate::surgery::objective::{input_ids, score_sequence, BaseStates, SetReport};

/// How a routed plan runs: the static plan under it, the routers and how
/// their decisions are taken.
#[derive(Clone, Copy)]
pub struct Routed<'a> {
    pub plan: &'a Plan,
    pub routers: &'a Routers,
    pub kv: KvPolicy,
    pub threshold: f32,
}

impl<'a> Routed<'a> {
    /// `plan` under the routers and settings a plan file carried
    /// (`model::routing::load_from_plan`).
    pub fn of(plan: &'a Plan, (section, routers): &'a (RoutingSection, Routers)) -> Self {
        Self {
            plan,
            routers,
            kv: section.kv,
            threshold: section.threshold,
        }
    }

    pub fn policy(&self, model: &Model) -> RouterPolicy<'a> {
        RouterPolicy::new(
            self.plan,
            self.routers,
            self.kv,
            self.threshold,
            model.n_layers(),
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RoutedReport {
    pub perplexity: f64,
    pub mean_nll: f64,
    pub kl_to_base: f64,
    pub top1_agreement: f64,
    pub scored_tokens: usize,
    /// Blocks executed per token over all 2·layers blocks, measured
    /// (static skips count as not executed).
    pub executed_fraction: f64,
    /// Executed share of the routed blocks only (what `capacity` targets).
    pub routed_share: f64,
    /// Executed share of each block, attn.0, mlp.0, attn.1, …
    pub per_block: Vec<f64>,
    pub seconds: f64,
}

impl RoutedReport {
    /// The quality numbers, as a static plan's are reported.
    pub fn quality(&self) -> SetReport {
        SetReport {
            perplexity: self.perplexity,
            kl_to_base: self.kl_to_base,
            top1_agreement: self.top1_agreement,
            scored_tokens: self.scored_tokens,
        }
    }
}

fn report(scores: &Scores, policy: &RouterPolicy, routers: &Routers, seconds: f64) -> RoutedReport {
    let per_block = policy.counts.per_block();
    let routed: Vec<f64> = routers
        .by_block
        .keys()
        .map(|&b| per_block[slot(b)])
        .collect();
    RoutedReport {
        perplexity: scores.mean_nll().exp(),
        mean_nll: scores.mean_nll(),
        kl_to_base: scores.mean_kl(),
        top1_agreement: scores.agreement(),
        scored_tokens: scores.scored,
        executed_fraction: policy.counts.executed_fraction(),
        routed_share: routed.iter().sum::<f64>() / routed.len().max(1) as f64,
        per_block,
        seconds,
    }
}

/// Final-normed hidden states (t, h) of `ids` under the routed plan.
fn routed_hidden(
    model: &Model,
    ids: &Tensor,
    routed: &Routed,
    policy: &RouterPolicy,
    run: RunOptions,
) -> Result<Tensor> {
    let mut pass = Pass::plan(routed.plan, run).with_policy(policy);
    Ok(model
        .transformer
        .forward_hidden(ids, &mut pass)?
        .squeeze(0)?)
}

/// Quality and realised compute on a set of sequences (the calibration or
/// held-out answers), against the base model's states.
pub fn measure_set(
    model: &Model,
    data: &TokenSet,
    base: &BaseStates,
    routed: &Routed,
    cancel: &AtomicBool,
) -> Result<RoutedReport> {
    let t0 = Instant::now();
    let run = RunOptions::FAST;
    let policy = routed.policy(model);
    let mut scores = Scores::default();
    for (i, seq) in data.sequences.iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            bail!("cancelled");
        }
        let h = routed_hidden(model, &input_ids(model, seq)?, routed, &policy, run)?;
        let b = Reference::Hidden(&base.hidden[i]);
        scores.add(&score_sequence(model, seq, &h, Some(b), run)?);
    }
    Ok(report(
        &scores,
        &policy,
        routed.routers,
        t0.elapsed().as_secs_f64(),
    ))
}

/// `eval`'s protocol (non-overlapping windows, BOS where the model wants
/// it) on a text, the routed plan against the base model, one window at a
/// time.
pub fn evaluate_text(
    model: &Model,
    ids: &[u32],
    window: usize,
    routed: &Routed,
    run: RunOptions,
    parallel: bool,
) -> Result<RoutedReport> {
    if window < 2 || ids.len() < window {
        bail!(
            "the evaluation text has {} tokens; it needs at least one --window of {} (≥ 2)",
            ids.len(),
            window
        );
    }
    model.check_plan(routed.plan)?;
    let t0 = Instant::now();
    let cfg = model.cfg();
    let bos = if cfg.add_bos { cfg.bos_token_id } else { None };
    let wins = windows(ids, window, bos);
    let policy = routed.policy(model);
    let base = Plan::base();
    let score = |w: &Vec<u32>| -> Result<Scores> {
        let input = Tensor::new(w.as_slice(), model.device())?.unsqueeze(0)?;
        let h = routed_hidden(model, &input, routed, &policy, run)?;
        let hb = model
            .transformer
            .forward_hidden(&input, &mut Pass::plan(&base, run))?
            .squeeze(0)?;
        let n = w.len() - 1;
        score_rows(
            model,
            &h.narrow(0, 0, n)?,
            Some(Reference::Hidden(&hb.narrow(0, 0, n)?)),
            &w[1..],
            run,
        )
    };
    // One window per thread (`eval` runs each op single-threaded), summed
    // in window order so the result does not depend on timing.
    let per_window: Vec<Scores> = if parallel {
        wins.par_iter().map(score).collect::<Result<_>>()?
    } else {
        wins.iter().map(score).collect::<Result<_>>()?
    };
    let mut scores = Scores::default();
    for s in &per_window {
        scores.add(s);
    }
    Ok(report(
        &scores,
        &policy,
        routed.routers,
        t0.elapsed().as_secs_f64(),
    ))
}
