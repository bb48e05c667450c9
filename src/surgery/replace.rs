//! Attention replacement (RAD steps 2–3): chosen attention layers run as
//! gated linear mixers (`model::mixer`) initialised from their weights,
//! distilled first layer-locally (each mixer matches its attention's output
//! on the base model's cached layer inputs), then end to end with KL to the
//! base model, training only the mixers (and optionally the Hopscotch
//! scales). A plan file carries the result as a `replace` section and a
//! `mixers` artifact.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use candle_nn::optim::Optimizer;
use serde::{Deserialize, Serialize};

use super::fit::{new_adam, train, FitEpoch, FitOptions, TrainResult, Trainer};
use super::objective::{input_ids, mean_loss_with, BaseStates, LayerInputs, LossKind, Start};
use crate::eval::data::TokenSet;
use crate::model::mixer::{self, Dims, MixerWeights, Replaced};
use crate::model::params::residual_name;
use crate::model::{Mode, Model, Pass, Probe, RunOptions, TrainableParams};
use crate::plan::{BlockId, LayerScales, Plan, PlanFile};

/// The plan section naming the replaced layers and their artifact.
pub const REPLACE_SECTION: &str = "replace";
/// The artifact holding the mixers' tensors (`mixer.{layer}.*`).
pub const MIXER_ARTIFACT: &str = "mixers";
/// The mixer this build runs (gated linear attention, `model::mixer`).
pub const MIXER_KIND: &str = "gla-v1";

/// `{"layers": [6, 7], "mixer": "gla-v1", "artifact": "mixers"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplaceSection {
    pub layers: Vec<usize>,
    pub mixer: String,
    pub artifact: String,
}

/// The section check `plan::SECTIONS` runs when a plan file is read.
pub fn check_section(value: &serde_json::Value) -> Result<()> {
    let s: ReplaceSection = serde_json::from_value(value.clone()).context(
        "expected {\"layers\": [6, 7], \"mixer\": \"gla-v1\", \"artifact\": \"mixers\"}",
    )?;
    if s.layers.is_empty() {
        bail!("`layers` is empty: a replace section names at least one attention layer");
    }
    if s.layers.windows(2).any(|w| w[0] >= w[1]) {
        bail!("`layers` must be increasing, without repeats");
    }
    if s.mixer != MIXER_KIND {
        bail!(
            "mixer `{}` is not known by this scalpel (it runs `{MIXER_KIND}`)",
            s.mixer
        );
    }
    Ok(())
}

/// Loads a plan file's mixers into `plan` (nothing when it has no `replace`
/// section): the artifact is hash-checked, every tensor's shape checked
/// against the model, and a layer the plan also skips refused.
pub fn apply_section(pf: &PlanFile, plan: &mut Plan, model: &Model) -> Result<()> {
    let Some(section) = pf.sections.get::<ReplaceSection>(REPLACE_SECTION)? else {
        return Ok(());
    };
    let n = model.n_layers();
    for &l in &section.layers {
        if l >= n {
            bail!("the plan replaces attn.{l}, but this model has {n} layers: it was made for another model");
        }
        if plan.skips_attn(l) {
            bail!("the plan both skips and replaces attn.{l}; remove one of them");
        }
    }
    let tensors = pf
        .load_artifact(&section.artifact, model.device())
        .with_context(|| format!("loading the mixers of the plan's `{REPLACE_SECTION}` section"))?;
    let weights = checked_weights(model, &section.layers, tensors)?;
    plan.replace = Some(Replaced {
        layers: section.layers.iter().copied().collect(),
        weights: Arc::new(weights),
    });
    Ok(())
}

/// The mixer tensors of `layers` from `tensors`, in the model's dtype, each
/// present with this model's shapes.
fn checked_weights(
    model: &Model,
    layers: &[usize],
    tensors: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let dtype = model.transformer.dtype;
    let mut out = HashMap::new();
    for &l in layers {
        for name in mixer::tensor_names(l) {
            let t = tensors.get(&name).with_context(|| {
                format!("the mixer artifact has no `{name}`: it does not match the plan's layers")
            })?;
            out.insert(name, t.to_dtype(dtype)?);
        }
    }
    let source = Plan {
        replace: Some(Replaced {
            layers: layers.iter().copied().collect(),
            weights: Arc::new(out.clone()),
        }),
        ..Plan::default()
    };
    for &l in layers {
        MixerWeights::from_params(&source, l, dtype)?.check(Dims::of(model.cfg()), l)?;
    }
    Ok(out)
}

