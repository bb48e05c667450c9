//! The ShadowLLM predictor: one linear map from the layer-0 attention
//! output at the prompt's last token to every head's and every neuron
//! group's plainact score for that prompt, trained on the calibration
//! sequences' own scores. Its scores give a per-prompt mask, as the oracle
//! does with the prompt's true scores.
//!
//! - Features: what attention 0 adds to the residual stream at the last
//!   prompt token (hidden size), standardised per dimension.
//! - Targets: ln(plainact) per query head and per group of
//!   `NEURON_GROUP` consecutive neurons (the group's sum), standardised per
//!   unit; predicting groups keeps the map small. A neuron's score is its
//!   group's predicted score shared out by the neuron's calibration
//!   (static) share of that group.
//! - Training: full-batch Adam on the mean squared error plus an L2 penalty
//!   on the weights, the step with the lowest validation error kept (the
//!   zero map, which predicts every unit's mean, included), over a small
//!   grid of step sizes and penalties (`LinearFit::grid`).

use std::sync::atomic::{AtomicBool, Ordering};

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::optim::Optimizer;
use serde::Serialize;

use super::scores::{sequence_scores, UnitScores};
use crate::eval::data::{Sequence, TokenSet};
use crate::model::{Model, Pass, Probe, RunOptions};
use crate::plan::{BlockId, Plan};
use crate::surgery::fit::new_adam;

/// Consecutive neurons predicted as one score.
pub const NEURON_GROUP: usize = 64;
/// A held-out text window decides its mask from its first this many tokens
/// (its "prompt"), as a deployed predictor decides from the prompt.
pub const PREFIX_TOKENS: usize = 64;
/// Added to a score before its logarithm (a block the plan skips scores 0).
const LOG_EPS: f64 = 1e-12;

/// Captures attention 0's output before its residual add.
struct Layer0Output(Option<Tensor>);

impl Probe for Layer0Output {
    fn block_output(
        &mut self,
        block: BlockId,
        _input: &Tensor,
        output: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if block == BlockId::attn(0) {
            self.0 = Some(output.clone());
        }
        Ok(None)
    }
}

/// What attention 0 adds to the residual stream at `position` of `ids`
/// (only `ids[..=position]` is read: attention is causal).
pub fn features(model: &Model, ids: &[u32], position: usize) -> Result<Vec<f32>> {
    if position >= ids.len() {
        bail!(
            "feature position {position} is past the {} tokens",
            ids.len()
        );
    }
    // Attention 0 reads only the embeddings: every later block is skipped.
    let n = model.n_layers();
    let plan = Plan::with_skips(
        (0..n)
            .flat_map(|l| [BlockId::attn(l), BlockId::mlp(l)])
            .filter(|&b| b != BlockId::attn(0)),
    );
    let input = Tensor::new(&ids[..=position], model.device())?.unsqueeze(0)?;
    let mut probe = Layer0Output(None);
    let mut pass = Pass::plan(&plan, RunOptions::FAST).with_probe(&mut probe);
    model.transformer.forward_hidden(&input, &mut pass)?;
    let out = probe.0.take().expect("attention 0 runs in every pass");
    Ok(out
        .narrow(1, position, 1)?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1()?)
}

/// Units per layer: query heads and neuron groups.
fn groups_per_layer(model: &Model) -> usize {
    model.cfg().intermediate_size.div_ceil(NEURON_GROUP)
}

/// ln(score) per head (layer-major) then per neuron group (layer-major).
fn targets(scores: &UnitScores) -> Vec<f32> {
    let log = |x: f64| (x + LOG_EPS).ln() as f32;
    let heads = scores.heads.iter().flatten().map(|&s| log(s));
    let groups = scores
        .neurons
        .iter()
        .flat_map(|l| l.chunks(NEURON_GROUP).map(|g| log(g.iter().sum())));
    heads.chain(groups).collect()
}

