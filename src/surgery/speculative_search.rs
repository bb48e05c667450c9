//! The search for the best self-speculative draft (RAD's step 1, Draft &
//! Verify's objective): greedy removal of blocks, choosing at each step the
//! block whose removal gives the highest self-speculative throughput proxy,
//! stopping when no removal raises it (or, with `patience`, after that many
//! steps in a row without a new best; the plan is then the best prefix of
//! the path).
//!
//! Every candidate is scored by real drafting: greedy self-speculative
//! decoding of the calibration prompts with the candidate plan as the
//! draft, giving the acceptance rate α, the tokens per verify τ and the
//! tokens drafted per verify k. The draft's cost c is *not* timed (timings
//! on a shared CPU would rank candidates by noise): it is the fraction of
//! the weights a draft step reads (kept blocks plus the output head, over
//! all blocks plus the head), what a memory-bound decode step costs. The
//! proxy is the expected speed-up over plain decoding,
//! τ / (k · c + v), with v the cost of a verify pass in decode steps (an
//! assumption, `verify_cost`: 1 when k + 1 rows cost one step, as with
//! kernels that read the weights once for all rows).
//!
//! Drafting every candidate is the cost, so candidates are first screened
//! by SWIFT's *matchness*: the share of a calibration text's scored
//! positions where the model under the candidate plan has the same argmax
//! as the full model, from one teacher-forced parallel pass per candidate
//! (the full model's argmaxes computed once per search). Only the top
//! `prescreen` candidates are drafted, ranked by the proxy the matchness
//! predicts (`predicted_proxy`: matchness taken as the acceptance rate,
//! with the candidate's weight fraction), so a block that saves more
//! weights can outrank one that costs less acceptance.
//!
//! `fit_draft` then fits Hopscotch scales for the chosen skip set and
//! drafts with and without them: does fitting raise acceptance?

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::D;
use serde::{Deserialize, Serialize};

use super::fit::{fit_scales, FitEpoch, FitOptions, FitResult};
use super::objective::{scored_rows, LayerInputs, Start};
use crate::eval::data::TokenSet;
use crate::eval::score::LOGIT_CHUNK;
use crate::eval::speculative::{speculate, DraftLen, Drafter, SpecOptions};
use crate::model::{Model, RunOptions};
use crate::plan::{BlockId, BlockKind, Plan, PlanFile};
use crate::progress::eta_secs;

#[derive(Debug, Clone)]
pub struct SpecSearchOptions {
    /// Most blocks removed.
    pub max_blocks: usize,
    pub include_mlp: bool,
    pub draft_len: DraftLen,
    /// New tokens per calibration prompt.
    pub max_new_tokens: usize,
    /// Assumed cost of one verify pass, in plain decode steps.
    pub verify_cost: f64,
    pub run: RunOptions,
    /// Candidates drafted per step, the best by matchness-predicted proxy
    /// (0: draft every candidate, no screen; more than the candidates: all).
    pub prescreen: usize,
    /// Steps in a row without a new best proxy before the search stops (0:
    /// stop at the first step that does not raise it).
    pub patience: usize,
}

/// The proxy speed-up a draft would give if its acceptance rate were its
/// matchness α (SWIFT's use of matchness): τ = (1 − α^(k+1)) / (1 − α)
/// tokens per verify of k drafted tokens (independent acceptances), over
/// k·c + v.
pub fn predicted_proxy(matchness: f64, k: usize, weight_fraction: f64, verify_cost: f64) -> f64 {
    let a = matchness.clamp(0.0, 1.0);
    let tau = if a >= 1.0 {
        (k + 1) as f64
    } else {
        (1.0 - a.powi(k as i32 + 1)) / (1.0 - a)
    };
    tau / (k as f64 * weight_fraction + verify_cost)
}

/// How many of `steps` the plan keeps: the prefix ending at the highest
/// proxy (the earliest on a tie), none when no prefix beats `start` (the
/// full model as its own draft) — a patient search may walk a path that
/// never pays.
pub fn best_prefix(start: f64, steps: &[SpecStep]) -> usize {
    let mut best = (0, start);
    for (i, s) in steps.iter().enumerate() {
        if s.score.proxy_speedup > best.1 {
            best = (i + 1, s.score.proxy_speedup);
        }
    }
    best.0
}

