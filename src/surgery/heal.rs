//! Healing a skip plan: low-rank corrections `W + B·A` on the projections
//! of the blocks the plan keeps, trained (weights frozen) with the plan's
//! loss (KL to the base model by default) through `fit::fit_params`, best
//! epoch by validation loss. The factors are artifact `heal` of the v2
//! plan, described by its `heal` section; a plan that carries them applies
//! them in every pass (`Plan::tensors`), and `export` merges them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::fit::{fit_params, FitEpoch, FitOptions, TrainResult};
use crate::eval::data::TokenSet;
use crate::model::lowrank::{self, factor_names, PROJECTIONS};
use crate::model::params::SeededRng;
use crate::model::{Model, TrainableParams};
use crate::plan::{BlockId, Plan, PlanFile, PlanTensors};

/// The section (and artifact) name.
pub const HEAL_SECTION: &str = "heal";

/// Default projections corrected. Measured on SmolLM2-135M (README
/// "Healing"): o_proj and down_proj write straight into the residual
/// stream, which is where a skipped block's missing output shows.
pub const DEFAULT_TARGETS: [&str; 2] = ["o_proj", "down_proj"];
/// Default rank.
pub const DEFAULT_RANK: usize = 8;

/// The `heal` section: what the artifact's factors correct.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealSection {
    pub rank: usize,
    /// Projection names (`o_proj`, `down_proj`, ...).
    pub targets: Vec<String>,
    /// Layers corrected.
    pub layers: Vec<usize>,
    /// The artifact holding `lora.{layer}.{proj}.a` / `.b`.
    pub artifact: String,
    /// Trained scalars in all.
    pub parameters: usize,
}

/// The section's check when a plan file is read.
pub fn check_section(value: &serde_json::Value) -> Result<()> {
    let s: HealSection = serde_json::from_value(value.clone()).context(
        "expected {\"rank\": R, \"targets\": [...], \"layers\": [...], \"artifact\": NAME, \
         \"parameters\": N}",
    )?;
    if s.rank == 0 {
        bail!("rank must be at least 1");
    }
    for t in &s.targets {
        projection_index(t)?;
    }
    Ok(())
}

/// Index of a projection name in `PROJECTIONS`.
pub fn projection_index(name: &str) -> Result<usize> {
    PROJECTIONS
        .iter()
        .position(|p| *p == name)
        .with_context(|| {
            format!(
                "unknown projection `{name}`; use any of {}",
                PROJECTIONS.join(", ")
            )
        })
}

/// Parses `--targets` (`o_proj,down_proj`, `all`, `attn`, `mlp`).
pub fn parse_targets(s: &str) -> Result<Vec<usize>> {
    let mut out = BTreeSet::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "all" => out.extend(0..PROJECTIONS.len()),
            "attn" => out.extend(0..4),
            "mlp" => out.extend(4..7),
            p => {
                out.insert(projection_index(p)?);
            }
        }
    }
    if out.is_empty() {
        bail!("--targets names no projection; use e.g. o_proj,down_proj or all");
    }
    Ok(out.into_iter().collect())
}

/// Whether projection `proj` belongs to the attention block.
fn is_attn(proj: usize) -> bool {
    proj < 4
}

fn block_of(layer: usize, proj: usize) -> BlockId {
    if is_attn(proj) {
        BlockId::attn(layer)
    } else {
        BlockId::mlp(layer)
    }
}

/// What to heal.
#[derive(Debug, Clone)]
pub struct HealOptions {
    pub rank: usize,
    /// Indices into `PROJECTIONS`.
    pub targets: Vec<usize>,
    /// `None`: every layer.
    pub layers: Option<Vec<usize>>,
    pub fit: FitOptions,
    /// Seed of `A`'s random start (`B` starts at 0, so the start is the plan).
    pub seed: u64,
}

/// The (layer, projection) pairs corrected: the targets of the kept blocks.
pub fn corrected_projections(
    plan: &Plan,
    n_layers: usize,
    opts: &HealOptions,
) -> Result<Vec<(usize, usize)>> {
    let layers: Vec<usize> = match &opts.layers {
        Some(l) => l.clone(),
        None => (0..n_layers).collect(),
    };
    if let Some(l) = layers.iter().find(|&&l| l >= n_layers) {
        bail!(
            "--layers names layer {l}, but the model has {n_layers} (0..={})",
            n_layers - 1
        );
    }
    let pairs: Vec<(usize, usize)> = layers
        .iter()
        .flat_map(|&l| opts.targets.iter().map(move |&p| (l, p)))
        .filter(|&(l, p)| !plan.is_skipped(block_of(l, p)))
        .collect();
    if pairs.is_empty() {
        bail!("nothing to heal: every target projection of those layers is in a skipped block");
    }
    Ok(pairs)
}

/// Trained scalars of a heal: rank · (in + out) per corrected projection.
pub fn parameter_count(model: &Model, pairs: &[(usize, usize)], rank: usize) -> usize {
    pairs
        .iter()
        .map(|&(l, p)| {
            let (o, i) = lowrank::projection_shapes(&model.transformer.layers[l])[p];
            rank * (o + i)
        })
        .sum()
}

