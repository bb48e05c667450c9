//! The search for the best self-speculative draft (RAD's step 1, Draft &
//! Verify's objective): greedy removal of blocks, choosing at each step the
//! block whose removal gives the highest self-speculative throughput proxy,
//! stopping when no removal raises it.
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

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::eval::speculative::{speculate, DraftLen, Drafter, SpecOptions};
use crate::model::{Model, RunOptions};
use crate::plan::{BlockId, BlockKind, Plan, PlanFile};

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpecStep {
    /// 1-based.
    pub step: usize,
    pub chosen: BlockId,
    pub score: DraftScore,
    pub candidates: Vec<SpecCandidate>,
    pub seconds: f64,
}

#[derive(Debug, Clone)]
pub enum SpecSearchEvent {
    Candidate {
        step: usize,
        block: BlockId,
        score: DraftScore,
        done: usize,
        total: usize,
        eta_secs: f64,
    },
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

/// Runs the greedy search, continuing after `resume` (finished steps).
pub fn search_draft(
    model: &Model,
    prompts: &[Vec<u32>],
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
    let start = score_draft(model, &Plan::base(), prompts, opts)?;
    let mut steps = resume;
    let mut plan = Plan::with_skips(steps.iter().map(|s| s.chosen));
    let mut best = steps
        .last()
        .map_or(start.proxy_speedup, |s| s.score.proxy_speedup);
    let mut cancelled = false;
    'steps: while steps.len() < opts.max_blocks {
        let step = steps.len() + 1;
        let t_step = Instant::now();
        let remaining: Vec<BlockId> = (0..n)
            .flat_map(|l| kinds.iter().map(move |&kind| BlockId { layer: l, kind }))
            .filter(|b| !plan.is_skipped(*b))
            .collect();
        let mut candidates = Vec::new();
        for (i, &block) in remaining.iter().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                cancelled = true;
                break 'steps;
            }
            let mut trial = plan.clone();
            trial.skip.insert(block);
            let score = score_draft(model, &trial, prompts, opts)?;
            let elapsed = t_step.elapsed().as_secs_f64();
            on_event(&SpecSearchEvent::Candidate {
                step,
                block,
                score,
                done: i + 1,
                total: remaining.len(),
                eta_secs: elapsed / (i + 1) as f64 * (remaining.len() - i - 1) as f64,
            })?;
            candidates.push(SpecCandidate { block, score });
        }
        let Some(top) = candidates
            .iter()
            .max_by(|a, b| a.score.proxy_speedup.total_cmp(&b.score.proxy_speedup))
            .cloned()
        else {
            break;
        };
        if top.score.proxy_speedup <= best {
            on_event(&SpecSearchEvent::NoGain { step, best })?;
            break;
        }
        best = top.score.proxy_speedup;
        plan.skip.insert(top.block);
        let s = SpecStep {
            step,
            chosen: top.block,
            score: top.score,
            candidates,
            seconds: t_step.elapsed().as_secs_f64(),
        };
        steps.push(s.clone());
        on_event(&SpecSearchEvent::StepDone(s))?;
    }
    Ok(SpecSearchResult {
        plan,
        start,
        steps,
        cancelled,
        seconds: t_all.elapsed().as_secs_f64(),
    })
}

/// The search so far as a plan file (`speculate --plan` takes it), its
/// steps and settings recorded so `--resume` can continue it.
pub fn save_draft_search(
    model: &Model,
    steps: &[SpecStep],
    settings: &serde_json::Value,
    complete: bool,
    path: &Path,
) -> Result<()> {
    let plan = Plan::with_skips(steps.iter().map(|s| s.chosen));
    let mut pf = PlanFile::new(model.identity.clone(), plan);
    pf.metrics.insert(
        "speculative_search_steps".into(),
        serde_json::to_value(steps)?,
    );
    if let Some(last) = steps.last() {
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
    pf.save(path)
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
    if saved["settings"] != *settings {
        bail!(
            "{} was searched with other settings ({}); resume with the same options or start anew",
            path.display(),
            saved["settings"]
        );
    }
    let Some(steps) = pf.metrics.get("speculative_search_steps") else {
        return Ok(Vec::new());
    };
    serde_json::from_value(steps.clone())
        .with_context(|| format!("{}: malformed search steps", path.display()))
}