/// Per-column mean and standard deviation (1 where a column is constant).
fn column_stats(rows: &[Vec<f32>]) -> (Vec<f32>, Vec<f32>) {
    let n = rows.len() as f32;
    let d = rows[0].len();
    let mean: Vec<f32> = (0..d)
        .map(|j| rows.iter().map(|r| r[j]).sum::<f32>() / n)
        .collect();
    let std = (0..d)
        .map(|j| {
            let v = rows.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f32>() / n;
            if v > 1e-12 {
                v.sqrt()
            } else {
                1.0
            }
        })
        .collect();
    (mean, std)
}

fn standardised(rows: &[Vec<f32>], mean: &[f32], std: &[f32], dev: &Device) -> Result<Tensor> {
    let flat: Vec<f32> = rows
        .iter()
        .flat_map(|r| r.iter().zip(mean).zip(std).map(|((x, m), s)| (x - m) / s))
        .collect();
    Ok(Tensor::from_vec(flat, (rows.len(), mean.len()), dev)?)
}

/// Training settings of the linear map.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LinearFit {
    pub steps: usize,
    pub lr: f64,
    /// Weight of ‖W‖² (per weight, mean) against the mean squared error.
    pub l2: f64,
}

impl Default for LinearFit {
    fn default() -> Self {
        Self {
            steps: 300,
            lr: 1e-3,
            l2: 1e2,
        }
    }
}

impl LinearFit {
    /// The settings `Predictor::train` tries by default, the one with the
    /// lowest validation error kept: a few calibration sequences and
    /// hundreds of features leave the step size and the shrinkage to the data.
    pub fn grid() -> Vec<LinearFit> {
        let mut grid = Vec::new();
        for lr in [1e-4, 1e-3, 1e-2] {
            for l2 in [0.0, 1e2, 1e4] {
                grid.push(LinearFit { steps: 300, lr, l2 });
            }
        }
        grid
    }
}

/// What training found, in the standardised targets' units (1 = as good as
/// predicting every unit's calibration mean).
#[derive(Debug, Clone, Serialize)]
pub struct FitReport {
    pub train_mse: f64,
    pub validation_mse: f64,
    /// The validation error of the zero map (every unit its mean).
    pub validation_mse_of_mean: f64,
    /// The kept step (0 = the zero map).
    pub best_step: usize,
    /// The settings of the kept fit.
    pub settings: LinearFit,
}

/// A linear map from standardised features to standardised targets.
#[derive(Debug, Clone)]
pub struct Linear {
    x_mean: Vec<f32>,
    x_std: Vec<f32>,
    y_mean: Vec<f32>,
    y_std: Vec<f32>,
    w: Tensor,
    b: Tensor,
}

