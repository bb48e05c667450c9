//! Training-free activation sparsity, decided per token at every one of a
//! layer's seven projections: an input channel is zeroed when its score is
//! below the projection's threshold.
//! - TEAL: score |x_i|; thresholds are the level-quantiles of |x| on the
//!   calibration data (uniform level for every projection: TEAL's greedy
//!   per-layer budget allocation is not done);
//! - WINA: score |x_i|·‖W[:, i]‖₂ (the column norm of the projection's
//!   weight), thresholds likewise from the calibration distribution.
//!
//! Simulated (`ChannelProbe::new`): the zeroed channels are masked and the
//! matmul still reads every weight column, which changes quality, not
//! speed. Executed (`ChannelProbe::executed`): at a one-row decode step the
//! probe computes each projection itself with `kernels::sparse_input` on a
//! column-major f32 copy of the weights (`ColumnWeights`), reading only
//! the kept channels' columns; rows of a prefill are still masked.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::Sparsifier;
use crate::eval::data::TokenSet;
use crate::kernels::sparse_input::ColumnMajor;
use crate::model::{Model, Pass, Probe, ProbeSource, Projection, RunOptions};
use crate::plan::Plan;
use crate::surgery::objective::input_ids;

/// How channels are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Criterion {
    Teal,
    Wina,
}

/// The four distinct projection inputs of a layer: q/k/v read the normed
/// residual, o the heads' context, gate/up the normed residual, down the
/// intermediate activation.
fn input_slot(p: Projection) -> usize {
    match p {
        Projection::Q | Projection::K | Projection::V => 0,
        Projection::O => 1,
        Projection::Gate | Projection::Up => 2,
        Projection::Down => 3,
    }
}

/// Rows of every projection input, sampled from calibration passes:
/// `rows[layer][slot]` is (sampled tokens × channels), flattened.
pub struct ActivationSamples {
    rows: Vec<[Vec<f32>; 4]>,
    dims: Vec<[usize; 4]>,
}

/// Most token rows kept per projection input.
const MAX_SAMPLED_ROWS: usize = 512;

struct SampleProbe<'a> {
    samples: &'a mut ActivationSamples,
    stride: usize,
}

impl Probe for SampleProbe<'_> {
    fn wants_projection_inputs(&self, _layer: usize) -> bool {
        true
    }

    fn projection_input(
        &mut self,
        layer: usize,
        proj: Projection,
        x: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if !matches!(
            proj,
            Projection::Q | Projection::O | Projection::Gate | Projection::Down
        ) {
            return Ok(None);
        }
        let slot = input_slot(proj);
        let d = x.dim(2)?;
        let rows = x.flatten_to(1)?;
        let n = rows.dim(0)?;
        let picked: Vec<u32> = (0..n as u32).step_by(self.stride).collect();
        let idx = Tensor::new(picked.as_slice(), x.device())?;
        let v = rows
            .index_select(&idx, 0)?
            .abs()?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        self.samples.dims[layer][slot] = d;
        self.samples.rows[layer][slot].extend(v);
        Ok(None)
    }
}

impl ActivationSamples {
    /// |x| of every projection input over `data`, base model, a strided
    /// subsample of tokens (at most `MAX_SAMPLED_ROWS` per input).
    pub fn collect(model: &Model, data: &TokenSet, cancel: &AtomicBool) -> Result<Self> {
        let n = model.n_layers();
        let mut samples = Self {
            rows: (0..n).map(|_| Default::default()).collect(),
            dims: vec![[0; 4]; n],
        };
        let stride = data.total_tokens().div_ceil(MAX_SAMPLED_ROWS).max(1);
        let plan = Plan::base();
        for seq in &data.sequences {
            if cancel.load(Ordering::Relaxed) {
                bail!("activation calibration cancelled");
            }
            let mut probe = SampleProbe {
                samples: &mut samples,
                stride,
            };
            let mut pass = Pass::plan(&plan, RunOptions::FAST).with_probe(&mut probe);
            model
                .transformer
                .forward_hidden(&input_ids(model, seq)?, &mut pass)?;
        }
        Ok(samples)
    }
}