/// What real drafting measured for one plan.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct DraftScore {
    pub acceptance_rate: f64,
    pub mean_accepted: f64,
    pub mean_draft_len: f64,
    /// Fraction of the weights a draft step reads (not timed).
    pub weight_fraction: f64,
    /// τ / (k · c + v): expected speed-up over plain decoding.
    pub proxy_speedup: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpecCandidate {
    pub block: BlockId,
    pub score: DraftScore,
    /// Its matchness, when the step screened (absent in older plan files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matchness: Option<f64>,
}

/// A candidate the matchness screen left undrafted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScreenedOut {
    pub block: BlockId,
    pub matchness: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpecStep {
    /// 1-based.
    pub step: usize,
    pub chosen: BlockId,
    pub score: DraftScore,
    /// The drafted candidates.
    pub candidates: Vec<SpecCandidate>,
    /// The candidates the matchness screen did not draft.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub screened_out: Vec<ScreenedOut>,
    pub seconds: f64,
}

#[derive(Debug, Clone)]
pub enum SpecSearchEvent {
    /// One candidate's matchness (the screen before drafting).
    Matchness {
        step: usize,
        block: BlockId,
        matchness: f64,
        done: usize,
        total: usize,
        eta_secs: f64,
    },
    /// A drafted candidate.
    Candidate {
        step: usize,
        block: BlockId,
        score: DraftScore,
        done: usize,
        total: usize,
        eta_secs: f64,
    },
    /// The full model scored as its own draft, before the first step.
    Start(DraftScore),
    StepDone(SpecStep),
    /// No removal raised the proxy above `best` (the search ends).
    NoGain {
        step: usize,
        best: f64,
    },
}

#[derive(Debug, Clone)]
pub struct SpecSearchResult {
    pub plan: Plan,
    /// The full model as its own draft (proxy (k + 1) / (k + v)).
    pub start: DraftScore,
    pub steps: Vec<SpecStep>,
    pub cancelled: bool,
    pub seconds: f64,
}

/// Fraction of the weights a decode step under `plan` reads.
pub fn weight_fraction(model: &Model, plan: &Plan) -> f64 {
    let cfg = model.cfg();
    let (attn, mlp) = cfg.block_params();
    let head = cfg.vocab_size * cfg.hidden_size;
    let n = model.n_layers();
    let all = head + n * (attn + mlp);
    let skipped: usize = plan
        .skip
        .iter()
        .map(|b| match b.kind {
            BlockKind::Attn => attn,
            BlockKind::Mlp => mlp,
        })
        .sum();
    (all - skipped) as f64 / all as f64
}

/// Real greedy self-speculative decoding of `prompts` with `plan` as the
/// draft, scored.
pub fn score_draft(
    model: &Model,
    plan: &Plan,
    prompts: &[Vec<u32>],
    opts: &SpecSearchOptions,
) -> Result<DraftScore> {
    let spec = SpecOptions {
        draft_len: opts.draft_len,
        ..SpecOptions::greedy(opts.max_new_tokens, 1, opts.run)
    };
    let (mut accepted, mut drafted, mut verifies) = (0, 0, 0);
    for p in prompts {
        let r = speculate(model, p, Drafter::SelfPlan(plan), spec)?;
        accepted += r.accepted;
        drafted += r.drafted;
        verifies += r.verifies;
    }
    let v = verifies.max(1) as f64;
    let tau = (accepted + verifies) as f64 / v;
    let k = drafted as f64 / v;
    let c = weight_fraction(model, plan);
    Ok(DraftScore {
        acceptance_rate: accepted as f64 / drafted.max(1) as f64,
        mean_accepted: tau,
        mean_draft_len: k,
        weight_fraction: c,
        proxy_speedup: tau / (k * c + opts.verify_cost),
    })
}

/// The full model's argmax at every scored position of a calibration set
/// (teacher-forced on its text), computed once per search, so a plan's
/// matchness costs one parallel pass per sequence.
pub struct MatchReference<'a> {
    data: &'a TokenSet,
    base: Vec<Vec<u32>>,
}

impl<'a> MatchReference<'a> {
    pub fn compute(model: &Model, data: &'a TokenSet) -> Result<Self> {
        if data.scored_tokens() == 0 {
            bail!("the matchness screen needs calibration text with scored tokens");
        }
        let full = Plan::base();
        let base = (0..data.sequences.len())
            .map(|i| argmaxes(model, data, i, &full, Start::Embeddings))
            .collect::<Result<_>>()?;
        Ok(Self { data, base })
    }

