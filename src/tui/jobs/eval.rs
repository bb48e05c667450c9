//! Held-out quality and measured speed of one plan.

use std::sync::atomic::AtomicBool;

use anyhow::Result;

use super::Setup;
use crate::eval::bench::{bench, bench_interleaved};
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

/// Whether `plan` computes exactly what the base model does: nothing
/// skipped, every scale 1, nothing replaced or added. Timing such a plan
/// against the base measures only noise (and whatever else is running).
pub fn runs_as_base(plan: &Plan) -> bool {
    plan.skip.is_empty() && !plan.has_scales() && plan.replace.is_none() && plan.tensors.is_none()
}

/// Prefill and decode tokens/sec of base and plan on the real skipped path, same run.
pub fn speed(model: &Model, setup: &Setup, plan: &Plan) -> Result<Speed> {
    let r = bench(model, plan, setup.bench, |_, _| {})?;
    Ok(Speed {
        base_prefill: r.base.prefill_tokens_per_sec.median,
        base_decode: r.base.decode_tokens_per_sec.median,
        plan_prefill: r.pruned.prefill_tokens_per_sec.median,
        plan_decode: r.pruned.decode_tokens_per_sec.median,
        overlap: Default::default(),
    })
}

/// Prefill and decode tokens/sec of the base model alone (no second side to compare).
pub fn base_speed(model: &Model, setup: &Setup) -> Result<Speed> {
    let base = Plan::base();
    let r = bench_interleaved(model, &[&base], setup.bench, |_, _| {})?;
    let s = &r[0];
    Ok(Speed::same_as_base(
        s.prefill_tokens_per_sec.median,
        s.decode_tokens_per_sec.median,
        Default::default(),
    ))
}

/// A plan's speed without timing what needs no timing: a plan equal to the
/// base reuses the last base measurement taken on a quiet machine (ratio
/// exactly 1), or times the base alone; any other plan is timed against
/// the base in the same run.
pub fn speed_or_reuse(
    plan: &Plan,
    last_base: Option<Speed>,
    time_base: impl FnOnce() -> Result<Speed>,
    time_pair: impl FnOnce() -> Result<Speed>,
) -> Result<Speed> {
    if !runs_as_base(plan) {
        return time_pair();
    }
    let reusable = last_base.filter(|b| b.overlap.is_clean());
    let b = match reusable {
        Some(b) => b,
        None => time_base()?,
    };
    Ok(Speed::same_as_base(
        b.base_prefill,
        b.base_decode,
        b.overlap,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{BlockId, LayerScales};
    use crate::tui::app::Overlap;

    fn timed(base: f64, plan: f64, overlap: Overlap) -> Speed {
        Speed {
            base_prefill: base * 10.0,
            base_decode: base,
            plan_prefill: plan * 10.0,
            plan_decode: plan,
            overlap,
        }
    }

    #[test]
    fn a_plan_equal_to_the_base_is_not_timed_against_it() {
        let busy = Overlap {
            importance: true,
            ..Default::default()
        };
        // What timing the base against itself gave while importance ran.
        let noisy = || Ok(timed(38.0, 17.9, busy));
        let never = || -> Result<Speed> { panic!("a plan equal to the base was timed again") };
        let mut identity_scales = Plan::base();
        identity_scales.scales = Some(vec![LayerScales::IDENTITY; 4]);
        for plan in [Plan::base(), identity_scales] {
            assert!(runs_as_base(&plan));
            // A clean earlier base measurement is reused.
            let s = speed_or_reuse(
                &plan,
                Some(timed(40.0, 41.0, Overlap::default())),
                never,
                noisy,
            )
            .unwrap();
            assert_eq!((s.decode_ratio(), s.prefill_ratio()), (1.0, 1.0));
            assert_eq!(s.base_decode, 40.0);
            // None (or only a contended one): the base is timed alone, once.
            let s = speed_or_reuse(
                &plan,
                Some(timed(40.0, 41.0, busy)),
                || Ok(Speed::same_as_base(390.0, 39.0, busy)),
                never,
            )
            .unwrap();
            assert_eq!(s.decode_ratio(), 1.0);
            assert_eq!(s.base_decode, 39.0);
            assert!(
                s.overlap.importance,
                "the base timed during importance says so"
            );
        }
        // A real plan is timed against the base, in the same run.
        let skip = Plan::with_skips([BlockId::attn(1)]);
        assert!(!runs_as_base(&skip));
        let s = speed_or_reuse(
            &skip,
            Some(timed(40.0, 40.0, Overlap::default())),
            never,
            noisy,
        )
        .unwrap();
        assert_eq!(s.plan_decode, 17.9);
    }
}