/// ‖W[:, i]‖₂ of every projection's input channels, `[layer][projection]`.
pub struct ColumnNorms(Vec<[Tensor; 7]>);

impl ColumnNorms {
    pub fn of(model: &Model) -> Result<Self> {
        let dtype = model.transformer.dtype;
        let layers = model
            .transformer
            .layers
            .iter()
            .map(|l| {
                let norms: Vec<Tensor> = l
                    .projections()
                    .iter()
                    .map(|lin| {
                        let w = lin.dense_weight()?.to_dtype(DType::F32)?;
                        Ok(w.sqr()?.sum(0)?.sqrt()?.to_dtype(dtype)?)
                    })
                    .collect::<Result<_>>()?;
                Ok(norms.try_into().expect("seven projections"))
            })
            .collect::<Result<_>>()?;
        Ok(Self(layers))
    }

    fn get(&self, layer: usize, p: Projection) -> &Tensor {
        &self.0[layer][p.index()]
    }
}

/// One threshold per layer and projection (in `Projection::ALL` order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelThresholds {
    pub criterion: Criterion,
    pub level: f64,
    pub layers: Vec<[f32; 7]>,
}

/// Thresholds at each of `levels` (a `ChannelThresholds` per level): the
/// level-quantile of the criterion's score over the sampled channels.
pub fn thresholds(
    samples: &ActivationSamples,
    norms: Option<&ColumnNorms>,
    criterion: Criterion,
    levels: &[f64],
) -> Result<Vec<ChannelThresholds>> {
    for &l in levels {
        super::masks::check_level(l)?;
    }
    let wina = match (criterion, norms) {
        (Criterion::Wina, Some(n)) => Some(n),
        (Criterion::Wina, None) => bail!("WINA thresholds need the column norms"),
        (Criterion::Teal, _) => None,
    };
    let n = samples.rows.len();
    let mut out: Vec<ChannelThresholds> = levels
        .iter()
        .map(|&level| ChannelThresholds {
            criterion,
            level,
            layers: vec![[0.0; 7]; n],
        })
        .collect();
    for layer in 0..n {
        for p in Projection::ALL {
            let slot = input_slot(p);
            let (rows, d) = (&samples.rows[layer][slot], samples.dims[layer][slot]);
            if rows.is_empty() || d == 0 {
                bail!(
                    "no calibration activations for layer {layer} {p:?} (was that block skipped?)"
                );
            }
            let mut scores: Vec<f32> = match wina {
                Some(norms) => {
                    let c = norms.get(layer, p).to_dtype(DType::F32)?.to_vec1::<f32>()?;
                    if c.len() != d {
                        bail!(
                            "layer {layer} {p:?}: {} column norms for {d} channels",
                            c.len()
                        );
                    }
                    rows.iter().enumerate().map(|(i, x)| x * c[i % d]).collect()
                }
                None => rows.clone(),
            };
            scores.sort_unstable_by(f32::total_cmp);
            for t in out.iter_mut() {
                let at = ((t.level * scores.len() as f64) as usize).min(scores.len() - 1);
                // Level 0 zeroes nothing (no score is below 0).
                t.layers[layer][p.index()] = if t.level == 0.0 { 0.0 } else { scores[at] };
            }
        }
    }
    Ok(out)
}

/// Every projection's weight stored by input channel, `[layer][projection]`,
/// and WINA's column norms as plain vectors (when made with them): what the
/// executed kernel reads.
pub struct ColumnWeights {
    layers: Vec<[ColumnMajor; 7]>,
    /// `norms`' values, so the executed path keeps exactly the channels the
    /// masked one does.
    norms: Option<Vec<[Vec<f32>; 7]>>,
}

impl ColumnWeights {
    /// The f32 bytes a copy for `model` takes.
    pub fn bytes_for(model: &Model) -> u64 {
        let t = &model.transformer;
        t.layers
            .iter()
            .flat_map(|l| {
                l.projections()
                    .map(|lin| (lin.out_dim() * lin.in_dim() * 4) as u64)
            })
            .sum()
    }

