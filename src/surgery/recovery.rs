//! What recovers the quality that skipping attention layers costs, on the
//! same layers: keep them, skip them (with and without fitted scales),
//! heal the rest (low-rank corrections), or replace them (distilled
//! mixers). Every number measured on held-out data, with the KV cache each
//! variant keeps.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use anyhow::Result;
use serde::Serialize;

use super::compare::{per_set, EvalSet};
use super::fit::{fit_with_states, FitOptions};
use super::objective::{measure, SetReport, TrainingData};
use crate::model::mixer::Dims;
use crate::model::Model;
use crate::plan::{BlockId, BlockKind, Plan};

/// A plan to measure on a layer set, and what to call it.
pub struct Variant {
    pub name: String,
    pub plan: Plan,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecoveryRow {
    /// The attention layers the comparison is about.
    pub layers: Vec<usize>,
    pub variant: String,
    /// KV cache per token of context, the cache in the model's dtype.
    pub kv_bytes_per_token: usize,
    /// Recurrent state of the replaced layers per sequence, whatever its length.
    pub state_bytes_per_sequence: usize,
    pub reports: BTreeMap<String, SetReport>,
}

/// The plan with its replaced layers skipped instead (mixers dropped), its
/// other skips and scales kept: what a replacement is measured against.
pub fn skipped_instead(plan: &Plan) -> Plan {
    let mut p = plan.clone();
    if let Some(r) = p.replace.take() {
        p.skip.extend(r.layers.iter().map(|&l| BlockId::attn(l)));
    }
    p
}

/// The attention layers a plan removes (skipped or replaced), ascending.
pub fn removed_attention(plan: &Plan) -> Vec<usize> {
    let mut layers: Vec<usize> = plan
        .skip
        .iter()
        .filter(|b| b.kind == BlockKind::Attn)
        .map(|b| b.layer)
        .collect();
    if let Some(r) = &plan.replace {
        layers.extend(r.layers.iter().copied());
    }
    layers.sort_unstable();
    layers.dedup();
    layers
}

/// KV bytes per token of context: keys and values of every attention
/// layer that neither is skipped nor replaced.
pub fn kv_bytes_per_token(model: &Model, plan: &Plan) -> usize {
    let cfg = model.cfg();
    let kept = cfg.n_layers - removed_attention(plan).len();
    kept * 2 * cfg.n_kv_heads * cfg.head_dim * model.transformer.dtype.size_in_bytes()
}

/// The replaced layers' recurrent state per sequence.
pub fn state_bytes(model: &Model, plan: &Plan) -> usize {
    plan.replace
        .as_ref()
        .map_or(0, |r| r.layers.len() * Dims::of(model.cfg()).state_bytes())
}

/// Measures `variant` on every evaluation set.
pub fn measure_variant(
    model: &Model,
    layers: &[usize],
    variant: &Variant,
    evals: &[EvalSet],
    cancel: &AtomicBool,
) -> Result<RecoveryRow> {
    let reports = per_set(evals, |e| {
        measure(model, e.data, &e.base, &variant.plan, cancel)
    })?;
    Ok(RecoveryRow {
        layers: layers.to_vec(),
        variant: variant.name.clone(),
        kv_bytes_per_token: kv_bytes_per_token(model, &variant.plan),
        state_bytes_per_sequence: state_bytes(model, &variant.plan),
        reports,
    })
}

/// The skip plan with its scales fitted (the fit starts from its scales).
pub fn fitted(
    model: &Model,
    skip: &Plan,
    data: &TrainingData,
    opts: &FitOptions,
    cancel: &AtomicBool,
) -> Result<Plan> {
    let mut o = opts.clone();
    o.init = skip.scales.clone();
    Ok(fit_with_states(
        model,
        skip,
        data.train,
        Some(data.train_base),
        data.validation,
        Some(data.validation_base),
        &o,
        cancel,
        &mut |_| {},
    )?
    .plan)
}

/// `kl / reference − 1` (−0.4 = 40% lower), for the comparison lines.
pub fn kl_change(row: &RecoveryRow, reference: &RecoveryRow, set: &str) -> Option<f64> {
    let a = row.reports.get(set)?.kl_to_base;
    let b = reference.reports.get(set)?.kl_to_base;
    (b > 0.0).then(|| a / b - 1.0)
}
