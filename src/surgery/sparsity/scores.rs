//! Per-head and per-neuron importance on calibration data, three ways:
//! - plainact (ShadowLLM): |Σ_t ∂L/∂A·A| per sequence, summed, where A is a
//!   head's attention context before `o_proj`, or (for neurons) one
//!   intermediate activation act(gate)·up entering `down_proj`. The
//!   gradient comes from a gate `Var` of ones the probe multiplies in, so
//!   ∂L/∂gate is exactly Σ_t ∂L/∂A·A;
//! - activation magnitude: mean ‖A‖ (heads) or mean |a| (neurons) per token;
//! - random: a seeded control.
//!
//! Scores are cached per model and calibration set (`cache_path`), like the
//! block importance.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::eval::data::{Sequence, TokenSet};
use crate::model::{Model, Pass, Probe, Projection, RunOptions};
use crate::plan::{write_atomic, Plan};
use crate::surgery::objective::{input_ids, sequence_loss, LossKind};

/// Scores of every query head and every MLP neuron, `[layer][unit]`;
/// higher is more important.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitScores {
    pub heads: Vec<Vec<f64>>,
    pub neurons: Vec<Vec<f64>>,
}

impl UnitScores {
    pub fn n_layers(&self) -> usize {
        self.heads.len()
    }

    /// A seeded random control with the model's shapes.
    pub fn random(model: &Model, seed: u64) -> Self {
        let cfg = model.cfg();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut draw = |n: usize| (0..n).map(|_| rng.random::<f64>()).collect::<Vec<_>>();
        let heads = (0..cfg.n_layers).map(|_| draw(cfg.n_heads)).collect();
        let neurons = (0..cfg.n_layers)
            .map(|_| draw(cfg.intermediate_size))
            .collect();
        Self { heads, neurons }
    }

    /// Refuses scores whose shapes are not this model's.
    pub fn check_shapes(&self, model: &Model) -> Result<()> {
        let cfg = model.cfg();
        let ok = self.heads.len() == cfg.n_layers
            && self.neurons.len() == cfg.n_layers
            && self.heads.iter().all(|h| h.len() == cfg.n_heads)
            && self
                .neurons
                .iter()
                .all(|n| n.len() == cfg.intermediate_size);
        if !ok {
            bail!(
                "sparsity scores are for another model shape; this model has {} layers of {} heads and {} neurons: rescore them on this model",
                cfg.n_layers,
                cfg.n_heads,
                cfg.intermediate_size
            );
        }
        Ok(())
    }
}

/// Plainact and magnitude scores from one pass over a set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationScores {
    pub plainact: UnitScores,
    pub magnitude: UnitScores,
    /// Scored tokens behind the plainact sums.
    pub tokens: usize,
    pub sequences: usize,
}

/// Multiplies every head's context and every neuron's activation by a gate
/// `Var` of ones (gradients), and sums their magnitudes (no gradients).
struct GateProbe {
    head_gates: Vec<Var>,
    neuron_gates: Vec<Var>,
    head_magnitude: Vec<Vec<f64>>,
    neuron_magnitude: Vec<Vec<f64>>,
}

impl GateProbe {
    fn new(model: &Model) -> Result<Self> {
        let cfg = model.cfg();
        let (dev, dtype) = (model.device(), model.transformer.dtype);
        let ones =
            |n: usize| -> Result<Var> { Ok(Var::from_tensor(&Tensor::ones(n, dtype, dev)?)?) };
        Ok(Self {
            head_gates: (0..cfg.n_layers)
                .map(|_| ones(cfg.n_heads))
                .collect::<Result<_>>()?,
            neuron_gates: (0..cfg.n_layers)
                .map(|_| ones(cfg.intermediate_size))
                .collect::<Result<_>>()?,
            head_magnitude: vec![vec![0.0; cfg.n_heads]; cfg.n_layers],
            neuron_magnitude: vec![vec![0.0; cfg.intermediate_size]; cfg.n_layers],
        })
    }
}

fn add_into(acc: &mut [f64], t: &Tensor) -> candle_core::Result<()> {
    let v = t.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    for (a, x) in acc.iter_mut().zip(v) {
        *a += x;
    }
    Ok(())
}

impl Probe for GateProbe {
    fn wants_head_context(&self, _layer: usize) -> bool {
        true
    }

    fn head_context(
        &mut self,
        layer: usize,
        heads: &[u32],
        ctx: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let n = self.head_gates[layer].dim(0)?;
        if heads.len() != n {
            candle_core::bail!("plainact scoring runs every head (layer {layer})");
        }
        let norms = ctx.detach().sqr()?.sum(3)?.sqrt()?.sum((0, 1))?;
        add_into(&mut self.head_magnitude[layer], &norms)?;
        let gate = self.head_gates[layer].as_tensor().reshape((1, 1, n, 1))?;
        ctx.broadcast_mul(&gate).map(Some)
    }

    fn wants_projection_inputs(&self, _layer: usize) -> bool {
        true
    }

    fn projection_input(
        &mut self,
        layer: usize,
        proj: Projection,
        x: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if proj != Projection::Down {
            return Ok(None);
        }
        let gate = self.neuron_gates[layer].as_tensor();
        if x.dim(2)? != gate.dim(0)? {
            candle_core::bail!("plainact scoring runs every neuron (layer {layer})");
        }
        add_into(
            &mut self.neuron_magnitude[layer],
            &x.detach().abs()?.sum((0, 1))?,
        )?;
        x.broadcast_mul(gate).map(Some)
    }
}