/// Trainable mixers for `layers`, each initialised from its attention.
pub fn init_params(model: &Model, layers: &[usize]) -> Result<TrainableParams> {
    let dims = Dims::of(model.cfg());
    let mut p = TrainableParams::new();
    for &l in layers {
        let layer = model
            .transformer
            .layers
            .get(l)
            .with_context(|| format!("attn.{l}: the model has {} layers", model.n_layers()))?;
        for (name, t) in mixer::init_from_attention(&layer.attn, dims, l)? {
            p.insert(&name, &t)?;
        }
    }
    Ok(p)
}

/// Writes the section and the mixers' artifact into `pf` (saved at `path`).
pub fn save(
    pf: &mut PlanFile,
    path: &std::path::Path,
    layers: &[usize],
    params: &TrainableParams,
) -> Result<()> {
    let mut mixers = TrainableParams::new();
    for &l in layers {
        for name in mixer::tensor_names(l) {
            let v = params
                .var(&name)
                .with_context(|| format!("no trained `{name}`"))?;
            mixers.insert(&name, v.as_tensor())?;
        }
    }
    mixers.save_artifact(
        pf,
        path,
        MIXER_ARTIFACT,
        "gated linear attention mixers replacing attention layers (model::mixer), f32",
    )?;
    pf.sections.set(
        REPLACE_SECTION,
        &ReplaceSection {
            layers: layers.to_vec(),
            mixer: MIXER_KIND.into(),
            artifact: MIXER_ARTIFACT.into(),
        },
    )
}

/// The plan with `params`' mixers as its constants (what later runs use).
pub fn plan_with_mixers(plan: &Plan, layers: &[usize], params: &TrainableParams) -> Result<Plan> {
    let mut weights = HashMap::new();
    for &l in layers {
        for name in mixer::tensor_names(l) {
            let v = params
                .var(&name)
                .with_context(|| format!("no trained `{name}`"))?;
            weights.insert(name, v.as_tensor().detach());
        }
    }
    let mut p = plan.clone();
    p.replace = Some(Replaced {
        layers: layers.iter().copied().collect(),
        weights: Arc::new(weights),
    });
    Ok(p)
}

/// Each replaced layer's normed input and its attention's output, per
/// sequence, from the base model.
pub struct LocalTargets {
    /// layer → [(normed input, attention output)], each (1, t, hidden).
    per_layer: BTreeMap<usize, Vec<(Tensor, Tensor)>>,
}

struct Capture<'a> {
    layers: &'a [usize],
    seen: BTreeMap<usize, (Tensor, Tensor)>,
}

impl Probe for Capture<'_> {
    fn block(
        &mut self,
        block: BlockId,
        input: &Tensor,
        output: &Tensor,
    ) -> candle_core::Result<()> {
        if block.kind == crate::plan::BlockKind::Attn && self.layers.contains(&block.layer) {
            // The base model's scales are 1: the block added exactly its output.
            self.seen
                .insert(block.layer, (input.clone(), (output - input)?));
        }
        Ok(())
    }
}

impl LocalTargets {
    pub fn compute(
        model: &Model,
        data: &TokenSet,
        layers: &[usize],
        cancel: &AtomicBool,
    ) -> Result<Self> {
        let t = &model.transformer;
        let mut per_layer: BTreeMap<usize, Vec<(Tensor, Tensor)>> = BTreeMap::new();
        let base = Plan::base();
        for seq in &data.sequences {
            if cancel.load(Ordering::Relaxed) {
                bail!("cancelled");
            }
            let mut probe = Capture {
                layers,
                seen: BTreeMap::new(),
            };
            let mut pass = Pass::plan(&base, RunOptions::FAST).with_probe(&mut probe);
            t.forward_hidden(&input_ids(model, seq)?, &mut pass)?;
            for (l, (x, a)) in probe.seen {
                let w = &t.layers[l].attn_norm;
                let h = candle_nn::ops::rms_norm(&x.contiguous()?, w, t.cfg.rms_norm_eps as f32)?;
                per_layer.entry(l).or_default().push((h, a));
            }
        }
        Ok(Self { per_layer })
    }

    fn of(&self, layer: usize) -> Result<&[(Tensor, Tensor)]> {
        self.per_layer
            .get(&layer)
            .map(Vec::as_slice)
            .with_context(|| format!("no cached inputs for attn.{layer}"))
    }
}