impl Linear {
    /// Fits `y ≈ f(x)` on `train`, keeping the step best on `validation`.
    pub fn fit(
        train: (&[Vec<f32>], &[Vec<f32>]),
        validation: (&[Vec<f32>], &[Vec<f32>]),
        opts: LinearFit,
    ) -> Result<(Self, FitReport)> {
        if train.0.is_empty() || validation.0.is_empty() {
            bail!("the predictor needs training and validation sequences");
        }
        let dev = Device::Cpu;
        let (x_mean, x_std) = column_stats(train.0);
        let (y_mean, y_std) = column_stats(train.1);
        let xt = standardised(train.0, &x_mean, &x_std, &dev)?;
        let yt = standardised(train.1, &y_mean, &y_std, &dev)?;
        let xv = standardised(validation.0, &x_mean, &x_std, &dev)?;
        let yv = standardised(validation.1, &y_mean, &y_std, &dev)?;
        let (d_in, d_out) = (x_mean.len(), y_mean.len());
        let w = Var::zeros((d_in, d_out), DType::F32, &dev)?;
        let b = Var::zeros(d_out, DType::F32, &dev)?;
        let mse = |x: &Tensor, y: &Tensor| -> Result<Tensor> {
            let p = x.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
            Ok((p - y)?.sqr()?.mean_all()?)
        };
        let scalar = |t: Tensor| -> Result<f64> { Ok(t.to_scalar::<f32>()? as f64) };
        let mean_val = scalar(mse(&xv, &yv)?)?;
        let mut best = (mean_val, 0, w.as_tensor().copy()?, b.as_tensor().copy()?);
        let mut adam = new_adam(&[w.clone(), b.clone()], opts.lr)?;
        for step in 1..=opts.steps {
            let loss = (mse(&xt, &yt)? + (w.as_tensor().sqr()?.mean_all()? * opts.l2)?)?;
            adam.backward_step(&loss)?;
            let v = scalar(mse(&xv, &yv)?)?;
            if !v.is_finite() {
                bail!("the predictor's validation error became {v}; lower its learning rate");
            }
            if v < best.0 {
                best = (v, step, w.as_tensor().copy()?, b.as_tensor().copy()?);
            }
        }
        let map = Self {
            x_mean,
            x_std,
            y_mean,
            y_std,
            w: best.2,
            b: best.3,
        };
        let p = xt.matmul(&map.w)?.broadcast_add(&map.b)?;
        let train_mse = scalar((p - &yt)?.sqr()?.mean_all()?)?;
        let report = FitReport {
            train_mse,
            validation_mse: best.0,
            validation_mse_of_mean: mean_val,
            best_step: best.1,
            settings: opts,
        };
        Ok((map, report))
    }

    /// `fit` with each of `grid`'s settings; the lowest validation error wins.
    pub fn fit_best(
        train: (&[Vec<f32>], &[Vec<f32>]),
        validation: (&[Vec<f32>], &[Vec<f32>]),
        grid: &[LinearFit],
    ) -> Result<(Self, FitReport)> {
        let mut best: Option<(Self, FitReport)> = None;
        for &opts in grid {
            let fit = Self::fit(train, validation, opts)?;
            if best
                .as_ref()
                .is_none_or(|b| fit.1.validation_mse < b.1.validation_mse)
            {
                best = Some(fit);
            }
        }
        best.context("no predictor settings to try")
    }

    /// The prediction for `x`, in the targets' own units.
    pub fn predict(&self, x: &[f32]) -> Result<Vec<f32>> {
        let xs = standardised(&[x.to_vec()], &self.x_mean, &self.x_std, &Device::Cpu)?;
        let z: Vec<f32> = xs
            .matmul(&self.w)?
            .broadcast_add(&self.b)?
            .flatten_all()?
            .to_vec1()?;
        Ok(z.iter()
            .zip(&self.y_mean)
            .zip(&self.y_std)
            .map(|((z, m), s)| m + s * z)
            .collect())
    }

    /// Trained scalars (weights and biases).
    pub fn parameters(&self) -> usize {
        self.w.elem_count() + self.b.elem_count()
    }
}

/// The artifact holding a shadow plan's predictor.
pub const PREDICTOR_ARTIFACT: &str = "predictor";

/// The trained predictor and how its neurons share a group's score.
#[derive(Debug, Clone)]
pub struct Predictor {
    pub map: Linear,
    /// Each neuron's share of its group in the calibration (static) scores.
    shares: Vec<Vec<f64>>,
    n_heads: usize,
    groups: usize,
}

/// Where a training sequence's features are read: its prompt's last token.
fn prompt_end(seq: &Sequence) -> usize {
    seq.scored_from.clamp(1, seq.ids.len()) - 1
}

/// Where a held-out window's features are read: the end of its prefix.
pub fn window_prefix_end(window: &[u32]) -> usize {
    PREFIX_TOKENS.min(window.len()) - 1
}

