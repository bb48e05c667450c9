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

/// `measure` on every set, by set name.
pub fn per_set<T>(
    evals: &[EvalSet],
    mut measure: impl FnMut(&EvalSet) -> Result<T>,
) -> Result<BTreeMap<String, T>> {
    evals
        .iter()
        .map(|e| Ok((e.name.clone(), measure(e)?)))
        .collect()
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

/// What the routing comparison measures at each k: the Hopscotch and
/// block-influence selections with and without a fit, and random.
pub const ROUTING_METHODS: [(&str, Fitting); 5] = [
    ("hopscotch", Fitting::Default),
    ("hopscotch", Fitting::None),
    ("block-influence", Fitting::Default),
    ("block-influence", Fitting::None),
    ("random", Fitting::None),
];

/// What `compare` needs besides the model and the data.
pub struct CompareInputs<'a> {
    pub importance: &'a Importance,
    /// The search trace (at least max(`ks`) steps); step k's prefix is the k-block selection.
    pub steps: &'a [SearchStep],
    /// The numbers of skipped attention blocks to measure, ascending.
    pub ks: Vec<usize>,
    pub methods: &'a [(&'a str, Fitting)],
    pub fit: FitOptions,
    pub seed: u64,
}

impl CompareInputs<'_> {
    /// The plans `compare` measures (for progress bars).
    pub fn plan_count(&self) -> usize {
        self.ks.len() * self.methods.len()
    }
}

/// Measures every method at every k of `inputs.ks`. `progress(done, total)`
/// counts plans.
pub fn compare(
    model: &Model,
    calib: &TokenSet,
    fit_heldout: &TokenSet,
    evals: &[EvalSet],
    inputs: &CompareInputs,
    cancel: &AtomicBool,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<CompareRow>> {
    let max_k = inputs.ks.iter().copied().max().unwrap_or(0);
    if inputs.ks.contains(&0) || max_k > model.n_layers() {
        bail!(
            "block counts must be within 1..={}, got {:?}",
            model.n_layers(),
            inputs.ks
        );
    }
    if inputs.steps.len() < max_k {
        bail!(
            "the search trace has {} steps, fewer than the {max_k} blocks compared",
            inputs.steps.len()
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
    let total = inputs.plan_count();
    let mut rows = Vec::with_capacity(total);
    for k in 1..=max_k {
        // One shuffle per k whether or not k is measured, so a k's random
        // selection does not depend on which others are.
        layers.shuffle(&mut rng);
        if !inputs.ks.contains(&k) {
            continue;
        }
        for &(method, fitting) in inputs.methods {
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
            let reports = per_set(evals, |e| measure(model, e.data, &e.base, &plan, cancel))?;
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
