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

pub fn bench(
    model: &Model,
    plan: &Plan,
    opts: BenchOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<BenchReport> {
    model.check_plan(plan)?;
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
    // One warm-up of each so allocation and caches settle.
    time_once(
        model,
        &Plan::base(),
        &BenchOptions { runs: 1, ..opts },
        &ids,
    )?;
    time_once(model, plan, &BenchOptions { runs: 1, ..opts }, &ids)?;
    let (mut bp, mut bd, mut pp, mut pd) = (vec![], vec![], vec![], vec![]);
    for r in 0..opts.runs {
        let (p, d) = time_once(model, &Plan::base(), &opts, &ids)?;
        bp.push(p);
        bd.push(d);
        let (p, d) = time_once(model, plan, &opts, &ids)?;
        pp.push(p);
        pd.push(d);
        progress(r + 1, opts.runs);
    }
    let base = SpeedReport {
        prefill_tokens_per_sec: Stat::from(bp),
        decode_tokens_per_sec: Stat::from(bd),
    };
    let pruned = SpeedReport {
        prefill_tokens_per_sec: Stat::from(pp),
        decode_tokens_per_sec: Stat::from(pd),
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
        prefill_speedup: pruned.prefill_tokens_per_sec.median / base.prefill_tokens_per_sec.median,
        decode_speedup: pruned.decode_tokens_per_sec.median / base.decode_tokens_per_sec.median,
        base,
        pruned,
    })
}
