//! Head and neuron masks at a sparsity level, and the policy that executes
//! them: a layer whose heads (neurons) are all kept runs `Full`; otherwise
//! `AttnExec::Heads` / `MlpExec::Neurons` with the kept ones (sliced
//! weights: the dropped heads' q rows and o columns, the dropped neurons'
//! gate/up rows and down columns are not multiplied).
//!
//! The split is per layer (every layer drops round(p·heads) of its query
//! heads, at least one kept, and round(p·neurons) of its neurons, the
//! lowest-scored ones) or global (the lowest-scored p of all heads, and of
//! all neurons, across layers; at least one of each kept per layer). K/V projections are never dropped (GQA: a KV head is
//! shared by its query heads).

use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::scores::UnitScores;
use crate::model::{AttnExec, LayerPolicy, MlpExec, ModelConfig};
use crate::plan::Plan;

/// Refuses a level outside [0, 1).
pub fn check_level(level: f64) -> Result<()> {
    if !(0.0..1.0).contains(&level) {
        bail!("sparsity level {level} is outside [0, 1): give the fraction of heads/neurons/channels to drop, e.g. 0.4");
    }
    Ok(())
}

/// How a level is spread over the layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    PerLayer,
    Global,
}

impl std::str::FromStr for Split {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "per-layer" => Ok(Split::PerLayer),
            "global" => Ok(Split::Global),
            other => bail!("unknown split `{other}`: expected per-layer or global"),
        }
    }
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::PerLayer => "per-layer",
            Split::Global => "global",
        }
    }
}

/// Kept indices per layer when the lowest `level` of all scores, across
/// layers, are dropped (at least one kept per layer).
fn keep_global(lists: &[Vec<f64>], level: f64) -> Vec<Vec<u32>> {
    let total: usize = lists.iter().map(Vec::len).sum();
    let target = (level * total as f64).round() as usize;
    let mut all: Vec<(f64, usize, usize)> = lists
        .iter()
        .enumerate()
        .flat_map(|(l, v)| v.iter().enumerate().map(move |(i, &s)| (s, l, i)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2)));
    let mut drop: Vec<Vec<bool>> = lists.iter().map(|v| vec![false; v.len()]).collect();
    let mut left: Vec<usize> = lists.iter().map(Vec::len).collect();
    let mut done = 0;
    for (_, l, i) in all {
        if done == target {
            break;
        }
        if left[l] > 1 {
            drop[l][i] = true;
            left[l] -= 1;
            done += 1;
        }
    }
    drop.iter()
        .map(|d| (0..d.len() as u32).filter(|&i| !d[i as usize]).collect())
        .collect()
}

/// The heads and neurons each layer keeps, increasing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitMask {
    pub heads: Vec<Vec<u32>>,
    pub neurons: Vec<Vec<u32>>,
}

/// Indices of the `n - drop` highest of `scores`, increasing (ties: lower index kept).
fn keep_highest(scores: &[f64], drop: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    order.sort_by(|&a, &b| {
        scores[a as usize]
            .total_cmp(&scores[b as usize])
            .then(b.cmp(&a))
    });
    let mut kept = order[drop.min(scores.len())..].to_vec();
    kept.sort_unstable();
    kept
}

fn dropped(n: usize, level: f64, keep_one: bool) -> usize {
    let d = (level * n as f64).round() as usize;
    if keep_one {
        d.min(n.saturating_sub(1))
    } else {
        d.min(n)
    }
}

impl UnitMask {
    /// Every layer drops its lowest-scored fraction `level` of heads and neurons.
    pub fn from_scores(scores: &UnitScores, level: f64) -> Result<Self> {
        check_level(level)?;
        Ok(Self {
            heads: scores
                .heads
                .iter()
                .map(|s| keep_highest(s, dropped(s.len(), level, true)))
                .collect(),
            neurons: scores
                .neurons
                .iter()
                .map(|s| keep_highest(s, dropped(s.len(), level, true)))
                .collect(),
        })
    }

