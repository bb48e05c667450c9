//! Prefill and decode speed of routed plans next to static ones, on real
//! text (routing depends on the tokens, so pseudo-random ids would time
//! other decisions), one run of each in turn per round so drift hits all
//! alike. Routing is executed: skipped rows and blocks compute nothing.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::Serialize;

use super::measure::Routed;
use crate::eval::bench::Stat;
use crate::model::{LayerPolicy, Model, Pass, RunOptions};
use crate::plan::Plan;

/// One entry of a speed comparison: a static plan, or a routed one.
pub struct SpeedEntry<'a> {
    pub name: String,
    pub plan: &'a Plan,
    pub routed: Option<Routed<'a>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SpeedRow {
    pub name: String,
    pub prefill_tokens_per_sec: Stat,
    pub decode_tokens_per_sec: Stat,
    /// Blocks executed per token over all blocks, measured over every
    /// timed prefill and decode step.
    pub executed_fraction: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct SpeedOptions {
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub runs: usize,
    pub run: RunOptions,
}

/// Every block of a static plan's non-skipped blocks executes.
fn static_fraction(model: &Model, plan: &Plan) -> f64 {
    1.0 - plan.skip.len() as f64 / (2 * model.n_layers()) as f64
}

/// One timed run: a prefill of the first `prefill_tokens` ids, then
/// `decode_tokens` steps over the ids that follow (teacher-forced text).
fn time_once(
    model: &Model,
    plan: &Plan,
    policy: &dyn LayerPolicy,
    opts: &SpeedOptions,
    ids: &[u32],
) -> Result<(f64, f64)> {
    let dev = model.device();
    let t = &model.transformer;
    let p = opts.prefill_tokens;
    let mut state = t.new_state(p + opts.decode_tokens);
    let input = Tensor::new(&ids[..p], dev)?.unsqueeze(0)?;
    let prefill_run = opts.run.for_prefill(p);
    let t0 = Instant::now();
    let h = {
        let mut pass = Pass::plan(plan, prefill_run)
            .with_policy(policy)
            .with_state(&mut state);
        t.forward_hidden(&input, &mut pass)?
    };
    t.logits(&h.narrow(1, p - 1, 1)?, prefill_run)?
        .to_device(&candle_core::Device::Cpu)?;
    let prefill = p as f64 / t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for i in 0..opts.decode_tokens {
        let tok = Tensor::new(&[ids[p + i]], dev)?.unsqueeze(0)?;
        let mut pass = Pass::plan(plan, opts.run)
            .with_policy(policy)
            .with_state(&mut state);
        let h = t.forward_hidden(&tok, &mut pass)?;
        t.logits(&h, opts.run)?
            .argmax(candle_core::D::Minus1)?
            .to_vec2::<u32>()?;
    }
    Ok((
        prefill,
        opts.decode_tokens as f64 / t1.elapsed().as_secs_f64(),
    ))
}

/// Times every entry, interleaved, after one untimed warm-up run each.
pub fn speed_interleaved(
    model: &Model,
    entries: &[SpeedEntry],
    ids: &[u32],
    opts: SpeedOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<SpeedRow>> {
    if entries.is_empty() || opts.runs == 0 || opts.prefill_tokens == 0 {
        bail!("nothing to time: give at least one plan, one run and one prefill token");
    }
    if ids.len() < opts.prefill_tokens + opts.decode_tokens {
        bail!(
            "the text has {} tokens; the timing needs {} (prefill) + {} (decode)",
            ids.len(),
            opts.prefill_tokens,
            opts.decode_tokens
        );
    }
    let policies: Vec<Option<_>> = entries
        .iter()
        .map(|e| e.routed.as_ref().map(|r| r.policy(model)))
        .collect();
    let policy_of = |i: usize| -> &dyn LayerPolicy {
        match &policies[i] {
            Some(p) => p,
            None => entries[i].plan,
        }
    };
    for (i, e) in entries.iter().enumerate() {
        model.check_plan(e.plan)?;
        time_once(model, e.plan, policy_of(i), &opts, ids)?;
    }
    let mut times = vec![(Vec::new(), Vec::new()); entries.len()];
    for r in 0..opts.runs {
        for (i, e) in entries.iter().enumerate() {
            let (p, d) = time_once(model, e.plan, policy_of(i), &opts, ids)?;
            times[i].0.push(p);
            times[i].1.push(d);
        }
        progress(r + 1, opts.runs);
    }
    Ok(entries
        .iter()
        .zip(times)
        .zip(&policies)
        .map(|((e, (p, d)), pol)| SpeedRow {
            name: e.name.clone(),
            prefill_tokens_per_sec: Stat::from(p),
            decode_tokens_per_sec: Stat::from(d),
            executed_fraction: pol.as_ref().map_or_else(
                || static_fraction(model, e.plan),
                |p| p.counts.executed_fraction(),
            ),
        })
        .collect())
}
