//! Decode speed of static head/neuron masks and of TEAL against the dense
//! model, on the same path (candle ops, f32 weights: the sliced weights are
//! f32 copies), interleaved round by round in one run. Executed: the masked
//! decode multiplies only the kept heads' q rows / o columns and the kept
//! neurons' gate/up rows and down columns (sliced once, then reused every
//! step); TEAL's reads only the kept input channels' columns of each
//! projection (`kernels::sparse_input` on a column-major copy).

use std::time::Instant;

use anyhow::Result;
use candle_core::{Tensor, D};
use serde::Serialize;

use super::activation::{ChannelProbe, ChannelThresholds, ColumnWeights};
use super::masks::{MaskPolicy, UnitMask};
use super::scores::UnitScores;
use crate::eval::bench::Stat;
use crate::model::{LayerPolicy, Mode, Model, Pass, RunOptions};
use crate::plan::Plan;

#[derive(Debug, Clone, Copy)]
pub struct SpeedOptions {
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub runs: usize,
}

impl Default for SpeedOptions {
    fn default() -> Self {
        Self {
            prompt_tokens: 32,
            decode_tokens: 32,
            runs: 3,
        }
    }
}

/// One configuration's decode speed.
#[derive(Debug, Clone, Serialize)]
pub struct SpeedRow {
    /// "dense", "static p=0.40" or "teal p=0.40".
    pub label: String,
    pub level: f64,
    /// "baseline" (dense) or "executed".
    pub execution: &'static str,
    pub decode_tokens_per_sec: Stat,
    /// Ratio of medians to the dense run of the same rounds.
    pub speedup: f64,
}

/// The candle path in f32: what both sides run on.
pub const SPEED_RUN: RunOptions = RunOptions {
    mode: Mode::Fast,
    quantized: false,
    lean: false,
};

/// What a timed decode runs besides the plan.
struct Timed<'a> {
    policy: &'a dyn LayerPolicy,
    /// TEAL, executed.
    channels: Option<(&'a ChannelThresholds, &'a ColumnWeights)>,
}

/// Seconds to decode `n` greedy tokens after the prompt.
fn time_decode(model: &Model, how: &Timed, prompt: &[u32], n: usize) -> Result<f64> {
    let t = &model.transformer;
    let plan = Plan::base();
    let mut state = t.new_state(prompt.len() + n + 1);
    let step = |ids: &[u32], state: &mut _| -> Result<u32> {
        let input = Tensor::new(ids, model.device())?.unsqueeze(0)?;
        let mut probe = match how.channels {
            Some((th, columns)) => Some(ChannelProbe::executed(model, th, None, columns)?),
            None => None,
        };
        let mut pass = Pass::plan(&plan, SPEED_RUN)
            .with_policy(how.policy)
            .with_state(state);
        if let Some(p) = probe.as_mut() {
            pass = pass.with_probe(p);
        }
        let h = t.forward_hidden(&input, &mut pass)?;
        let last = h.narrow(1, ids.len() - 1, 1)?.squeeze(1)?;
        let logits = t.logits(&last, SPEED_RUN)?;
        Ok(logits.argmax(D::Minus1)?.squeeze(0)?.to_scalar::<u32>()?)
    };
    let mut next = step(prompt, &mut state)?;
    let start = Instant::now();
    for _ in 0..n {
        next = step(&[next], &mut state)?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Dense, the static mask from `scores` at each level and TEAL at each of
/// `teal`'s thresholds, timed in turn each round (after one warm-up each,
/// which also slices the weights).
pub fn decode_speed(
    model: &Model,
    scores: &UnitScores,
    levels: &[f64],
    teal: &[ChannelThresholds],
    opts: &SpeedOptions,
) -> Result<Vec<SpeedRow>> {
    let cfg = model.cfg();
    let ids = model
        .codec()?
        .encode(crate::eval::data::DEFAULT_EVAL_TEXT)?;
    let prompt = &ids[..opts.prompt_tokens.min(ids.len()).max(1)];
    let plan = Plan::base();
    let masks: Vec<UnitMask> = levels
        .iter()
        .map(|&l| UnitMask::from_scores(scores, l))
        .collect::<Result<_>>()?;
    let mask_policies: Vec<MaskPolicy> = masks
        .iter()
        .map(|m| MaskPolicy::new(&plan, m, cfg))
        .collect::<Result<_>>()?;
    let columns = (!teal.is_empty())
        .then(|| ColumnWeights::of(model, None))
        .transpose()?;
    let mut timed = vec![(
        "dense".to_string(),
        0.0,
        Timed {
            policy: &plan,
            channels: None,
        },
    )];
    for (p, &level) in mask_policies.iter().zip(levels) {
        let how = Timed {
            policy: p,
            channels: None,
        };
        timed.push((format!("static p={level:.2}"), level, how));
    }
    if let Some(columns) = &columns {
        for th in teal {
            let how = Timed {
                policy: &plan,
                channels: Some((th, columns)),
            };
            timed.push((format!("teal p={:.2}", th.level), th.level, how));
        }
    }
    let mut runs = vec![Vec::new(); timed.len()];
    for (_, _, how) in &timed {
        time_decode(model, how, prompt, opts.decode_tokens.min(4))?;
    }
    for _ in 0..opts.runs.max(1) {
        for ((_, _, how), r) in timed.iter().zip(runs.iter_mut()) {
            // The slice cache holds about one mask: warm this one first.
            time_decode(model, how, prompt, 1)?;
            let s = time_decode(model, how, prompt, opts.decode_tokens)?;
            r.push(opts.decode_tokens as f64 / s);
        }
    }
    let stats: Vec<Stat> = runs.into_iter().map(Stat::from).collect();
    let base = stats[0].median;
    Ok(stats
        .into_iter()
        .zip(timed)
        .enumerate()
        .map(|(i, (s, (label, level, _)))| SpeedRow {
            label,
            level,
            execution: if i == 0 { "baseline" } else { "executed" },
            speedup: s.median / base,
            decode_tokens_per_sec: s,
        })
        .collect())
}