/// Relative squared error of `layer`'s mixer on one sequence:
/// ‖mix(h) − attn(h)‖² / ‖attn(h)‖², both as the block adds them (on Gemma
/// after its post-attention norm).
fn local_loss(
    params: &TrainableParams,
    model: &Model,
    layer: usize,
    h: &Tensor,
    target: &Tensor,
) -> Result<Tensor> {
    let w = MixerWeights::from_params(&params.over(&Plan::base()), layer, h.dtype())?;
    let t = &model.transformer;
    let y = t.run_mixer(layer, &w, h, None, Mode::Differentiable)?;
    let y = t.attn_block_output(layer, y, Mode::Differentiable)?;
    let err = (y - target)?.sqr()?.sum_all()?;
    let norm = target.sqr()?.sum_all()?;
    Ok(err.broadcast_div(&norm)?)
}

/// Mean local loss of `layer`'s mixer over `targets`.
pub fn mean_local_loss(
    params: &TrainableParams,
    model: &Model,
    layer: usize,
    targets: &LocalTargets,
) -> Result<f64> {
    let items = targets.of(layer)?;
    let mut sum = 0.0;
    for (h, a) in items {
        sum += scalar(&local_loss(params, model, layer, h, a)?)?;
    }
    Ok(sum / items.len().max(1) as f64)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(f64::from(t.to_dtype(DType::F32)?.to_scalar::<f32>()?))
}

/// One layer's local distillation: its epochs (0 = the initialisation).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalFit {
    pub layer: usize,
    pub history: Vec<FitEpoch>,
    pub best_epoch: usize,
    pub cancelled: bool,
}

/// Layer-local distillation of every replaced layer's mixer in `params`:
/// Adam on the relative error to the attention output, best epoch by the
/// validation targets, a non-finite loss restarts the epoch at a tenth of
/// the rate (3 times at most). `on_step(layer, epoch, batch, batches,
/// loss)` sees every Adam step (live loss); `on_epoch` every epoch.
#[allow(clippy::too_many_arguments)]
pub fn distil_local(
    model: &Model,
    layers: &[usize],
    params: &TrainableParams,
    train_set: &LocalTargets,
    validation: &LocalTargets,
    opts: &FitOptions,
    cancel: &AtomicBool,
    on_step: &mut dyn FnMut(usize, usize, usize, usize, f64),
    on_epoch: &mut dyn FnMut(usize, &FitEpoch),
) -> Result<Vec<LocalFit>> {
    let mut fits = Vec::new();
    for &layer in layers {
        let names = mixer::tensor_names(layer);
        let vars: Vec<Var> = names
            .iter()
            .map(|n| {
                params
                    .var(n)
                    .cloned()
                    .with_context(|| format!("no `{n}` to train"))
            })
            .collect::<Result<_>>()?;
        let t0 = Instant::now();
        let first = FitEpoch {
            epoch: 0,
            train_loss: f64::NAN,
            heldout_loss: mean_local_loss(params, model, layer, validation)?,
            lr: opts.lr,
            seconds: t0.elapsed().as_secs_f64(),
            note: None,
        };
        on_epoch(layer, &first);
        let mut best = (0, first.heldout_loss, snapshot(&vars)?);
        let mut history = vec![first];
        let mut lr = opts.lr;
        let mut adam = new_adam(&vars, lr)?;
        let (mut epoch, mut cuts, mut cancelled) = (1, 0, false);
        let items = train_set.of(layer)?;
        let batches = items.len().div_ceil(opts.batch_size.max(1));
        while epoch <= opts.epochs {
            let t = Instant::now();
            let before = snapshot(&vars)?;
            let mut losses = Vec::new();
            let mut finite = true;
            for (bi, batch) in items.chunks(opts.batch_size.max(1)).enumerate() {
                if cancel.load(Ordering::Relaxed) {
                    cancelled = true;
                    break;
                }
                let mut total: Option<Tensor> = None;
                for (h, a) in batch {
                    let l = local_loss(params, model, layer, h, a)?;
                    total = Some(match total {
                        Some(s) => (s + l)?,
                        None => l,
                    });
                }
                let loss = (total.context("an empty batch")? / batch.len() as f64)?;
                let value = scalar(&loss)?;
                if !value.is_finite() {
                    finite = false;
                    break;
                }
                adam.step(&loss.backward()?)?;
                losses.push(value);
                on_step(layer, epoch, bi + 1, batches, value);
            }
            if cancelled {
                break;
            }
            if !finite || !vars_finite(&vars)? {
                cuts += 1;
                if cuts > 3 {
                    bail!("attn.{layer}'s local distillation stayed non-finite after lowering the learning rate 3 times (last {lr:.1e}); try a smaller --local-lr");
                }
                restore(&vars, &before)?;
                lr /= 10.0;
                adam = new_adam(&vars, lr)?;
                continue;
            }
            let e = FitEpoch {
                epoch,
                train_loss: losses.iter().sum::<f64>() / losses.len().max(1) as f64,
                heldout_loss: mean_local_loss(params, model, layer, validation)?,
                lr,
                seconds: t.elapsed().as_secs_f64(),
                note: (cuts > 0).then(|| format!("learning rate lowered to {lr:.1e}")),
            };
            on_epoch(layer, &e);
            if e.heldout_loss < best.1 {
                best = (epoch, e.heldout_loss, snapshot(&vars)?);
            }
            history.push(e);
            epoch += 1;
        }
        restore(&vars, &best.2)?;
        fits.push(LocalFit {
            layer,
            history,
            best_epoch: best.0,
            cancelled,
        });
        if cancelled {
            break;
        }
    }
    Ok(fits)
}

