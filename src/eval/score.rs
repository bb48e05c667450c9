//! The one scorer behind every reported number: −log p(target), KL(base ‖
//! plan) and top-1 agreement per scored position, summed in f64 (the fused
//! per-row kernel on CPU f32 logits, candle ops elsewhere). `eval`, the
//! surgery commands' held-out measurements, importance Δloss, the search's
//! screening and candidate scores and the fit's held-out loss all come from
//! here; only the fit's training loss, which needs gradients, is a tensor
//! expression of its own (`surgery::objective::sequence_loss`).

use anyhow::{bail, Result};
use candle_core::{Tensor, D};

use crate::model::fused::{self, RowScore};
use crate::model::{Model, RunOptions};

/// Positions scored per logits chunk: bounds memory at chunk × vocab floats.
pub const LOGIT_CHUNK: usize = 128;

/// Sums over scored positions.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Scores {
    /// Σ −log p_plan(target), nats.
    pub nll: f64,
    /// Σ KL(base ‖ plan), nats; 0 without a base.
    pub kl: f64,
    /// Positions where the base and the plan have the same most likely token.
    pub agree: usize,
    pub scored: usize,
}

impl Scores {
    pub fn add(&mut self, other: &Scores) {
        self.nll += other.nll;
        self.kl += other.kl;
        self.agree += other.agree;
        self.scored += other.scored;
    }

    pub fn mean_nll(&self) -> f64 {
        self.nll / self.scored as f64
    }

    pub fn mean_kl(&self) -> f64 {
        self.kl / self.scored as f64
    }

    pub fn agreement(&self) -> f64 {
        self.agree as f64 / self.scored as f64
    }
}

/// The base model's side of KL and agreement, row for row with the plan's.
#[derive(Clone, Copy)]
pub enum Reference<'a> {
    /// Final-normed hidden states; their logits are computed chunk by chunk.
    Hidden(&'a Tensor),
    /// Those logits already computed by `reference_logits` (one sequence
    /// scored under many plans pays for the base's head matmul once).
    Logits(&'a [Tensor]),
}

/// Logits of hidden rows (n, h), one tensor per `LOGIT_CHUNK` rows.
pub fn reference_logits(model: &Model, rows: &Tensor, run: RunOptions) -> Result<Vec<Tensor>> {
    let n = rows.dim(0)?;
    (0..n)
        .step_by(LOGIT_CHUNK)
        .map(|start| {
            let len = LOGIT_CHUNK.min(n - start);
            Ok(model
                .transformer
                .logits(&rows.narrow(0, start, len)?, run)?)
        })
        .collect()
}

/// Scores final-normed hidden rows (n, h) of a plan, row `i` predicting
/// `targets[i]`, against the base model's rows when given.
pub fn score_rows(
    model: &Model,
    rows: &Tensor,
    base: Option<Reference>,
    targets: &[u32],
    run: RunOptions,
) -> Result<Scores> {
    let n = targets.len();
    if rows.dim(0)? != n {
        bail!(
            "scoring {} hidden rows against {n} target tokens",
            rows.dim(0)?
        );
    }
    let mut scores = Scores::default();
    for (chunk, start) in (0..n).step_by(LOGIT_CHUNK).enumerate() {
        let len = LOGIT_CHUNK.min(n - start);
        let plan_logits = model
            .transformer
            .logits(&rows.narrow(0, start, len)?, run)?;
        let base_logits = match base {
            None => None,
            Some(Reference::Hidden(h)) => {
                Some(model.transformer.logits(&h.narrow(0, start, len)?, run)?)
            }
            Some(Reference::Logits(chunks)) => match chunks.get(chunk) {
                Some(l) if l.dims() == plan_logits.dims() => Some(l.clone()),
                _ => bail!("the base logits do not cover the scored positions"),
            },
        };
        let targets = &targets[start..start + len];
        let rows = fused::with_cpu_f32(&plan_logits, |p| match &base_logits {
            Some(b) => fused::with_cpu_f32(b, |b| fused::score_rows(p, Some(b), targets)),
            None => Some(fused::score_rows(p, None, targets)),
        })
        .flatten();
        let rows = match rows {
            Some(rows) => rows,
            None => score_rows_with_candle(&plan_logits, base_logits.as_ref(), targets)?,
        };
        for r in rows {
            scores.nll += r.nll;
            scores.kl += r.kl;
            scores.agree += usize::from(r.agree);
        }
        scores.scored += len;
    }
    Ok(scores)
}

/// The same scores with candle ops, for logits on a GPU.
fn score_rows_with_candle(
    plan: &Tensor,
    base: Option<&Tensor>,
    targets: &[u32],
) -> Result<Vec<RowScore>> {
    let logp = candle_nn::ops::log_softmax(plan, D::Minus1)?;
    let ids = Tensor::new(targets, plan.device())?.unsqueeze(1)?;
    let nll: Vec<f32> = logp.gather(&ids, 1)?.squeeze(1)?.neg()?.to_vec1()?;
    let (kl, agree) = match base {
        Some(base) => {
            let base_logp = candle_nn::ops::log_softmax(base, D::Minus1)?;
            let kl: Vec<f32> = (base_logp.exp()? * (&base_logp - &logp)?)?
                .sum(D::Minus1)?
                .to_vec1()?;
            let a: Vec<u32> = base.argmax(D::Minus1)?.to_vec1()?;
            let b: Vec<u32> = plan.argmax(D::Minus1)?.to_vec1()?;
            let agree = a.iter().zip(&b).map(|(x, y)| x == y).collect();
            (kl, agree)
        }
        None => (vec![0.0; targets.len()], vec![true; targets.len()]),
    };
    Ok(nll
        .iter()
        .zip(&kl)
        .zip(agree)
        .map(|((&nll, &kl), agree)| RowScore {
            nll: f64::from(nll),
            kl: f64::from(kl),
            agree,
        })
        .collect())
}
