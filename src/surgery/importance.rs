//! Per-block importance, training-free:
//! - Δloss: calibration cross-entropy with that block alone skipped (no
//!   scales) minus the base model's;
//! - block influence: 1 − cosine between the block's residual input and
//!   output (ShortGPT / LLM-Drop), averaged over every token.
//!
//! The residual stream entering each layer is cached per sequence, so the
//! skip of a block in layer i only reruns layers i.. (half a forward on
//! average). Losses are scored by `eval::score`, as `eval`'s perplexity is.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::objective::{forward_from, input_ids, score_sequence};
use crate::eval::data::TokenSet;
use crate::model::{Model, Pass, Probe, RunOptions};
use crate::plan::{BlockId, BlockKind, Plan};

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct BlockImportance {
    pub block: BlockId,
    /// Mean calibration cross-entropy increase when this block alone is skipped (nats/token).
    pub delta_loss: f64,
    /// 1 − mean cosine(input, output) of the block's residual stream.
    pub block_influence: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Importance {
    /// Two per layer, in layer order: attention then MLP.
    pub blocks: Vec<BlockImportance>,
    /// Base model's mean calibration cross-entropy.
    pub base_loss: f64,
    /// Scored tokens behind Δloss.
    pub tokens: usize,
}

impl Importance {
    pub fn get(&self, block: BlockId) -> Option<&BlockImportance> {
        self.blocks.iter().find(|b| b.block == block)
    }

    /// Blocks of `kind`, least important first by `score`.
    pub fn ranked(&self, kind: BlockKind, score: impl Fn(&BlockImportance) -> f64) -> Vec<BlockId> {
        let mut v: Vec<&BlockImportance> = self
            .blocks
            .iter()
            .filter(|b| b.block.kind == kind)
            .collect();
        v.sort_by(|a, b| score(a).total_cmp(&score(b)));
        v.into_iter().map(|b| b.block).collect()
    }
}

/// Sums 1 − cos over tokens for each block it sees.
struct InfluenceSums {
    sum: Vec<f64>,
    count: Vec<usize>,
}

fn slot(block: BlockId) -> usize {
    2 * block.layer + usize::from(block.kind == BlockKind::Mlp)
}

impl Probe for InfluenceSums {
    fn block(
        &mut self,
        block: BlockId,
        input: &Tensor,
        output: &Tensor,
    ) -> candle_core::Result<()> {
        let dot = (input * output)?.sum(D::Minus1)?;
        let ni = input.sqr()?.sum(D::Minus1)?.sqrt()?;
        let no = output.sqr()?.sum(D::Minus1)?.sqrt()?;
        let cos = (dot / (ni * no)?.affine(1.0, 1e-12)?)?.flatten_all()?;
        let n = cos.elem_count();
        let s = f64::from(
            cos.sum_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_scalar::<f32>()?,
        );
        self.sum[slot(block)] += n as f64 - s;
        self.count[slot(block)] += n;
        Ok(())
    }
}

/// Δloss and block influence for every attention and MLP block.
/// `progress(done, total)` counts sequences.
pub fn compute_importance(
    model: &Model,
    data: &TokenSet,
    cancel: &AtomicBool,
    mut progress: impl FnMut(usize, usize),
) -> Result<Importance> {
    let n = model.n_layers();
    let t = &model.transformer;
    let run = RunOptions::FAST;
    let base = Plan::base();
    let mut influence = InfluenceSums {
        sum: vec![0.0; 2 * n],
        count: vec![0; 2 * n],
    };
    let mut skipped_loss = vec![0.0f64; 2 * n];
    let mut base_loss = 0.0f64;
    for (si, seq) in data.sequences.iter().enumerate() {
        // Residual stream entering every layer, from one base pass.
        let mut inputs = Vec::with_capacity(n);
        let mut x = t.embed_tokens(&input_ids(model, seq)?)?;
        for i in 0..n {
            if cancel.load(Ordering::Relaxed) {
                bail!("importance cancelled");
            }
            inputs.push(x.clone());
            let mut pass = Pass::plan(&base, run).with_probe(&mut influence);
            x = t.run_layers(x, i..i + 1, &mut pass)?;
        }
        let h = t.final_norm(&x, run)?.squeeze(0)?;
        base_loss += score_sequence(model, seq, &h, None, run)?.nll;
        for (layer, input) in inputs.iter().enumerate() {
            for block in [BlockId::attn(layer), BlockId::mlp(layer)] {
                if cancel.load(Ordering::Relaxed) {
                    bail!("importance cancelled");
                }
                let plan = Plan::with_skips([block]);
                let h = forward_from(model, input.clone(), layer, &plan, &plan, run)?;
                skipped_loss[slot(block)] += score_sequence(model, seq, &h, None, run)?.nll;
            }
        }
        progress(si + 1, data.sequences.len());
    }
    let tokens = data.scored_tokens();
    let base_mean = base_loss / tokens as f64;
    let blocks = (0..n)
        .flat_map(|l| [BlockId::attn(l), BlockId::mlp(l)])
        .map(|block| {
            let s = slot(block);
            BlockImportance {
                block,
                delta_loss: skipped_loss[s] / tokens as f64 - base_mean,
                block_influence: influence.sum[s] / influence.count[s].max(1) as f64,
            }
        })
        .collect();
    Ok(Importance {
        blocks,
        base_loss: base_mean,
        tokens,
    })
}
