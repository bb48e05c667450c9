//! The losses that importance, fitting and search minimise, and the held-out
//! measurements every method is judged by. Only scored positions (answer
//! tokens) produce logits, in chunks so a 49k vocabulary stays small. Every
//! number reported (`mean_loss`, `measure`) is scored by `eval::score`, as
//! `eval` scores; the fit's differentiable loss (`sequence_loss`) is the one
//! tensor expression of its own, since it needs gradients.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use crate::eval::data::{Sequence, TokenSet};
use crate::eval::score::{score_rows, Reference, Scores, LOGIT_CHUNK};
use crate::model::{Model, ParamSource, Pass, RunOptions};
use crate::plan::Plan;

/// What a fit minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Cross-entropy on the data's tokens (the reference: the base model's greedy answers).
    Ce,
    /// KL(base ‖ plan) over the full next-token distribution (distillation).
    Kl,
}

impl LossKind {
    /// This loss's mean per scored token, from the scores of a set.
    pub fn mean(self, scores: &Scores) -> f64 {
        match self {
            LossKind::Ce => scores.mean_nll(),
            LossKind::Kl => scores.mean_kl(),
        }
    }
}

impl std::fmt::Display for LossKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LossKind::Ce => "ce",
            LossKind::Kl => "kl",
        })
    }
}

/// The base model's final-normed hidden states at each sequence's scored
/// positions: base logits are one head matmul away, so KL needs no second
/// full forward and no vocabulary-sized cache.
pub struct BaseStates {
    pub hidden: Vec<Tensor>,
}

impl BaseStates {
    /// The states a loss needs: computed for KL, `None` for cross-entropy.
    pub fn for_loss(
        model: &Model,
        kind: LossKind,
        data: &TokenSet,
        cancel: &AtomicBool,
    ) -> Result<Option<Self>> {
        match kind {
            LossKind::Kl => Self::compute(model, data, cancel).map(Some),
            LossKind::Ce => Ok(None),
        }
    }

    pub fn compute(model: &Model, data: &TokenSet, cancel: &AtomicBool) -> Result<Self> {
        let base = Plan::base();
        let mut hidden = Vec::with_capacity(data.sequences.len());
        for seq in &data.sequences {
            if cancel.load(Ordering::Relaxed) {
                bail!("cancelled");
            }
            let h = forward_full(model, seq, &base, &base, RunOptions::FAST)?;
            hidden.push(scored_rows(&h, seq)?);
        }
        Ok(Self { hidden })
    }
}

/// Token ids of a sequence as a (1, t) tensor.
pub fn input_ids(model: &Model, seq: &Sequence) -> Result<Tensor> {
    Ok(Tensor::new(seq.ids.as_slice(), model.device())?.unsqueeze(0)?)
}

/// Final-normed hidden states (t, h) of a whole sequence under a plan, its
/// parameters from `params` (the plan itself for its constant scales).
pub fn forward_full(
    model: &Model,
    seq: &Sequence,
    plan: &Plan,
    params: &dyn ParamSource,
    run: RunOptions,
) -> Result<Tensor> {
    let x = model.transformer.embed_tokens(&input_ids(model, seq)?)?;
    forward_from(model, x, 0, plan, params, run)
}

/// Final-normed hidden states (t, h) from the residual stream `x` entering layer `from`.
pub fn forward_from(
    model: &Model,
    x: Tensor,
    from: usize,
    plan: &Plan,
    params: &dyn ParamSource,
    run: RunOptions,
) -> Result<Tensor> {
    let t = &model.transformer;
    let mut pass = Pass::plan(plan, run).with_params(params);
    let x = t.run_layers(x, from..t.n_layers(), &mut pass)?;
    Ok(t.final_norm(&x, run)?.squeeze(0)?)
}

/// The rows of `hidden` (t, h) that predict the scored tokens.
pub fn scored_rows(hidden: &Tensor, seq: &Sequence) -> Result<Tensor> {
    Ok(hidden.narrow(0, seq.scored_from - 1, seq.scored())?)
}

/// The scored tokens of a sequence, in the order of `scored_rows`.
pub fn scored_targets(seq: &Sequence) -> &[u32] {
    &seq.ids[seq.scored_from..]
}

