//! Held-out quality and measured speed of one plan.

use std::sync::atomic::AtomicBool;

use anyhow::Result;

use super::Setup;
use crate::eval::bench::bench;
use crate::eval::perplexity::{evaluate, EvalOptions};
use crate::model::{Model, RunOptions};
use crate::plan::Plan;
use crate::tui::app::{Quality, Speed};

/// Perplexity, KL to base and top-1 agreement on the held-out windows.
pub fn quality(
    model: &Model,
    setup: &Setup,
    plan: &Plan,
    cancel: &AtomicBool,
    progress: impl FnMut(usize, usize),
) -> Result<Quality> {
    let opts = EvalOptions {
        window: setup.window,
        compare_base: true,
        run: RunOptions::FAST,
        parallel_windows: false,
    };
    let r = evaluate(model, &setup.heldout, plan, opts, cancel, progress)?;
    Ok(Quality {
        perplexity: r.perplexity,
        kl: r.kl_to_base,
        top1: r.top1_agreement,
    })
}

/// Prefill and decode tokens/sec of base and plan on the real skipped path, same run.
pub fn speed(model: &Model, setup: &Setup, plan: &Plan) -> Result<Speed> {
    let r = bench(model, plan, setup.bench, |_, _| {})?;
    Ok(Speed {
        base_prefill: r.base.prefill_tokens_per_sec.median,
        base_decode: r.base.decode_tokens_per_sec.median,
        plan_prefill: r.pruned.prefill_tokens_per_sec.median,
        plan_decode: r.pruned.decode_tokens_per_sec.median,
    })
}