    pub fn data(&self) -> &TokenSet {
        self.data
    }

    /// Share of the scored positions where `plan`'s argmax is the full model's.
    pub fn matchness(&self, model: &Model, plan: &Plan) -> Result<f64> {
        self.matchness_from(model, plan, Start::Embeddings)
    }

    /// `matchness` with every sequence started from `start` (cached inputs
    /// to the candidate's layer under the plan it extends).
    pub fn matchness_from(&self, model: &Model, plan: &Plan, start: Start) -> Result<f64> {
        let (mut same, mut scored) = (0, 0);
        for (i, want) in self.base.iter().enumerate() {
            let got = argmaxes(model, self.data, i, plan, start)?;
            same += got.iter().zip(want).filter(|(a, b)| a == b).count();
            scored += want.len();
        }
        Ok(same as f64 / scored as f64)
    }
}

/// The argmax token at each scored position of sequence `i` under `plan`.
fn argmaxes(
    model: &Model,
    data: &TokenSet,
    i: usize,
    plan: &Plan,
    start: Start,
) -> Result<Vec<u32>> {
    let run = RunOptions::FAST;
    let seq = &data.sequences[i];
    let rows = scored_rows(&start.forward(model, seq, i, plan, plan, run)?, seq)?;
    let n = rows.dim(0)?;
    let mut out = Vec::with_capacity(n);
    for from in (0..n).step_by(LOGIT_CHUNK) {
        let len = LOGIT_CHUNK.min(n - from);
        let logits = model.transformer.logits(&rows.narrow(0, from, len)?, run)?;
        out.extend(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
    }
    Ok(out)
}

/// Runs the greedy search, continuing after `resume` (finished steps).
/// `calib` is the matchness screen's text (unused with `prescreen` 0).
pub fn search_draft(
    model: &Model,
    prompts: &[Vec<u32>],
    calib: &TokenSet,
    opts: &SpecSearchOptions,
    resume: Vec<SpecStep>,
    cancel: &AtomicBool,
    mut on_event: impl FnMut(&SpecSearchEvent) -> Result<()>,
) -> Result<SpecSearchResult> {
    if prompts.is_empty() {
        bail!("the draft search needs at least one calibration prompt");
    }
    let kinds: &[BlockKind] = if opts.include_mlp {
        &[BlockKind::Attn, BlockKind::Mlp]
    } else {
        &[BlockKind::Attn]
    };
    let n = model.n_layers();
    let available = n * kinds.len();
    if opts.max_blocks == 0 || opts.max_blocks > available {
        bail!("--blocks must be between 1 and {available} (the candidate blocks)");
    }
    opts.draft_len.validate()?;
    let t_all = Instant::now();
    let reference = match opts.prescreen {
        0 => None,
        _ => Some(MatchReference::compute(model, calib)?),
    };
    let start = score_draft(model, &Plan::base(), prompts, opts)?;
    on_event(&SpecSearchEvent::Start(start))?;
    let mut steps = resume;
    let mut plan = Plan::with_skips(steps.iter().map(|s| s.chosen));
    let kept = best_prefix(start.proxy_speedup, &steps);
    let mut best = steps[..kept]
        .last()
        .map_or(start.proxy_speedup, |s| s.score.proxy_speedup);
    // Steps since the last new best (a resumed search keeps counting).
    let mut misses = steps.len() - kept;
    let mut cancelled = false;
    'steps: while steps.len() < opts.max_blocks {
        let step = steps.len() + 1;
        let t_step = Instant::now();
        let remaining: Vec<BlockId> = (0..n)
            .flat_map(|l| kinds.iter().map(move |&kind| BlockId { layer: l, kind }))
            .filter(|b| !plan.is_skipped(*b))
            .collect();
        // The screen: every candidate's matchness, the best `prescreen` drafted.
        let mut to_draft: Vec<(BlockId, Option<f64>)> =
            remaining.iter().map(|&b| (b, None)).collect();
        let mut screened_out = Vec::new();
        if let Some(reference) = &reference {
            let inputs = match LayerInputs::compute(model, reference.data(), &plan, cancel) {
                Err(_) if cancel.load(Ordering::Relaxed) => {
                    cancelled = true;
                    break 'steps;
                }
                r => r?,
            };
            let t_screen = Instant::now();
            let draft_len = opts.draft_len.max();
            let mut scored = Vec::with_capacity(remaining.len());
            for (i, &block) in remaining.iter().enumerate() {
                if cancel.load(Ordering::Relaxed) {
                    cancelled = true;
                    break 'steps;
                }
                let mut trial = plan.clone();
                trial.skip.insert(block);
                let from = Start::Layer(block.layer, &inputs);
                let matchness = reference.matchness_from(model, &trial, from)?;
                let elapsed = t_screen.elapsed().as_secs_f64();
                on_event(&SpecSearchEvent::Matchness {
                    step,
                    block,
                    matchness,
                    done: i + 1,
                    total: remaining.len(),
                    eta_secs: eta_secs(elapsed, i + 1, remaining.len()),
                })?;
                let c = weight_fraction(model, &trial);
                let predicted = predicted_proxy(matchness, draft_len, c, opts.verify_cost);
                scored.push((block, matchness, predicted));
            }
            // Stable: equal predictions keep the layer order.
            scored.sort_by(|a, b| b.2.total_cmp(&a.2));
            let keep = opts.prescreen.min(scored.len());
            screened_out = scored[keep..]
                .iter()
                .map(|&(block, matchness, _)| ScreenedOut { block, matchness })
                .collect();
            to_draft = scored[..keep]
                .iter()
                .map(|&(b, m, _)| (b, Some(m)))
                .collect();
        }
        let t_draft = Instant::now();
        let mut candidates = Vec::new();
        for (i, &(block, matchness)) in to_draft.iter().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                cancelled = true;
                break 'steps;
            }
            let mut trial = plan.clone();
            trial.skip.insert(block);
            let score = score_draft(model, &trial, prompts, opts)?;
            let elapsed = t_draft.elapsed().as_secs_f64();
            on_event(&SpecSearchEvent::Candidate {
                step,
                block,
                score,
                done: i + 1,
                total: to_draft.len(),
                eta_secs: eta_secs(elapsed, i + 1, to_draft.len()),
            })?;
            candidates.push(SpecCandidate {
                block,
                score,
                matchness,
            });
        }
        let Some(top) = candidates
            .iter()
            .max_by(|a, b| a.score.proxy_speedup.total_cmp(&b.score.proxy_speedup))
            .cloned()
        else {
            break;
        };
        if top.score.proxy_speedup <= best {
            if misses >= opts.patience {
                on_event(&SpecSearchEvent::NoGain { step, best })?;
                break;
            }
            misses += 1;
        } else {
            best = top.score.proxy_speedup;
            misses = 0;
        }
        plan.skip.insert(top.block);
        let s = SpecStep {
            step,
            chosen: top.block,
            score: top.score,
            candidates,
            screened_out,
            seconds: t_step.elapsed().as_secs_f64(),
        };
        steps.push(s.clone());
        on_event(&SpecSearchEvent::StepDone(s))?;
    }
    let kept = best_prefix(start.proxy_speedup, &steps);
    let plan = Plan::with_skips(steps[..kept].iter().map(|s| s.chosen));
    Ok(SpecSearchResult {
        plan,
        start,
        steps,
        cancelled,
        seconds: t_all.elapsed().as_secs_f64(),
    })
}