    /// A copy of `model`'s projection weights (with WINA's `norms`, if
    /// given), refused (with the sizes) where it does not fit in the
    /// memory available.
    pub fn of(model: &Model, norms: Option<&ColumnNorms>) -> Result<Self> {
        let need = Self::bytes_for(model);
        if let Some(avail) = crate::model::memory::available()? {
            if need > avail.bytes {
                bail!(
                    "executed TEAL/WINA keeps a column-major f32 copy of the projections, {} here, \
                     and {} is available ({}): run it simulated (`eval`), or on a smaller model",
                    crate::model::memory::gib(need),
                    crate::model::memory::gib(avail.bytes),
                    avail.source
                );
            }
        }
        let layers = model
            .transformer
            .layers
            .iter()
            .map(|l| {
                let cols: Vec<ColumnMajor> = l
                    .projections()
                    .iter()
                    .map(|lin| {
                        let w = lin.dense_weight()?.to_dtype(DType::F32)?;
                        let (rows, cols) = w.dims2()?;
                        let data: Vec<f32> = w.flatten_all()?.to_vec1()?;
                        Ok(ColumnMajor::from_row_major(&data, rows, cols))
                    })
                    .collect::<Result<_>>()?;
                Ok(cols.try_into().ok().expect("seven projections"))
            })
            .collect::<Result<_>>()?;
        let norms = norms
            .map(|n| {
                n.0.iter()
                    .map(|layer| {
                        let v: Vec<Vec<f32>> = layer
                            .iter()
                            .map(|t| t.to_dtype(DType::F32)?.to_vec1())
                            .collect::<candle_core::Result<_>>()?;
                        Ok(v.try_into().expect("seven projections"))
                    })
                    .collect::<Result<_>>()
            })
            .transpose()?;
        Ok(Self { layers, norms })
    }
}

/// A fresh executed `ChannelProbe` for every pass (a TEAL/WINA draft),
/// with the column-major copy it reads.
pub struct ExecutedChannels<'a> {
    model: &'a Model,
    thresholds: &'a ChannelThresholds,
    norms: Option<&'a ColumnNorms>,
    columns: ColumnWeights,
}

impl<'a> ExecutedChannels<'a> {
    /// For a TEAL/WINA sparsifier; `None` for any other.
    pub fn of(model: &'a Model, sp: &'a Sparsifier) -> Result<Option<Self>> {
        let Sparsifier::Channels { thresholds, norms } = sp else {
            return Ok(None);
        };
        Ok(Some(Self {
            model,
            thresholds,
            norms: norms.as_deref(),
            columns: ColumnWeights::of(model, norms.as_deref())?,
        }))
    }

    /// A fresh probe, kept concrete (for its counts).
    pub fn probe(&self) -> Result<ChannelProbe<'_>> {
        ChannelProbe::executed(self.model, self.thresholds, self.norms, &self.columns)
    }
}

impl ProbeSource for ExecutedChannels<'_> {
    fn fresh(&self) -> candle_core::Result<Box<dyn Probe + '_>> {
        let p = self
            .probe()
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        Ok(Box::new(p))
    }
}

/// Zeroes, per token, the input channels scoring under the threshold, and
/// counts how many it kept.
pub struct ChannelProbe<'a> {
    thresholds: &'a ChannelThresholds,
    norms: Option<&'a ColumnNorms>,
    /// Set: one-row products run the sparse-input kernel on these.
    columns: Option<&'a ColumnWeights>,
    /// Channels seen and kept, per projection (`Projection::ALL` order).
    pub seen: [u64; 7],
    pub kept: [u64; 7],
}