    /// `from_scores` (per layer) or the global split.
    pub fn with_split(scores: &UnitScores, level: f64, split: Split) -> Result<Self> {
        match split {
            Split::PerLayer => Self::from_scores(scores, level),
            Split::Global => {
                check_level(level)?;
                Ok(Self {
                    heads: keep_global(&scores.heads, level),
                    neurons: keep_global(&scores.neurons, level),
                })
            }
        }
    }

    /// Refuses a mask for another model shape or with indices out of range.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        let fits = |lists: &[Vec<u32>], n: usize| {
            lists.len() == cfg.n_layers
                && lists.iter().all(|l| {
                    !l.is_empty()
                        && l.windows(2).all(|w| w[0] < w[1])
                        && l.last().is_some_and(|&x| (x as usize) < n)
                })
        };
        if !fits(&self.heads, cfg.n_heads) || !fits(&self.neurons, cfg.intermediate_size) {
            bail!(
                "the sparsity mask does not fit this model ({} layers of {} heads and {} neurons): \
                 it was made for another model; run `scalpel sparsify` on this one",
                cfg.n_layers,
                cfg.n_heads,
                cfg.intermediate_size
            );
        }
        Ok(())
    }

    /// Fraction of query heads and of neurons dropped, over the model.
    pub fn dropped_fractions(&self, cfg: &ModelConfig) -> (f64, f64) {
        let kept = |l: &[Vec<u32>]| l.iter().map(Vec::len).sum::<usize>() as f64;
        let n = cfg.n_layers as f64;
        (
            1.0 - kept(&self.heads) / (n * cfg.n_heads as f64),
            1.0 - kept(&self.neurons) / (n * cfg.intermediate_size as f64),
        )
    }

    /// Fraction of the layers' projection weights not read (q/o rows and
    /// columns of dropped heads, gate/up/down of dropped neurons; k/v
    /// always read).
    pub fn weight_fraction_dropped(&self, cfg: &ModelConfig) -> f64 {
        let (h, f) = (cfg.hidden_size as f64, cfg.intermediate_size as f64);
        let (hd, nh, nkv) = (
            cfg.head_dim as f64,
            cfg.n_heads as f64,
            cfg.n_kv_heads as f64,
        );
        let per_layer = 2.0 * h * nh * hd + 2.0 * h * nkv * hd + 3.0 * h * f;
        let (dh, dn) = self.dropped_fractions(cfg);
        (dh * 2.0 * h * nh * hd + dn * 3.0 * h * f) / per_layer
    }
}

/// Executes a mask under a plan's block skips.
pub struct MaskPolicy<'a> {
    plan: &'a Plan,
    mask: &'a UnitMask,
    n_heads: usize,
    n_neurons: usize,
}

impl<'a> MaskPolicy<'a> {
    pub fn new(plan: &'a Plan, mask: &'a UnitMask, cfg: &ModelConfig) -> Result<Self> {
        mask.check(cfg)?;
        Ok(Self {
            plan,
            mask,
            n_heads: cfg.n_heads,
            n_neurons: cfg.intermediate_size,
        })
    }
}

impl LayerPolicy for MaskPolicy<'_> {
    fn attn(&self, layer: usize, x: &Tensor) -> candle_core::Result<AttnExec> {
        let heads = &self.mask.heads[layer];
        Ok(match self.plan.attn(layer, x)? {
            AttnExec::Full if heads.len() < self.n_heads => AttnExec::Heads(heads.clone()),
            e => e,
        })
    }

    fn mlp(&self, layer: usize, x: &Tensor) -> candle_core::Result<MlpExec> {
        let neurons = &self.mask.neurons[layer];
        Ok(match self.plan.mlp(layer, x)? {
            MlpExec::Full if neurons.len() < self.n_neurons => MlpExec::Neurons(neurons.clone()),
            e => e,
        })
    }
}
