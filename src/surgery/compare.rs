//! Hopscotch against the training-free selections at the same number of
//! skipped attention blocks, every number measured on held-out data:
//! Hopscotch (search + fit), its selection without the fit, Δloss one-shot
//! and block-influence one-shot (each with and without a fit), and random.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use super::fit::{fit_with_states, FitOptions};
use super::hopscotch::SearchStep;
use super::importance::Importance;
use super::objective::{measure, BaseStates, LossKind, SetReport};
use crate::eval::data::TokenSet;
use crate::model::Model;
use crate::plan::{BlockId, BlockKind, Plan};

/// One held-out set the plans are measured on, with its base states.
pub struct EvalSet<'a> {
    pub name: String,
    pub data: &'a TokenSet,
    pub base: BaseStates,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompareRow {
    pub k: usize,
    pub method: String,
    /// The loss the scales were fitted with; `None` when unfitted.
    pub fit: Option<LossKind>,
    pub blocks: Vec<BlockId>,
    /// One report per evaluation set, by name.
    pub reports: BTreeMap<String, SetReport>,
}

/// How a row's scales are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fitting {
    None,
    /// With the compare's loss.
    Default,
    /// With the other loss (ce for kl and the reverse), to show both.
    OtherLoss,
}

pub const METHODS: [(&str, Fitting); 8] = [
    ("hopscotch", Fitting::Default),
    ("hopscotch", Fitting::OtherLoss),
    ("hopscotch", Fitting::None),
    ("delta-loss", Fitting::Default),
    ("delta-loss", Fitting::None),
    ("block-influence", Fitting::Default),
    ("block-influence", Fitting::None),
    ("random", Fitting::None),
];

/// What `compare` needs besides the model and the data.
pub struct CompareInputs<'a> {
    pub importance: &'a Importance,
    /// The search trace (at least `max_k` steps); step k's prefix is the k-block selection.
    pub steps: &'a [SearchStep],
    pub max_k: usize,
    pub fit: FitOptions,
    pub seed: u64,
}

/// Measures every method at k = 1..=max_k. `progress(done, total)` counts plans.
pub fn compare(
    model: &Model,
    calib: &TokenSet,
    fit_heldout: &TokenSet,
    evals: &[EvalSet],
    inputs: &CompareInputs,
    cancel: &AtomicBool,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<CompareRow>> {
    if inputs.steps.len() < inputs.max_k {
        bail!(
            "the search trace has {} steps, fewer than --blocks {}",
            inputs.steps.len(),
            inputs.max_k
        );
    }
    let loss = inputs.fit.loss;
    // KL fits need the base states; the other-loss rows may be KL too.
    let calib_base = BaseStates::compute(model, calib, cancel)?;
    let held_base = BaseStates::compute(model, fit_heldout, cancel)?;
    let by_dloss = inputs.importance.ranked(BlockKind::Attn, |b| b.delta_loss);
    let by_bi = inputs
        .importance
        .ranked(BlockKind::Attn, |b| b.block_influence);
    let mut rng = rand::rngs::StdRng::seed_from_u64(inputs.seed);
    let mut layers: Vec<usize> = (0..model.n_layers()).collect();
    let total = inputs.max_k * METHODS.len();
    let mut rows = Vec::with_capacity(total);
    for k in 1..=inputs.max_k {
        layers.shuffle(&mut rng);
        for (method, fitting) in METHODS {
            let blocks: Vec<BlockId> = match method {
                "hopscotch" => inputs.steps[..k].iter().map(|s| s.chosen).collect(),
                "delta-loss" => by_dloss[..k].to_vec(),
                "block-influence" => by_bi[..k].to_vec(),
                _ => layers[..k].iter().map(|&l| BlockId::attn(l)).collect(),
            };
            let mut plan = Plan::with_skips(blocks.iter().copied());
            let fit = match fitting {
                Fitting::None => None,
                Fitting::Default => Some(loss),
                Fitting::OtherLoss => Some(match loss {
                    LossKind::Kl => LossKind::Ce,
                    LossKind::Ce => LossKind::Kl,
                }),
            };
            if let Some(fit_loss) = fit {
                let mut fo = inputs.fit.clone();
                fo.loss = fit_loss;
                // Hopscotch's own fit starts from the scales its search refitted.
                fo.init = (method == "hopscotch").then(|| inputs.steps[k - 1].scales.clone());
                plan = fit_with_states(
                    model,
                    &plan,
                    calib,
                    Some(&calib_base),
                    fit_heldout,
                    Some(&held_base),
                    &fo,
                    cancel,
                    &mut |_| {},
                )?
                .plan;
            }
            let mut reports = BTreeMap::new();
            for e in evals {
                reports.insert(
                    e.name.clone(),
                    measure(model, e.data, &e.base, &plan, cancel)?,
                );
            }
            rows.push(CompareRow {
                k,
                method: method.into(),
                fit,
                blocks,
                reports,
            });
            progress(rows.len(), total);
        }
    }
    Ok(rows)
}