fn snapshot(vars: &[Var]) -> Result<Vec<Tensor>> {
    vars.iter()
        .map(|v| Ok(v.as_tensor().detach().copy()?))
        .collect()
}

fn restore(vars: &[Var], values: &[Tensor]) -> Result<()> {
    for (v, t) in vars.iter().zip(values) {
        v.set(t)?;
    }
    Ok(())
}

fn vars_finite(vars: &[Var]) -> Result<bool> {
    for v in vars {
        let a: Vec<f32> = v.as_tensor().flatten_all()?.to_vec1()?;
        if a.iter().any(|x| !x.is_finite()) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Adds the Hopscotch scales of every layer to `params`, starting at `plan`'s.
pub fn add_scales(params: &mut TrainableParams, plan: &Plan, model: &Model) -> Result<()> {
    for l in 0..model.n_layers() {
        let s: LayerScales = plan.scales_for(l);
        params.insert(
            &residual_name(l),
            &Tensor::new(&s.as_array()[..], model.device())?,
        )?;
    }
    Ok(())
}

/// End-to-end distillation: KL to the base model over the whole network
/// with the mixers (and whatever else `params` holds) trained, through the
/// fit's `Trainer` and `train` (held-out best epoch, LR cuts on non-finite
/// losses, cancel). Sequences start from their cached input to the first
/// replaced layer, so the layers before it are not rerun.
#[allow(clippy::too_many_arguments)]
pub fn distil_end_to_end(
    model: &Model,
    plan: &Plan,
    params: TrainableParams,
    data: &TokenSet,
    validation: &TokenSet,
    opts: &FitOptions,
    cancel: &AtomicBool,
    on_epoch: &mut dyn FnMut(&FitEpoch),
) -> Result<(TrainResult, TrainableParams)> {
    let first = plan
        .replace
        .as_ref()
        .and_then(|r| r.layers.first().copied())
        .context("the plan replaces no layer")?;
    // Inputs to `first` do not depend on the mixers (they come after).
    let mut before = plan.clone();
    before.replace = None;
    let trains_scales = params.names().any(|n| n.starts_with("residual."));
    // Trained scales of earlier layers would invalidate the cached inputs.
    let from = if trains_scales { 0 } else { first };
    let base = BaseStates::for_loss(model, LossKind::Kl, data, cancel)?;
    let held_base = BaseStates::for_loss(model, LossKind::Kl, validation, cancel)?;
    let (inputs, held_inputs) = if from > 0 {
        (
            Some(LayerInputs::compute(model, data, &before, cancel)?),
            Some(LayerInputs::compute(model, validation, &before, cancel)?),
        )
    } else {
        (None, None)
    };
    let opts = FitOptions {
        loss: LossKind::Kl,
        ..opts.clone()
    };
    let mut trainer = Trainer::with_params(model, plan, data, base.as_ref(), &opts, params)?;
    if let Some(inputs) = &inputs {
        trainer = trainer.starting_at(from, inputs);
    }
    let never = AtomicBool::new(false);
    let start = match &held_inputs {
        Some(i) => Start::Layer(from, i),
        None => Start::Embeddings,
    };
    let mut heldout = |t: &Trainer| {
        let p = t.params().over(plan);
        mean_loss_with(
            model,
            validation,
            held_base.as_ref(),
            plan,
            &p,
            LossKind::Kl,
            start,
            &never,
        )
    };
    let r = train(&mut trainer, opts.epochs, cancel, &mut heldout, on_epoch)?;
    let mut out = TrainableParams::new();
    for (name, value) in &r.best {
        out.insert(name, value)?;
    }
    Ok((r, out))
}