/// NLL, and KL and agreement against `base` when given, of one sequence from
/// its final-normed hidden states (t, h) under a plan: the scorer `eval` uses.
pub fn score_sequence(
    model: &Model,
    seq: &Sequence,
    hidden: &Tensor,
    base: Option<Reference>,
    run: RunOptions,
) -> Result<Scores> {
    score_rows(
        model,
        &scored_rows(hidden, seq)?,
        base,
        scored_targets(seq),
        run,
    )
}

/// The base model's log-probabilities at a sequence's scored positions, one
/// tensor per logits chunk (the differentiable KL loss's target).
pub fn base_log_probs(model: &Model, base_rows: &Tensor) -> Result<Vec<Tensor>> {
    let n = base_rows.dim(0)?;
    (0..n)
        .step_by(LOGIT_CHUNK)
        .map(|start| {
            let len = LOGIT_CHUNK.min(n - start);
            let logits = model
                .transformer
                .logits(&base_rows.narrow(0, start, len)?, RunOptions::FAST)?;
            Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
        })
        .collect()
}

/// Sum over the scored tokens of one sequence of the loss (a scalar tensor
/// that carries gradients when `hidden` does). `base` is needed for KL.
pub fn sequence_loss(
    model: &Model,
    seq: &Sequence,
    hidden: &Tensor,
    base: Option<&Tensor>,
    kind: LossKind,
    run: RunOptions,
) -> Result<Tensor> {
    let base_logp = match (kind, base) {
        (LossKind::Kl, Some(b)) => Some(base_log_probs(model, b)?),
        (LossKind::Kl, None) => bail!("the KL loss needs the base model's states"),
        (LossKind::Ce, _) => None,
    };
    sequence_loss_with(model, seq, hidden, base_logp.as_deref(), kind, run)
}

/// `sequence_loss` with the base log-probabilities already computed.
pub fn sequence_loss_with(
    model: &Model,
    seq: &Sequence,
    hidden: &Tensor,
    base_logp: Option<&[Tensor]>,
    kind: LossKind,
    run: RunOptions,
) -> Result<Tensor> {
    let rows = scored_rows(hidden, seq)?;
    let n = seq.scored();
    let mut total: Option<Tensor> = None;
    for (chunk, start) in (0..n).step_by(LOGIT_CHUNK).enumerate() {
        let len = LOGIT_CHUNK.min(n - start);
        let logq = candle_nn::ops::log_softmax(
            &model
                .transformer
                .logits(&rows.narrow(0, start, len)?, run)?,
            D::Minus1,
        )?;
        let part = match kind {
            LossKind::Ce => {
                let from = seq.scored_from + start;
                let targets = Tensor::new(&seq.ids[from..from + len], model.device())?;
                logq.gather(&targets.unsqueeze(1)?, 1)?.sum_all()?.neg()?
            }
            LossKind::Kl => {
                let Some(logp) = base_logp.and_then(|b| b.get(chunk)) else {
                    bail!("the KL loss needs the base model's states");
                };
                (logp.exp()? * (logp - logq)?)?.sum_all()?
            }
        };
        total = Some(match total {
            Some(t) => (t + part)?,
            None => part,
        });
    }
    total.ok_or_else(|| anyhow::anyhow!("a sequence with no scored tokens"))
}

/// The residual stream entering every layer of every sequence of a set under
/// one plan: a change at layer `i` or later reruns only layers `i..`.
pub struct LayerInputs {
    /// `[sequence][layer]`, each (1, t, h).
    per_sequence: Vec<Vec<Tensor>>,
}

impl LayerInputs {
    pub fn compute(
        model: &Model,
        data: &TokenSet,
        plan: &Plan,
        cancel: &AtomicBool,
    ) -> Result<Self> {
        let t = &model.transformer;
        let run = RunOptions::FAST;
        let mut per_sequence = Vec::with_capacity(data.sequences.len());
        for seq in &data.sequences {
            if cancel.load(Ordering::Relaxed) {
                bail!("cancelled");
            }
            let mut inputs = Vec::with_capacity(t.n_layers());
            let mut x = t.embed_tokens(&input_ids(model, seq)?)?;
            for i in 0..t.n_layers() {
                inputs.push(x.clone());
                x = t.run_layers(x, i..i + 1, &mut Pass::plan(plan, run))?;
            }
            per_sequence.push(inputs);
        }
        Ok(Self { per_sequence })
    }