impl Predictor {
    /// Trains on `calib` (every fourth sequence validates) with each of
    /// `grid`'s settings, keeping the best on validation, with neurons
    /// sharing their group's score as in `static_scores`.
    pub fn train(
        model: &Model,
        calib: &TokenSet,
        static_scores: &UnitScores,
        grid: &[LinearFit],
        cancel: &AtomicBool,
    ) -> Result<(Self, FitReport)> {
        let base = Plan::base();
        let (mut xt, mut yt, mut xv, mut yv) = (vec![], vec![], vec![], vec![]);
        for (i, seq) in calib.sequences.iter().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                bail!("cancelled");
            }
            let x = features(model, &seq.ids, prompt_end(seq))?;
            let y = targets(&sequence_scores(model, seq, &base)?.0);
            if i % 4 == 3 {
                xv.push(x);
                yv.push(y);
            } else {
                xt.push(x);
                yt.push(y);
            }
        }
        let (map, report) = Linear::fit_best((&xt, &yt), (&xv, &yv), grid)?;
        let shares = static_scores
            .neurons
            .iter()
            .map(|layer| {
                layer
                    .chunks(NEURON_GROUP)
                    .flat_map(|g| {
                        let total: f64 = g.iter().sum();
                        // At f32 precision, as the plan artifact stores them.
                        g.iter().map(move |&s| {
                            let share = if total > 0.0 {
                                s / total
                            } else {
                                1.0 / g.len() as f64
                            };
                            f64::from(share as f32)
                        })
                    })
                    .collect()
            })
            .collect();
        let predictor = Self {
            map,
            shares,
            n_heads: model.cfg().n_heads,
            groups: groups_per_layer(model),
        };
        Ok((predictor, report))
    }

    /// The predictor as named f32 tensors (a plan artifact's contents).
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let dev = Device::Cpu;
        let v = |x: &[f32]| Tensor::new(x, &dev);
        let shares: Vec<f32> = self.shares.iter().flatten().map(|&s| s as f32).collect();
        let (l, i) = (self.shares.len(), self.shares[0].len());
        let m = &self.map;
        Ok(vec![
            ("shadow.w".into(), m.w.clone()),
            ("shadow.b".into(), m.b.clone()),
            ("shadow.x_mean".into(), v(&m.x_mean)?),
            ("shadow.x_std".into(), v(&m.x_std)?),
            ("shadow.y_mean".into(), v(&m.y_mean)?),
            ("shadow.y_std".into(), v(&m.y_std)?),
            (
                "shadow.shares".into(),
                Tensor::from_vec(shares, (l, i), &dev)?,
            ),
        ])
    }

    /// The predictor in `tensors`, checked against `model`'s shapes.
    pub fn from_tensors(tensors: &HashMap<String, Tensor>, model: &Model) -> Result<Self> {
        let cfg = model.cfg();
        let (d_in, l, h, i) = (
            cfg.hidden_size,
            cfg.n_layers,
            cfg.n_heads,
            cfg.intermediate_size,
        );
        let groups = groups_per_layer(model);
        let d_out = l * (h + groups);
        let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = tensors.get(name).with_context(|| {
                format!("the predictor artifact has no `{name}`: it was not written by `scalpel sparsify --method shadow`")
            })?;
            if t.dims() != shape {
                bail!(
                    "`{name}` has shape {:?}, this model needs {shape:?}: the predictor was trained for another model",
                    t.dims()
                );
            }
            Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
        };
        let vec = |name: &str, n: usize| -> Result<Vec<f32>> { Ok(get(name, &[n])?.to_vec1()?) };
        let shares: Vec<Vec<f32>> = get("shadow.shares", &[l, i])?.to_vec2()?;
        let map = Linear {
            x_mean: vec("shadow.x_mean", d_in)?,
            x_std: vec("shadow.x_std", d_in)?,
            y_mean: vec("shadow.y_mean", d_out)?,
            y_std: vec("shadow.y_std", d_out)?,
            w: get("shadow.w", &[d_in, d_out])?,
            b: get("shadow.b", &[d_out])?,
        };
        Ok(Self {
            map,
            shares: shares
                .into_iter()
                .map(|l| l.into_iter().map(f64::from).collect())
                .collect(),
            n_heads: h,
            groups,
        })
    }

    /// Predicted scores for a sequence whose prompt ends at `position`.
    pub fn scores(&self, model: &Model, ids: &[u32], position: usize) -> Result<UnitScores> {
        let log = self.map.predict(&features(model, ids, position)?)?;
        let n_layers = self.shares.len();
        let (heads, groups) = log.split_at(n_layers * self.n_heads);
        let heads = heads
            .chunks(self.n_heads)
            .map(|l| l.iter().map(|&v| (v as f64).exp()).collect())
            .collect();
        let neurons = groups
            .chunks(self.groups)
            .zip(&self.shares)
            .map(|(g, shares)| {
                shares
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (g[i / NEURON_GROUP] as f64).exp() * s)
                    .collect()
            })
            .collect();
        Ok(UnitScores { heads, neurons })
    }
}

