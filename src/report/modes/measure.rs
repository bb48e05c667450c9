//! Each plan measured through its mode: quality, and speed in groups by
//! the path and text each mode needs, every group against the unmodified
//! model timed in the same rounds.

use std::sync::atomic::AtomicBool;

use anyhow::Result;

use super::{
    kv_quality, kv_speeds, routed_quality, routed_speeds, sparse_quality, sparse_speeds, Mode,
    Quality, Speed,
};
use crate::eval::bench::{self, BenchOptions};
use crate::eval::perplexity::{self, EvalOptions};
use crate::model::kv::KvSpec;
use crate::model::routing::{Routers, RoutingSection};
use crate::model::{Model, RunOptions};
use crate::plan::Plan;
use crate::progress;
use crate::surgery::routing::speed::SpeedOptions;
use crate::surgery::sparsity::{Sparsifier, SparsitySection};

/// A plan's quality with its mode applied (`is_base`: the unmodified
/// model's own row, not compared with itself).
#[allow(clippy::too_many_arguments)]
pub fn quality(
    model: &Model,
    plan: &Plan,
    mode: &Mode,
    is_base: bool,
    ids: &[u32],
    window: usize,
    run: RunOptions,
    kv_context: usize,
) -> Result<Quality> {
    match mode {
        Mode::Plain => plain_quality(model, plan, is_base, ids, window, run),
        Mode::Kv(spec) => kv_quality(model, ids, spec, kv_context, run),
        Mode::Sparse(section, sp) => sparse_quality(model, plan, section, sp, ids, window, run),
        Mode::Routed(section, routers) => {
            routed_quality(model, plan, section, routers, ids, window, run)
        }
    }
}

fn plain_quality(
    model: &Model,
    plan: &Plan,
    is_base: bool,
    ids: &[u32],
    window: usize,
    run: RunOptions,
) -> Result<Quality> {
    let opts = EvalOptions {
        window,
        // Every given plan, including one that only heals or replaces.
        compare_base: !is_base,
        run,
        parallel_windows: false,
    };
    let q = perplexity::evaluate(model, ids, plan, opts, &AtomicBool::new(false), |_, _| {})?;
    Ok(Quality {
        perplexity: q.perplexity,
        reference_perplexity: None,
        kl_to_base: q.kl_to_base,
        top1_agreement: q.top1_agreement,
        blocks_removed: None,
        summary: None,
        facts: Vec::new(),
    })
}

/// Every plan's speed, each group on the path and text its mode needs and
/// against the unmodified model timed in the same rounds: skip, scale,
/// healed and replaced plans with the base (`bench`); KV plans against the
/// full cache at their context; sparse plans on the f32 path; routed plans
/// on the evaluation text.
pub fn speeds(
    model: &Model,
    entries: &[(&Plan, &Mode)],
    ids: &[u32],
    window: usize,
    bopts: BenchOptions,
    kv_context: usize,
) -> Result<Vec<Speed>> {
    let mut out: Vec<Option<Speed>> = entries.iter().map(|_| None).collect();
    let plain: Vec<usize> = (0..entries.len())
        .filter(|&i| matches!(entries[i].1, Mode::Plain))
        .collect();
    let plans: Vec<&Plan> = plain.iter().map(|&i| entries[i].0).collect();
    let pb = progress::bar(bopts.runs, "speed (plans, interleaved)");
    let speeds = bench::bench_interleaved(model, &plans, bopts, |d, _| pb.set_position(d as u64));
    pb.finish_and_clear();
    for (&i, s) in plain.iter().zip(speeds?) {
        out[i] = Some(Speed {
            prefill: Some(s.prefill_tokens_per_sec),
            prefill_speedup: Some(s.prefill_speedup),
            decode: s.decode_tokens_per_sec,
            decode_speedup: s.decode_speedup,
            // Skipped blocks are not computed: every speed here is timed.
            executed: true,
            reference: None,
            facts: Vec::new(),
        });
    }
    let pick = |f: &dyn Fn(&Mode) -> bool| -> Vec<usize> {
        (0..entries.len()).filter(|&i| f(entries[i].1)).collect()
    };
    let kv = pick(&|m| matches!(m, Mode::Kv(_)));
    if !kv.is_empty() {
        let specs: Vec<&KvSpec> = kv
            .iter()
            .map(|&i| match entries[i].1 {
                Mode::Kv(s) => s,
                _ => unreachable!("picked KV plans"),
            })
            .collect();
        let sp = progress::spinner("speed (KV budgets against the full cache)");
        let s = kv_speeds(
            model,
            ids,
            &specs,
            kv_context,
            bopts.decode_tokens,
            bopts.runs,
            bopts.run,
        );
        sp.finish_and_clear();
        for (&i, s) in kv.iter().zip(s?) {
            out[i] = Some(s);
        }
    }
    let sparse = pick(&|m| matches!(m, Mode::Sparse(..)));
    if !sparse.is_empty() {
        let plans: Vec<(&Plan, &SparsitySection, &Sparsifier)> = sparse
            .iter()
            .map(|&i| match entries[i].1 {
                Mode::Sparse(s, sp) => (entries[i].0, s, sp),
                _ => unreachable!("picked sparse plans"),
            })
            .collect();
        let sp = progress::spinner("speed (sparse plans, f32 path)");
        let s = sparse_speeds(
            model,
            &plans,
            ids,
            window,
            bopts.context_tokens,
            bopts.decode_tokens,
            bopts.runs,
        );
        sp.finish_and_clear();
        for (&i, s) in sparse.iter().zip(s?) {
            out[i] = Some(s);
        }
    }
    let routed = pick(&|m| matches!(m, Mode::Routed(..)));
    if !routed.is_empty() {
        let plans: Vec<(&Plan, &RoutingSection, &Routers)> = routed
            .iter()
            .map(|&i| match entries[i].1 {
                Mode::Routed(s, r) => (entries[i].0, s, r),
                _ => unreachable!("picked routed plans"),
            })
            .collect();
        let opts = SpeedOptions {
            prefill_tokens: bopts.prefill_tokens,
            decode_tokens: bopts.decode_tokens,
            runs: bopts.runs,
            run: bopts.run,
        };
        let sp = progress::spinner("speed (routed plans, on the text)");
        let s = routed_speeds(model, &plans, ids, opts);
        sp.finish_and_clear();
        for (&i, s) in routed.iter().zip(s?) {
            out[i] = Some(s);
        }
    }
    Ok(out
        .into_iter()
        .map(|s| s.expect("every plan timed"))
        .collect())
}