    /// The residual stream entering `layer` in sequence `seq`.
    pub fn get(&self, seq: usize, layer: usize) -> Result<Tensor> {
        self.per_sequence
            .get(seq)
            .and_then(|s| s.get(layer))
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no cached input for sequence {seq}, layer {layer}"))
    }
}

/// Where a forward pass starts: the embeddings, or cached inputs to a layer
/// (valid while the plan and scales of the layers before it are unchanged).
#[derive(Clone, Copy)]
pub enum Start<'a> {
    Embeddings,
    Layer(usize, &'a LayerInputs),
}

impl Start<'_> {
    /// Final-normed hidden states (t, h) of sequence `index` from this start.
    pub fn forward(
        self,
        model: &Model,
        seq: &Sequence,
        index: usize,
        plan: &Plan,
        params: &dyn ParamSource,
        run: RunOptions,
    ) -> Result<Tensor> {
        match self {
            Start::Embeddings => forward_full(model, seq, plan, params, run),
            Start::Layer(layer, inputs) => {
                forward_from(model, inputs.get(index, layer)?, layer, plan, params, run)
            }
        }
    }
}

/// Mean loss per scored token of a plan (constant scales) over a set.
pub fn mean_loss(
    model: &Model,
    data: &TokenSet,
    base: Option<&BaseStates>,
    plan: &Plan,
    kind: LossKind,
    cancel: &AtomicBool,
) -> Result<f64> {
    mean_loss_from(model, data, base, plan, kind, Start::Embeddings, cancel)
}

/// `mean_loss` from a given start.
pub fn mean_loss_from(
    model: &Model,
    data: &TokenSet,
    base: Option<&BaseStates>,
    plan: &Plan,
    kind: LossKind,
    start: Start,
    cancel: &AtomicBool,
) -> Result<f64> {
    mean_loss_with(model, data, base, plan, plan, kind, start, cancel)
}

/// `mean_loss_from` with the plan's parameters from `params` (trained ones).
#[allow(clippy::too_many_arguments)]
pub fn mean_loss_with(
    model: &Model,
    data: &TokenSet,
    base: Option<&BaseStates>,
    plan: &Plan,
    params: &dyn ParamSource,
    kind: LossKind,
    start: Start,
    cancel: &AtomicBool,
) -> Result<f64> {
    if kind == LossKind::Kl && base.is_none() {
        bail!("the KL loss needs the base model's states");
    }
    let mut scores = Scores::default();
    for (i, seq) in data.sequences.iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            bail!("cancelled");
        }
        let h = start.forward(model, seq, i, plan, params, RunOptions::FAST)?;
        // Cross-entropy needs no base logits.
        let b = match kind {
            LossKind::Kl => base.map(|b| Reference::Hidden(&b.hidden[i])),
            LossKind::Ce => None,
        };
        scores.add(&score_sequence(model, seq, &h, b, RunOptions::FAST)?);
    }
    Ok(kind.mean(&scores))
}

/// The calibration split a training job reads (the part it trains on and
/// the part that picks its best epoch), with the base model's states.
pub struct TrainingData<'a> {
    pub train: &'a TokenSet,
    pub train_base: &'a BaseStates,
    pub validation: &'a TokenSet,
    pub validation_base: &'a BaseStates,
}

/// A plan's quality on a set: perplexity of the set's tokens, KL(base ‖ plan)
/// and top-1 agreement with the base model, over the scored tokens.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SetReport {
    pub perplexity: f64,
    pub kl_to_base: f64,
    pub top1_agreement: f64,
    pub scored_tokens: usize,
}

pub fn measure(
    model: &Model,
    data: &TokenSet,
    base: &BaseStates,
    plan: &Plan,
    cancel: &AtomicBool,
) -> Result<SetReport> {
    let run = RunOptions::FAST;
    let mut scores = Scores::default();
    for (i, seq) in data.sequences.iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            bail!("cancelled");
        }
        let h = forward_full(model, seq, plan, plan, run)?;
        let b = Reference::Hidden(&base.hidden[i]);
        scores.add(&score_sequence(model, seq, &h, Some(b), run)?);
    }
    Ok(SetReport {
        perplexity: scores.mean_nll().exp(),
        kl_to_base: scores.mean_kl(),
        top1_agreement: scores.agreement(),
        scored_tokens: scores.scored,
    })
}