/// The chosen skip set drafted with and without fitted Hopscotch scales.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DraftFit {
    /// The skip set with the fitted scales.
    pub plan: Plan,
    pub unfitted: DraftScore,
    pub fitted: DraftScore,
    pub fit: FitOptions,
    pub best_epoch: usize,
    pub history: Vec<FitEpoch>,
    pub warnings: Vec<String>,
}

/// Fits the scales of the skip set `skip` (its own scales dropped) on
/// `train`, the best epoch chosen on `validation`, then drafts `prompts`
/// with the plan unfitted and fitted. `None` when the fit was cancelled.
#[allow(clippy::too_many_arguments)]
pub fn fit_draft(
    model: &Model,
    skip: &Plan,
    prompts: &[Vec<u32>],
    opts: &SpecSearchOptions,
    train: &TokenSet,
    validation: &TokenSet,
    fit: &FitOptions,
    cancel: &AtomicBool,
    on_epoch: impl FnMut(&FitEpoch),
) -> Result<Option<DraftFit>> {
    if skip.skip.is_empty() {
        bail!("the draft skips no block; there is nothing for fitted scales to compensate");
    }
    let unfitted_plan = Plan::with_skips(skip.skip.iter().copied());
    let fit_opts = FitOptions {
        init: None,
        ..fit.clone()
    };
    let FitResult {
        plan,
        history,
        best_epoch,
        cancelled,
        warnings,
        ..
    } = fit_scales(
        model,
        &unfitted_plan,
        train,
        validation,
        &fit_opts,
        cancel,
        on_epoch,
    )?;
    if cancelled {
        return Ok(None);
    }
    Ok(Some(DraftFit {
        unfitted: score_draft(model, &unfitted_plan, prompts, opts)?,
        fitted: score_draft(model, &plan, prompts, opts)?,
        plan,
        fit: fit_opts,
        best_epoch,
        history,
        warnings,
    }))
}