/// The starting factors: `A` ~ N(0, 1/in) (so `A x` has unit scale on a
/// normed input), `B` = 0, so the healed plan starts as the plan itself.
pub fn initial_params(
    model: &Model,
    pairs: &[(usize, usize)],
    rank: usize,
    seed: u64,
    device: &Device,
) -> Result<TrainableParams> {
    let mut rng = SeededRng::new(seed);
    let mut p = TrainableParams::new();
    for &(l, proj) in pairs {
        let (out, inp) = lowrank::projection_shapes(&model.transformer.layers[l])[proj];
        let std = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..rank * inp)
            .map(|_| (rng.normal() * std) as f32)
            .collect();
        let (an, bn) = factor_names(l, proj);
        p.insert(&an, &Tensor::from_vec(a, (rank, inp), device)?)?;
        p.insert(
            &bn,
            &Tensor::zeros((out, rank), candle_core::DType::F32, device)?,
        )?;
    }
    Ok(p)
}

/// What a heal returns: the best factors and the training record.
pub struct HealResult {
    pub section: HealSection,
    pub train: TrainResult,
}

/// Heals `plan` on `train`, picking the best epoch on `validation`.
#[allow(clippy::too_many_arguments)]
pub fn heal(
    model: &Model,
    plan: &Plan,
    train: &TokenSet,
    validation: &TokenSet,
    opts: &HealOptions,
    cancel: &AtomicBool,
    on_epoch: &mut dyn FnMut(&FitEpoch),
) -> Result<HealResult> {
    if plan.tensors.is_some() {
        bail!("this plan is already healed; heal the plan it was made from");
    }
    if opts.rank == 0 {
        bail!("--rank must be at least 1 (rank 0 is the plan itself)");
    }
    let pairs = corrected_projections(plan, model.n_layers(), opts)?;
    let params = initial_params(model, &pairs, opts.rank, opts.seed, model.device())?;
    let parameters = params.element_count();
    let result = fit_params(
        model, plan, params, train, validation, &opts.fit, cancel, on_epoch,
    )?;
    let layers: BTreeSet<usize> = pairs.iter().map(|p| p.0).collect();
    let targets: BTreeSet<usize> = pairs.iter().map(|p| p.1).collect();
    Ok(HealResult {
        section: HealSection {
            rank: opts.rank,
            targets: targets
                .iter()
                .map(|&p| PROJECTIONS[p].to_string())
                .collect(),
            layers: layers.into_iter().collect(),
            artifact: HEAL_SECTION.to_string(),
            parameters,
        },
        train: result,
    })
}

/// `plan` with `factors` applied (what a healed plan file loads to).
pub fn with_factors(plan: &Plan, factors: BTreeMap<String, Tensor>) -> Plan {
    let mut p = plan.clone();
    p.tensors = Some(PlanTensors::new(factors));
    p
}

/// Splits `lora.{layer}.{proj}.{a|b}`.
fn parse_factor_name(name: &str) -> Option<(usize, usize, char)> {
    let rest = name.strip_prefix("lora.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (proj, which) = rest.rsplit_once('.')?;
    let which = match which {
        "a" => 'a',
        "b" => 'b',
        _ => return None,
    };
    Some((
        layer.parse().ok()?,
        PROJECTIONS.iter().position(|p| *p == proj)?,
        which,
    ))
}

/// Checks factors against `model` and `plan`: known names, both halves,
/// fitting shapes, kept blocks only.
pub fn check_factors(
    factors: &BTreeMap<String, Tensor>,
    model: &Model,
    plan: &Plan,
    origin: &str,
) -> Result<()> {
    let n = model.n_layers();
    for (name, t) in factors {
        let Some((layer, proj, which)) = parse_factor_name(name) else {
            bail!("{origin}: tensor `{name}` is not a correction factor (lora.LAYER.PROJ.a|b)");
        };
        if layer >= n {
            bail!("{origin}: `{name}` is for layer {layer}, but the model has {n} layers; it was made for another model");
        }
        let (an, bn) = factor_names(layer, proj);
        let other = if which == 'a' { &bn } else { &an };
        let Some(o) = factors.get(other) else {
            bail!("{origin}: `{name}` has no `{other}`");
        };
        let (a, b) = if which == 'a' { (t, o) } else { (o, t) };
        let shape = lowrank::projection_shapes(&model.transformer.layers[layer])[proj];
        lowrank::check_shapes(&an, &bn, a, b, shape)
            .map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        if plan.is_skipped(block_of(layer, proj)) {
            bail!(
                "{origin}: `{name}` corrects {}, which the plan skips",
                block_of(layer, proj)
            );
        }
    }
    Ok(())
}

/// The plan of `pf` with its heal applied when it has a `heal` section:
/// the artifact loaded (hash-checked) and checked against the model.
pub fn attach(plan: &mut Plan, pf: &PlanFile, model: &Model) -> Result<()> {
    let Some(section) = pf.sections.get::<HealSection>(HEAL_SECTION)? else {
        return Ok(());
    };
    let factors: BTreeMap<String, Tensor> = pf
        .load_artifact(&section.artifact, model.device())?
        .into_iter()
        .collect();
    if factors.is_empty() {
        bail!(
            "plan artifact `{}` holds no correction factors",
            section.artifact
        );
    }
    let origin = format!("plan artifact `{}`", section.artifact);
    check_factors(&factors, model, plan, &origin)?;
    plan.tensors = Some(PlanTensors::new(factors));
    Ok(())
}