impl<'a> ChannelProbe<'a> {
    pub fn new(
        model: &Model,
        thresholds: &'a ChannelThresholds,
        norms: Option<&'a ColumnNorms>,
    ) -> Result<Self> {
        if thresholds.layers.len() != model.n_layers() {
            bail!(
                "channel thresholds for {} layers on a model of {}: they were made for another model; run `scalpel sparsify` on this one",
                thresholds.layers.len(),
                model.n_layers()
            );
        }
        if thresholds.criterion == Criterion::Wina && norms.is_none() {
            bail!("WINA needs the column norms");
        }
        Ok(Self {
            thresholds,
            norms,
            columns: None,
            seen: [0; 7],
            kept: [0; 7],
        })
    }

    /// The same decisions, executed at one-row steps: each projection reads
    /// only its kept channels' weight columns in `columns` (WINA's norms
    /// come from there too, made from `norms`).
    pub fn executed(
        model: &Model,
        thresholds: &'a ChannelThresholds,
        norms: Option<&'a ColumnNorms>,
        columns: &'a ColumnWeights,
    ) -> Result<Self> {
        if columns.layers.len() != model.n_layers() {
            bail!("column weights for another model");
        }
        if thresholds.criterion == Criterion::Wina && columns.norms.is_none() {
            bail!("executed WINA needs column weights made with the column norms");
        }
        Ok(Self {
            columns: Some(columns),
            ..Self::new(model, thresholds, norms)?
        })
    }

    /// Fraction of input channels zeroed, over every projection.
    pub fn zeroed_fraction(&self) -> f64 {
        let (s, k): (u64, u64) = (self.seen.iter().sum(), self.kept.iter().sum());
        1.0 - k as f64 / s.max(1) as f64
    }
}

impl Probe for ChannelProbe<'_> {
    fn wants_projection_inputs(&self, _layer: usize) -> bool {
        true
    }

    fn project(
        &mut self,
        layer: usize,
        proj: Projection,
        dims: (usize, usize),
        x: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(columns) = self.columns else {
            return Ok(None);
        };
        let w = &columns.layers[layer][proj.index()];
        // One row of the full projection (not a head or neuron subset).
        let one_row = x.elem_count() == w.cols() && x.dim(candle_core::D::Minus1)? == w.cols();
        if dims != (w.rows(), w.cols()) || !one_row || x.dtype() != DType::F32 {
            return Ok(None);
        }
        let thr = self.thresholds.layers[layer][proj.index()];
        // WINA's norms (`executed` checked they are there).
        let norms = match self.thresholds.criterion {
            Criterion::Wina => columns.norms.as_ref().map(|n| &n[layer][proj.index()]),
            Criterion::Teal => None,
        };
        let mut xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        for (i, v) in xs.iter_mut().enumerate() {
            // The masked path's test, |x| (· ‖W col‖) ≥ threshold.
            let score = norms.map_or(v.abs(), |n| v.abs() * n[i]);
            if score < thr {
                *v = 0.0;
            }
        }
        let mut y = vec![0f32; w.rows()];
        let kept = w.matvec(&xs, &mut y);
        self.seen[proj.index()] += xs.len() as u64;
        self.kept[proj.index()] += kept as u64;
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("a row") = w.rows();
        Tensor::from_vec(y, shape, x.device()).map(Some)
    }

    fn projection_input(
        &mut self,
        layer: usize,
        proj: Projection,
        x: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let thr = self.thresholds.layers[layer][proj.index()];
        let score = match self.norms {
            Some(n) if self.thresholds.criterion == Criterion::Wina => {
                let c = n.get(layer, proj);
                if c.dim(0)? != x.dim(2)? {
                    candle_core::bail!(
                        "WINA at layer {layer} {proj:?}: {} channels, {} column norms (combined with a head/neuron subset?)",
                        x.dim(2)?,
                        c.dim(0)?
                    );
                }
                x.abs()?.broadcast_mul(c)?
            }
            _ => x.abs()?,
        };
        let keep = score.ge(f64::from(thr))?.to_dtype(x.dtype())?;
        let kept = keep.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        self.seen[proj.index()] += x.elem_count() as u64;
        self.kept[proj.index()] += kept as u64;
        (x * keep).map(Some)
    }
}
