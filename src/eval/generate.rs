//! Text generation with a KV cache under a plan, timing prefill and decode
//! separately.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::model::{LayerPolicy, Model, Pass, Probe, RunOptions, SeqState};
use crate::plan::Plan;

#[derive(Debug, Clone, Copy)]
pub struct GenOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub seed: u64,
    pub stop_at_eos: bool,
    pub run: RunOptions,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenReport {
    pub prompt_tokens: usize,
    pub new_tokens: Vec<u32>,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub prefill_tokens_per_sec: f64,
    /// Single-token decode steps per second (first token comes from prefill).
    pub decode_tokens_per_sec: f64,
}

/// Generates after `prompt`, calling `on_token` with each new id as it comes.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    plan: &Plan,
    opts: GenOptions,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<GenReport> {
    generate_with(model, prompt, plan, Hooks::default(), opts, on_token)
}

/// What decides a generation's passes besides the plan's own skips.
#[derive(Default)]
pub struct Hooks<'a> {
    /// Decides what runs instead of the plan (a routed plan's routers, per
    /// token; a sparse plan's head/neuron mask).
    pub policy: Option<&'a dyn LayerPolicy>,
    /// Sees and may change every projection's input (TEAL/WINA's channel
    /// thresholds).
    pub probe: Option<&'a mut dyn Probe>,
}

/// `generate` with `hooks` in every pass, prefill and decode.
pub fn generate_with(
    model: &Model,
    prompt: &[u32],
    plan: &Plan,
    hooks: Hooks<'_>,
    opts: GenOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<GenReport> {
    let Hooks { policy, mut probe } = hooks;
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    model.check_plan(plan)?;
    let max = model.transformer.max_positions();
    if prompt.len() + opts.max_new_tokens > max {
        bail!(
            "prompt ({}) plus {} new tokens exceeds the model's {max} positions",
            prompt.len(),
            opts.max_new_tokens
        );
    }
    let mut sampler = Sampler::new(opts.seed, opts.temperature);
    let eos = &model.cfg().eos_token_ids;
    let mut state = model
        .transformer
        .new_state(prompt.len() + opts.max_new_tokens);
    let mut new_tokens = Vec::new();

    let t0 = Instant::now();
    let input = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
    let prefill_run = opts.run.for_prefill(prompt.len());
    let mut step_with = |input: &Tensor, state: &mut SeqState, run, sampler: &mut Sampler| {
        let hooks = Hooks {
            policy,
            // Reborrowed per step (the cast shortens the object's lifetime).
            probe: probe.as_mut().map(|p| &mut **p as &mut dyn Probe),
        };
        step(model, input, state, plan, hooks, run, sampler)
    };
    let mut next = step_with(&input, &mut state, prefill_run, &mut sampler)?;
    let prefill_seconds = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    while new_tokens.len() < opts.max_new_tokens {
        new_tokens.push(next);
        on_token(next)?;
        if opts.stop_at_eos && eos.contains(&next) {
            break;
        }
        if new_tokens.len() == opts.max_new_tokens {
            break;
        }
        let input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
        next = step_with(&input, &mut state, opts.run, &mut sampler)?;
    }
    let decode_seconds = t1.elapsed().as_secs_f64();
    let steps = new_tokens.len().saturating_sub(1);
    Ok(GenReport {
        prompt_tokens: prompt.len(),
        new_tokens,
        prefill_seconds,
        decode_seconds,
        prefill_tokens_per_sec: prompt.len() as f64 / prefill_seconds,
        decode_tokens_per_sec: if steps > 0 {
            steps as f64 / decode_seconds
        } else {
            0.0
        },
    })
}

/// The next-token sampler `generate` and speculative decoding share:
/// greedy (temperature 0) or softmax(logits / temperature) with a seeded
/// RNG. It draws exactly as candle's `LogitsProcessor` did for the same
/// seed (one `WeightedIndex` draw per token), so seeded outputs are kept.
pub struct Sampler {
    temperature: f64,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(seed: u64, temperature: f64) -> Self {
        Self {
            temperature,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// The distribution sampled from, per row of `logits` (1-D: one row):
    /// softmax(logits / temperature), or softmax(logits) when greedy.
    pub fn probs(&self, logits: &Tensor) -> Result<Vec<Vec<f32>>> {
        let logits = logits.to_dtype(DType::F32)?;
        let logits = if logits.rank() == 1 {
            logits.unsqueeze(0)?
        } else {
            logits
        };
        let t = if self.is_greedy() {
            1.0
        } else {
            self.temperature
        };
        Ok(candle_nn::ops::softmax_last_dim(&(logits / t)?)?.to_vec2()?)
    }

    /// The next id after 1-D `logits`.
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        if self.is_greedy() {
            return Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?);
        }
        let probs = self.probs(logits)?.remove(0);
        self.sample_from(&probs)
    }

    /// One draw from `probs` (non-negative weights, not all zero).
    pub fn sample_from(&mut self, probs: &[f32]) -> Result<u32> {
        let distr = WeightedIndex::new(probs)
            .map_err(|e| anyhow::anyhow!("cannot sample from these probabilities: {e}"))?;
        Ok(distr.sample(&mut self.rng) as u32)
    }

    /// A uniform draw in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }
}

/// How the weights served a run, for reports: `dense` (the model's dtype),
/// "quantized", or quantized decode after a dense prefill.
pub fn weights_used(run: RunOptions, prefill_tokens: usize, dense: &str) -> String {
    match (run.quantized, run.for_prefill(prefill_tokens).quantized) {
        (false, _) => dense.to_string(),
        (true, true) => "quantized".into(),
        (true, false) => format!("quantized decode, {dense} prefill"),
    }
}

/// Runs `input` through the model after the tokens `state` holds and
/// samples the next id.
fn step(
    model: &Model,
    input: &Tensor,
    state: &mut SeqState,
    plan: &Plan,
    hooks: Hooks<'_>,
    run: RunOptions,
    sampler: &mut Sampler,
) -> Result<u32> {
    let t = input.dim(1)?;
    let mut pass = Pass::plan(plan, run).with_state(state);
    if let Some(policy) = hooks.policy {
        pass = pass.with_policy(policy);
    }
    if let Some(probe) = hooks.probe {
        pass = pass.with_probe(probe);
    }
    let hidden = model.transformer.forward_hidden(input, &mut pass)?;
    let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
    let logits = model.transformer.logits(&last, run)?.squeeze(0)?;
    sampler.sample(&logits)
}

/// Greedy next-token ids for every position (for tests and comparisons).
pub fn argmax_per_position(
    model: &Model,
    ids: &[u32],
    plan: &Plan,
    run: RunOptions,
) -> Result<Vec<u32>> {
    let input = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    let hidden = model
        .transformer
        .forward_hidden(&input, &mut Pass::plan(plan, run))?;
    let logits = model.transformer.logits(&hidden.squeeze(0)?, run)?;
    Ok(logits.argmax(D::Minus1)?.to_vec1()?)
}
