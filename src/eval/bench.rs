//! `scalpel bench`: prefill and decode tokens/sec for the base model and a
//! plan, measured in the same run, runs interleaved so drift hits both.

use std::time::Instant;

use anyhow::Result;
use candle_core::Tensor;
use serde::Serialize;

use crate::model::{Model, Pass, RunOptions};
use crate::plan::Plan;

#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    /// Tokens already in the sequence when decoding starts (a prompt
    /// prefilled first, untimed).
    pub context_tokens: usize,
    pub runs: usize,
    pub run: RunOptions,
}

/// Median and spread of one measurement over the runs.
#[derive(Debug, Clone, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: Vec<f64>,
}

impl Stat {
    pub fn from(mut runs: Vec<f64>) -> Self {
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        runs.shrink_to_fit();
        Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            runs,
        }
    }

    /// A value known exactly (no runs behind it).
    pub fn exact(v: f64) -> Self {
        Self {
            median: v,
            min: v,
            max: v,
            runs: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SpeedReport {
    pub prefill_tokens_per_sec: Stat,
    pub decode_tokens_per_sec: Stat,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub threads: usize,
    pub device: String,
    pub weights: String,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub context_tokens: usize,
    pub runs: usize,
    pub plan: String,
    pub base: SpeedReport,
    pub pruned: SpeedReport,
    pub prefill_speedup: f64,
    pub decode_speedup: f64,
}

/// One timed run: a prefill of `prefill` tokens, then `decode` single-token steps.
fn time_once(model: &Model, plan: &Plan, opts: &BenchOptions, ids: &[u32]) -> Result<(f64, f64)> {
    let dev = model.device();
    let t = &model.transformer;
    let mut state = t.new_state(opts.prefill_tokens);
    let input = Tensor::new(&ids[..opts.prefill_tokens], dev)?.unsqueeze(0)?;
    let prefill_run = opts.run.for_prefill(opts.prefill_tokens);
    let t0 = Instant::now();
    let mut pass = Pass::plan(plan, prefill_run).with_state(&mut state);
    let h = t.forward_hidden(&input, &mut pass)?;
    let last = h.narrow(1, opts.prefill_tokens - 1, 1)?;
    model
        .transformer
        .logits(&last, prefill_run)?
        .to_device(&candle_core::Device::Cpu)?;
    let prefill = opts.prefill_tokens as f64 / t0.elapsed().as_secs_f64();

    // Decode continues after a prompt of `context_tokens`, as generation does.
    let ctx = opts.context_tokens;
    let mut state = t.new_state(ctx + opts.decode_tokens);
    let prompt = Tensor::new(&ids[..ctx], dev)?.unsqueeze(0)?;
    let mut pass = Pass::plan(plan, opts.run.for_prefill(ctx)).with_state(&mut state);
    t.forward_hidden(&prompt, &mut pass)?;
    let t1 = Instant::now();
    for i in 0..opts.decode_tokens {
        let tok = Tensor::new(&[ids[ctx + i]], dev)?.unsqueeze(0)?;
        let mut pass = Pass::plan(plan, opts.run).with_state(&mut state);
        let h = t.forward_hidden(&tok, &mut pass)?;
        // The argmax forces the computation (and a device sync on GPU).
        model
            .transformer
            .logits(&h, opts.run)?
            .argmax(candle_core::D::Minus1)?
            .to_vec2::<u32>()?;
    }
    let decode = opts.decode_tokens as f64 / t1.elapsed().as_secs_f64();
    Ok((prefill, decode))
}

/// Deterministic pseudo-random ids for a benchmark (content does not change
/// the cost), after checking the lengths fit the model.
fn bench_ids(model: &Model, opts: &BenchOptions) -> Result<Vec<u32>> {
    let max = model.transformer.max_positions();
    if opts.context_tokens == 0 {
        anyhow::bail!("the decode context must hold at least one token");
    }
    if opts.context_tokens + opts.decode_tokens > max || opts.prefill_tokens > max {
        anyhow::bail!(
            "a context of {} tokens plus {} decode steps (or a prefill of {}) exceeds the \
             model's {max} positions",
            opts.context_tokens,
            opts.decode_tokens,
            opts.prefill_tokens
        );
    }
    let vocab = model.cfg().vocab_size as u32;
    let n = opts
        .prefill_tokens
        .max(opts.context_tokens + opts.decode_tokens);
    // Deterministic pseudo-random ids: content does not change the cost.
    let ids: Vec<u32> = (0..n as u64)
        .map(|i| ((i * 2_654_435_761 + 12_345) % u64::from(vocab)) as u32)
        .collect();
    Ok(ids)
}

pub fn bench(
    model: &Model,
    plan: &Plan,
    opts: BenchOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<BenchReport> {
    // The base and the plan timed in turn: the two-plan case of `bench_interleaved`.
    let base_plan = Plan::base();
    let mut speeds = bench_interleaved(model, &[&base_plan, plan], opts, &mut progress)?;
    let timed = speeds.pop().expect("one result per plan");
    let untouched = speeds.pop().expect("one result per plan");
    let base = SpeedReport {
        prefill_tokens_per_sec: untouched.prefill_tokens_per_sec,
        decode_tokens_per_sec: untouched.decode_tokens_per_sec,
    };
    let pruned = SpeedReport {
        prefill_tokens_per_sec: timed.prefill_tokens_per_sec,
        decode_tokens_per_sec: timed.decode_tokens_per_sec,
    };
    Ok(BenchReport {
        threads: candle_core::utils::get_num_threads(),
        device: format!("{:?}", model.device().location()),
        weights: super::generate::weights_used(
            RunOptions {
                quantized: opts.run.quantized && model.has_quantized,
                ..opts.run
            },
            opts.prefill_tokens,
            &format!("{:?}", model.transformer.dtype),
        ),
        prefill_tokens: opts.prefill_tokens,
        decode_tokens: opts.decode_tokens,
        context_tokens: opts.context_tokens,
        runs: opts.runs,
        plan: plan.describe(),
        prefill_speedup: timed.prefill_speedup.median,
        decode_speedup: timed.decode_speedup.median,
        base,
        pruned,
    })
}

/// One plan's speed in an interleaved comparison, and its ratio to the
/// first plan's (the base).
#[derive(Debug, Clone, Serialize)]
pub struct PlanSpeed {
    pub prefill_tokens_per_sec: Stat,
    pub decode_tokens_per_sec: Stat,
    /// Median: the ratio of medians; min/max: of the per-run ratios.
    pub prefill_speedup: Stat,
    pub decode_speedup: Stat,
}

/// The ratio of `plan`'s runs to `base`'s runs, paired run by run.
pub fn ratio(plan: &Stat, base: &Stat) -> Stat {
    let per_run: Vec<f64> = plan
        .runs
        .iter()
        .zip(&base.runs)
        .map(|(p, b)| p / b)
        .collect();
    let spread = Stat::from(per_run);
    Stat {
        median: plan.median / base.median,
        ..spread
    }
}

/// Times every plan in `plans` (the first is the base), one run of each in
/// turn per round so drift hits all of them alike. The base's speed-ups are
/// exactly 1 by construction, never the base timed against itself.
pub fn bench_interleaved(
    model: &Model,
    plans: &[&Plan],
    opts: BenchOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<PlanSpeed>> {
    if plans.is_empty() || opts.runs == 0 {
        anyhow::bail!("nothing to time: give at least one plan and one run");
    }
    for p in plans {
        model.check_plan(p)?;
    }
    let ids = bench_ids(model, &opts)?;
    for p in plans {
        time_once(model, p, &BenchOptions { runs: 1, ..opts }, &ids)?;
    }
    let mut times = vec![(Vec::new(), Vec::new()); plans.len()];
    for r in 0..opts.runs {
        for (p, t) in plans.iter().zip(times.iter_mut()) {
            let (pre, dec) = time_once(model, p, &opts, &ids)?;
            t.0.push(pre);
            t.1.push(dec);
        }
        progress(r + 1, opts.runs);
    }
    let stats: Vec<(Stat, Stat)> = times
        .into_iter()
        .map(|(p, d)| (Stat::from(p), Stat::from(d)))
        .collect();
    let (base_p, base_d) = stats[0].clone();
    Ok(stats
        .into_iter()
        .enumerate()
        .map(|(i, (p, d))| {
            let (pr, dr) = if i == 0 {
                (Stat::exact(1.0), Stat::exact(1.0))
            } else {
                (ratio(&p, &base_p), ratio(&d, &base_d))
            };
            PlanSpeed {
                prefill_tokens_per_sec: p,
                decode_tokens_per_sec: d,
                prefill_speedup: pr,
                decode_speedup: dr,
            }
        })
        .collect())
}