/// Spearman's rank correlation (ties share their mean rank).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut order: Vec<usize> = (0..v.len()).collect();
        order.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < order.len() {
            let mut j = i;
            while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
                j += 1;
            }
            let mean_rank = (i + j) as f64 / 2.0;
            for &k in &order[i..=j] {
                r[k] = mean_rank;
            }
            i = j + 1;
        }
        r
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    if va == 0.0 || vb == 0.0 {
        return 0.0;
    }
    cov / (va * vb).sqrt()
}

/// Rank agreement of `predicted` with `truth`: over all heads, and over all
/// neuron groups (group sums).
pub fn rank_agreement(predicted: &UnitScores, truth: &UnitScores) -> (f64, f64) {
    let heads = |s: &UnitScores| s.heads.iter().flatten().copied().collect::<Vec<_>>();
    let groups = |s: &UnitScores| {
        s.neurons
            .iter()
            .flat_map(|l| l.chunks(NEURON_GROUP).map(|g| g.iter().sum::<f64>()))
            .collect::<Vec<_>>()
    };
    (
        spearman(&heads(predicted), &heads(truth)),
        spearman(&groups(predicted), &groups(truth)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_of_known_rankings() {
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), 1.0);
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), -1.0);
        assert!((spearman(&[1.0, 2.0, 3.0], &[1.0, 3.0, 2.0]) - 0.5).abs() < 1e-12);
        // Ties share their mean rank: ranks (0.5, 0.5, 2) against (0, 1, 2).
        let r = spearman(&[1.0, 1.0, 2.0], &[1.0, 2.0, 3.0]);
        assert!((r - 0.866_025_403_784_438_6).abs() < 1e-12, "{r}");
    }

    #[test]
    fn the_linear_fit_recovers_a_planted_map() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (d_in, d_out) = (8, 5);
        let m: Vec<Vec<f32>> = (0..d_out)
            .map(|_| (0..d_in).map(|_| rng.random_range(-1.0..1.0)).collect())
            .collect();
        let mut sample = |n: usize| {
            let xs: Vec<Vec<f32>> = (0..n)
                .map(|_| (0..d_in).map(|_| rng.random_range(-2.0..2.0)).collect())
                .collect();
            let ys = xs
                .iter()
                .map(|x| {
                    m.iter()
                        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum::<f32>() + 3.0)
                        .collect()
                })
                .collect::<Vec<Vec<f32>>>();
            (xs, ys)
        };
        let (xt, yt) = sample(60);
        let (xv, yv) = sample(20);
        let opts = LinearFit {
            steps: 400,
            lr: 3e-2,
            l2: 0.0,
        };
        let (map, report) = Linear::fit((&xt, &yt), (&xv, &yv), opts).unwrap();
        assert!(
            report.validation_mse < 0.01 * report.validation_mse_of_mean,
            "{report:?}"
        );
        assert!(report.best_step > 0);
        let y = map.predict(&xv[0]).unwrap();
        let worst = y
            .iter()
            .zip(&yv[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 0.2, "prediction off by {worst}");
        assert_eq!(map.parameters(), d_in * d_out + d_out);
    }
}