/// Plainact (|Σ_t ∂L/∂A·A| with L the summed cross-entropy of the scored
/// tokens) and magnitude of one sequence, under `plan`'s block skips.
pub fn sequence_scores(
    model: &Model,
    seq: &Sequence,
    plan: &Plan,
) -> Result<(UnitScores, UnitScores)> {
    let run = RunOptions::DIFFERENTIABLE;
    let mut probe = GateProbe::new(model)?;
    let hidden = {
        let mut pass = Pass::plan(plan, run).with_probe(&mut probe);
        model
            .transformer
            .forward_hidden(&input_ids(model, seq)?, &mut pass)?
            .squeeze(0)?
    };
    let loss = sequence_loss(model, seq, &hidden, None, LossKind::Ce, run)?;
    let grads = loss.backward()?;
    let abs_grad = |v: &Var| -> Result<Vec<f64>> {
        Ok(match grads.get(v.as_tensor()) {
            Some(g) => g
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?
                .into_iter()
                .map(f64::abs)
                .collect(),
            // A skipped block's gate is never read: no gradient, score 0.
            None => vec![0.0; v.dim(0)?],
        })
    };
    let plainact = UnitScores {
        heads: probe
            .head_gates
            .iter()
            .map(abs_grad)
            .collect::<Result<_>>()?,
        neurons: probe
            .neuron_gates
            .iter()
            .map(abs_grad)
            .collect::<Result<_>>()?,
    };
    let magnitude = UnitScores {
        heads: probe.head_magnitude,
        neurons: probe.neuron_magnitude,
    };
    Ok((plainact, magnitude))
}

fn accumulate(acc: &mut UnitScores, add: &UnitScores) {
    for (a, b) in acc
        .heads
        .iter_mut()
        .chain(acc.neurons.iter_mut())
        .zip(add.heads.iter().chain(add.neurons.iter()))
    {
        for (x, y) in a.iter_mut().zip(b) {
            *x += y;
        }
    }
}

fn scale(s: &mut UnitScores, by: f64) {
    for v in s.heads.iter_mut().chain(s.neurons.iter_mut()) {
        for x in v.iter_mut() {
            *x *= by;
        }
    }
}

/// Plainact and magnitude over every sequence of `data`, as means per
/// scored token (plainact) and per token (magnitude).
pub fn compute_scores(
    model: &Model,
    data: &TokenSet,
    cancel: &AtomicBool,
    mut progress: impl FnMut(usize, usize),
) -> Result<CalibrationScores> {
    if data.sequences.is_empty() {
        bail!("no calibration sequences to score heads and neurons on");
    }
    let base = Plan::base();
    let mut total: Option<(UnitScores, UnitScores)> = None;
    for (i, seq) in data.sequences.iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            bail!("sparsity scoring cancelled");
        }
        let (p, m) = sequence_scores(model, seq, &base)?;
        match &mut total {
            Some((tp, tm)) => {
                accumulate(tp, &p);
                accumulate(tm, &m);
            }
            None => total = Some((p, m)),
        }
        progress(i + 1, data.sequences.len());
    }
    let (mut plainact, mut magnitude) = total.expect("at least one sequence");
    let tokens = data.scored_tokens();
    scale(&mut plainact, 1.0 / tokens.max(1) as f64);
    scale(&mut magnitude, 1.0 / data.total_tokens().max(1) as f64);
    Ok(CalibrationScores {
        plainact,
        magnitude,
        tokens,
        sequences: data.sequences.len(),
    })
}

const CACHE_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    model_hash: String,
    calibration: String,
    scores: CalibrationScores,
}

/// `<cache>/sparsity/<model hash>.json`.
pub fn cache_path(model_hash: &str) -> PathBuf {
    let id = &model_hash[..model_hash.len().min(16)];
    crate::model::source::cache_dir()
        .join("sparsity")
        .join(format!("{id}.json"))
}

/// What identifies a calibration set in the cache.
pub fn describe(data: &TokenSet) -> String {
    format!(
        "{} ({} sequences, {} scored tokens)",
        data.source,
        data.sequences.len(),
        data.scored_tokens()
    )
}

fn load_cache(path: &Path, model: &Model, calibration: &str) -> Option<CalibrationScores> {
    let file: CacheFile = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    let fits = file.version == CACHE_VERSION
        && file.model_hash == model.identity.content_hash
        && file.calibration == calibration
        && file.scores.plainact.check_shapes(model).is_ok()
        && file.scores.magnitude.check_shapes(model).is_ok();
    fits.then_some(file.scores)
}

/// The calibration scores of `model` on `data`: from the cache when it has
/// them, else computed and cached. The bool says whether they were cached.
pub fn calibration_scores(
    model: &Model,
    data: &TokenSet,
    cancel: &AtomicBool,
    progress: impl FnMut(usize, usize),
) -> Result<(CalibrationScores, bool)> {
    let path = cache_path(&model.identity.content_hash);
    let calibration = describe(data);
    if let Some(s) = load_cache(&path, model, &calibration) {
        return Ok((s, true));
    }
    let scores = compute_scores(model, data, cancel, progress)?;
    let file = CacheFile {
        version: CACHE_VERSION,
        model_hash: model.identity.content_hash.clone(),
        calibration,
        scores,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if let Err(e) = write_atomic(&path, serde_json::to_string(&file)?.as_bytes()) {
        eprintln!("scalpel: sparsity scores not cached: {e:#}");
    }
    Ok((file.scores, false))
}