/// The search so far as a plan file (`speculate --plan` takes it), its
/// steps and settings recorded so `--resume` can continue it.
pub fn save_draft_search(
    model: &Model,
    start: &DraftScore,
    steps: &[SpecStep],
    settings: &serde_json::Value,
    complete: bool,
    path: &Path,
) -> Result<()> {
    draft_search_file(model, start, steps, settings, complete)?.save(path)
}

/// The finished search with its fitted draft: the plan carries the fitted
/// scales (as `fit` writes them), the metrics both drafts' scores.
pub fn save_fitted_draft(
    model: &Model,
    start: &DraftScore,
    steps: &[SpecStep],
    settings: &serde_json::Value,
    fit: &DraftFit,
    path: &Path,
) -> Result<()> {
    let mut pf = draft_search_file(model, start, steps, settings, true)?;
    if pf.plan.skip != fit.plan.skip {
        bail!("the fitted draft skips other blocks than the search chose");
    }
    pf.plan = fit.plan.clone();
    pf.metrics.insert(
        "speculative_fit".into(),
        serde_json::json!({"unfitted": fit.unfitted, "fitted": fit.fitted}),
    );
    pf.metrics
        .insert("fit_history".into(), serde_json::to_value(&fit.history)?);
    pf.metrics
        .insert("fit_best_epoch".into(), fit.best_epoch.into());
    pf.provenance.insert(
        "fit".into(),
        serde_json::json!({"loss": fit.fit.loss, "lr": fit.fit.lr, "epochs": fit.fit.epochs,
            "batch_size": fit.fit.batch_size}),
    );
    pf.save(path)
}

fn draft_search_file(
    model: &Model,
    start: &DraftScore,
    steps: &[SpecStep],
    settings: &serde_json::Value,
    complete: bool,
) -> Result<PlanFile> {
    let kept = best_prefix(start.proxy_speedup, steps);
    let plan = Plan::with_skips(steps[..kept].iter().map(|s| s.chosen));
    let mut pf = PlanFile::new(model.identity.clone(), plan);
    pf.metrics.insert(
        "speculative_search_steps".into(),
        serde_json::to_value(steps)?,
    );
    pf.metrics
        .insert("speculative_start".into(), serde_json::to_value(start)?);
    if let Some(last) = steps[..kept].last() {
        pf.metrics.insert(
            "speculative_proxy".into(),
            serde_json::to_value(last.score)?,
        );
    }
    pf.provenance.insert("command".into(), "search".into());
    pf.provenance.insert(
        "speculative_search".into(),
        serde_json::json!({"settings": settings, "complete": complete}),
    );
    Ok(pf)
}

/// The finished steps of a saved draft search made with `settings`.
pub fn load_draft_search(
    model: &Model,
    settings: &serde_json::Value,
    path: &Path,
) -> Result<Vec<SpecStep>> {
    let pf = model.load_plan(path)?;
    let Some(saved) = pf.provenance.get("speculative_search") else {
        bail!(
            "{} is not a speculative draft search (no search settings)",
            path.display()
        );
    };
    // Searches saved before the matchness screen drafted every candidate.
    let unscreened_by_default = |v: &serde_json::Value| {
        let mut v = v.clone();
        if let Some(map) = v.as_object_mut() {
            map.entry("prescreen").or_insert(0.into());
        }
        v
    };
    let saved_settings = unscreened_by_default(&saved["settings"]);
    if saved_settings != unscreened_by_default(settings) {
        bail!(
            "{} was searched with other settings ({}); resume with the same options or start anew",
            path.display(),
            saved_settings
        );
    }
    let Some(steps) = pf.metrics.get("speculative_search_steps") else {
        return Ok(Vec::new());
    };
    serde_json::from_value(steps.clone())
        .with_context(|| format!("{}: malformed search steps", path.display()))
}
