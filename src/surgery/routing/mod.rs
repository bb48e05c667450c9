//! Training token routers on a frozen model (SkipGPT-style retrofit): one
//! linear router per routed block, straight-through Gumbel gates (hard
//! decisions forward, `sigmoid` gradient backward), loss = KL to the base
//! model + `penalty · |executed share − capacity|`. Only the routers train.
//! After each epoch the routers are judged with their real, deterministic
//! decisions on the validation sequences; the best epoch (the start
//! included) is kept. Finally the decision threshold is calibrated on the
//! training sequences so the executed share there is the capacity.

pub mod compare;
pub mod gate;
pub mod measure;
pub mod speed;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::DType;
use candle_nn::optim::Optimizer;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use self::gate::{GateMode, GateProbe};
use self::measure::{measure_set, Routed, RoutedReport};
use crate::model::routing::{
    bias_name, check_capacity, hidden_bias_name, hidden_weight_name, weight_name, KvPolicy,
    RouteOn, Router, RouterKind, Routers,
};
use crate::model::{Model, ParamValues, Pass, RunOptions, TrainableParams};
use crate::plan::{BlockId, Plan};
use crate::surgery::fit::{grads_finite, new_adam, MAX_LR_CUTS};
use crate::surgery::objective::{input_ids, sequence_loss, BaseStates, LossKind, TrainingData};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteOptions {
    /// Target share of routed token-blocks that execute, in (0, 1].
    pub capacity: f64,
    pub on: RouteOn,
    /// Linear routers or SkipGPT's d → d/4 → 1 MLP.
    #[serde(default)]
    pub router: RouterKind,
    pub epochs: usize,
    pub lr: f64,
    /// Sequences per Adam step.
    pub batch_size: usize,
    /// Weight of `|executed share − capacity|` against the KL (nats/token).
    pub penalty: f64,
    /// Gumbel temperature of the soft path.
    pub tau: f64,
    pub seed: u64,
    /// The K/V policy the routed plan runs with (validation included).
    pub kv: KvPolicy,
}

impl Default for RouteOptions {
    fn default() -> Self {
        Self {
            capacity: 0.8,
            on: RouteOn::Attn,
            router: RouterKind::Linear,
            epochs: 3,
            lr: 2e-2,
            batch_size: 2,
            penalty: 2.0,
            tau: 1.0,
            seed: 0,
            kv: KvPolicy::Write,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteEpoch {
    /// 0 is the start, before any step.
    pub epoch: usize,
    /// Mean training KL (noisy gates), NaN for epoch 0.
    pub train_kl: f64,
    /// Mean executed share of the routed blocks in training (noisy gates).
    pub train_share: f64,
    /// Validation KL, deterministic decisions at `threshold`.
    pub validation_kl: f64,
    pub validation_share: f64,
    /// What picks the best epoch: validation KL, plus `MISSED_SHARE_COST`
    /// per unit of share beyond `SHARE_TOLERANCE` off the capacity (routers
    /// that cannot realise the capacity are not a candidate at it).
    pub validation_loss: f64,
    /// Calibrated on the first training sequences to execute `capacity`.
    pub threshold: f32,
    pub lr: f64,
    pub seconds: f64,
    pub note: Option<String>,
}

pub struct RouteResult {
    pub routers: Routers,
    /// Calibrated so the training sequences execute `capacity`.
    pub threshold: f32,
    pub history: Vec<RouteEpoch>,
    pub best_epoch: usize,
    pub cancelled: bool,
    pub warnings: Vec<String>,
    /// The training sequences at the calibrated threshold.
    pub calibrated: Option<RoutedReport>,
}

/// The blocks that get a router: those `on` selects, minus the base plan's
/// static skips.
pub fn routed_blocks(model: &Model, plan: &Plan, on: RouteOn) -> Vec<BlockId> {
    (0..model.n_layers())
        .flat_map(|l| [BlockId::attn(l), BlockId::mlp(l)])
        .filter(|b| on.includes(b.kind) && !plan.is_skipped(*b))
        .collect()
}

/// Trainable routers of `kind` that start with output weight 0 and bias
/// logit(capacity): every token executes with probability `capacity` in
/// training.
pub fn initial_params(
    model: &Model,
    blocks: &[BlockId],
    kind: RouterKind,
    capacity: f64,
    seed: u64,
) -> Result<TrainableParams> {
    let c = capacity.clamp(1e-3, 1.0 - 1e-3);
    let bias = (c / (1.0 - c)).ln() as f32;
    let hidden = model.cfg().hidden_size;
    let r = Routers::initial(blocks, kind, hidden, bias, seed, model.device())?;
    params_of(&r)
}

/// Routers as a trainable set (names as in the artifact).
pub fn params_of(routers: &Routers) -> Result<TrainableParams> {
    let mut p = TrainableParams::new();
    for (&b, r) in &routers.by_block {
        p.insert(&weight_name(b), &r.w)?;
        p.insert(&bias_name(b), &r.b)?;
        if let Some(h) = &r.hidden {
            p.insert(&hidden_weight_name(b), &h.w)?;
            p.insert(&hidden_bias_name(b), &h.b)?;
        }
    }
    Ok(p)
}

/// The current values of a trainable set as routers.
pub fn routers_of(params: &TrainableParams, model: &Model) -> Result<Routers> {
    Routers::from_values(&params.values()?, model.cfg().hidden_size, model.n_layers())
}

/// One sequence's differentiable loss: KL per scored token under gated
/// blocks, plus the capacity penalty. Returns (loss, kl, share).
#[allow(clippy::too_many_arguments)]
pub fn sequence_objective(
    model: &Model,
    plan: &Plan,
    params: &TrainableParams,
    seq: &crate::eval::data::Sequence,
    base_hidden: &candle_core::Tensor,
    mode: GateMode,
    noise: Option<&mut StdRng>,
    capacity: f64,
    penalty: f64,
) -> Result<(candle_core::Tensor, f64, f64)> {
    let run = RunOptions::DIFFERENTIABLE;
    let t = &model.transformer;
    let mut probe = GateProbe::new(params, mode, noise);
    let x = t.embed_tokens(&input_ids(model, seq)?)?;
    let h = {
        let mut pass = Pass::plan(plan, run).with_probe(&mut probe);
        let x = t.run_layers(x, 0..t.n_layers(), &mut pass)?;
        t.final_norm(&x, run)?.squeeze(0)?
    };
    let kl = (sequence_loss(model, seq, &h, Some(base_hidden), LossKind::Kl, run)?
        / seq.scored() as f64)?;
    let kl_value = f64::from(kl.to_dtype(DType::F32)?.to_scalar::<f32>()?);
    let Some(share) = probe.executed_share()? else {
        bail!("nothing is routed: every routed block is skipped by the base plan");
    };
    let share_value = f64::from(share.to_dtype(DType::F32)?.to_scalar::<f32>()?);
    let loss = (kl + ((share - capacity)?.abs()? * penalty)?)?;
    Ok((loss, kl_value, share_value))
}

/// What one training epoch did.
enum Epoch {
    Done { kl: f64, share: f64 },
    NonFinite,
    Cancelled,
}

/// Progress of training, for a bar or a log line.
pub enum RouteEvent<'a> {
    /// Sequence `done` of `total` in epoch `epoch`, with its loss terms.
    Step {
        epoch: usize,
        done: usize,
        total: usize,
        kl: f64,
        share: f64,
    },
    Epoch(&'a RouteEpoch),
    /// Calibrating the threshold.
    Calibrating,
}

/// Trains routers over `plan` (frozen weights, the plan's skips and scales
/// kept). Ctrl-C (`cancel`) returns the best epoch so far.
pub fn train_routers(
    model: &Model,
    plan: &Plan,
    data: &TrainingData,
    opts: &RouteOptions,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(RouteEvent),
) -> Result<RouteResult> {
    check_capacity(opts.capacity)?;
    model.check_plan(plan)?;
    if opts.batch_size == 0 {
        bail!("the batch size must be at least 1");
    }
    if !(opts.lr.is_finite() && opts.lr > 0.0) {
        bail!("--lr must be a positive number");
    }
    if data.train.sequences.is_empty() || data.validation.sequences.is_empty() {
        bail!("routing needs training and validation sequences");
    }
    let blocks = routed_blocks(model, plan, opts.on);
    if blocks.is_empty() {
        bail!("no block left to route: the base plan skips every block --on selects");
    }
    let params = initial_params(model, &blocks, opts.router, opts.capacity, opts.seed)?;
    let vars = params.vars();
    let mut adam = new_adam(&vars, opts.lr)?;
    let mut lr = opts.lr;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let never = AtomicBool::new(false);
    // Judged as it will run: deterministic decisions at the threshold that
    // makes the first training sequences execute `capacity`.
    let calibration_set = data.train.take(CALIBRATION_SEQUENCES);
    let calibration_base = BaseStates {
        hidden: data.train_base.hidden[..calibration_set.sequences.len()].to_vec(),
    };
    let calibration = TrainingData {
        train: &calibration_set,
        train_base: &calibration_base,
        ..*data
    };
    let validate = |params: &TrainableParams| -> Result<(RoutedReport, f64, f32)> {
        let routers = routers_of(params, model)?;
        let (threshold, _) =
            calibrate_threshold(model, plan, &routers, opts, &calibration, &never)?;
        let routed = Routed {
            plan,
            routers: &routers,
            kv: opts.kv,
            threshold,
        };
        let r = measure_set(
            model,
            data.validation,
            data.validation_base,
            &routed,
            &never,
        )?;
        let miss = ((r.routed_share - opts.capacity).abs() - SHARE_TOLERANCE).max(0.0);
        Ok((
            r.clone(),
            r.kl_to_base + MISSED_SHARE_COST * miss,
            threshold,
        ))
    };
    let t0 = Instant::now();
    let (v0, l0, th0) = validate(&params)?;
    let first = RouteEpoch {
        epoch: 0,
        train_kl: f64::NAN,
        train_share: f64::NAN,
        validation_kl: v0.kl_to_base,
        validation_share: v0.routed_share,
        validation_loss: l0,
        threshold: th0,
        lr,
        seconds: t0.elapsed().as_secs_f64(),
        note: None,
    };
    on_event(RouteEvent::Epoch(&first));
    let mut best: (usize, f64, ParamValues) = (0, l0, params.values()?);
    let mut history = vec![first];
    let mut warnings = Vec::new();
    let mut cuts = 0;
    let mut epoch = 1;
    let mut cancelled = false;
    let mode = GateMode::StraightThrough { tau: opts.tau };
    let total = data.train.sequences.len();
    while epoch <= opts.epochs {
        let t = Instant::now();
        let before = params.values()?;
        let outcome = (|| -> Result<Epoch> {
            let (mut kl_sum, mut share_sum, mut n) = (0.0, 0.0, 0usize);
            let seqs: Vec<_> = data.train.sequences.iter().enumerate().collect();
            for batch in seqs.chunks(opts.batch_size) {
                let mut grads = GradStore::default();
                for &(i, seq) in batch {
                    if cancel.load(Ordering::Relaxed) {
                        return Ok(Epoch::Cancelled);
                    }
                    let (loss, kl, share) = sequence_objective(
                        model,
                        plan,
                        &params,
                        seq,
                        &data.train_base.hidden[i],
                        mode,
                        Some(&mut rng),
                        opts.capacity,
                        opts.penalty,
                    )?;
                    if !kl.is_finite() {
                        return Ok(Epoch::NonFinite);
                    }
                    let loss = (loss / batch.len() as f64)?;
                    let g = loss.backward()?;
                    for v in &vars {
                        if let Some(gv) = g.get(v.as_tensor()) {
                            let sum = match grads.remove(v.as_tensor()) {
                                Some(prev) => (prev + gv)?,
                                None => gv.clone(),
                            };
                            grads.insert(v.as_tensor(), sum);
                        }
                    }
                    kl_sum += kl;
                    share_sum += share;
                    n += 1;
                    on_event(RouteEvent::Step {
                        epoch,
                        done: n,
                        total,
                        kl,
                        share,
                    });
                }
                if !grads_finite(&grads, &vars)? {
                    return Ok(Epoch::NonFinite);
                }
                adam.step(&grads)?;
                if !params.all_finite()? {
                    return Ok(Epoch::NonFinite);
                }
            }
            Ok(Epoch::Done {
                kl: kl_sum / n.max(1) as f64,
                share: share_sum / n.max(1) as f64,
            })
        })()?;
        match outcome {
            Epoch::Cancelled => {
                cancelled = true;
                break;
            }
            Epoch::NonFinite => {
                cuts += 1;
                if cuts > MAX_LR_CUTS {
                    bail!(
                        "the routing loss stayed non-finite after lowering the learning rate \
                         {MAX_LR_CUTS} times (last tried {lr:.1e}); nothing was saved; try a smaller --lr"
                    );
                }
                let lower = lr / 10.0;
                warnings.push(format!(
                    "non-finite loss in epoch {epoch} at lr {lr:.1e}; restarted the epoch at lr {lower:.1e}"
                ));
                lr = lower;
                params.restore(&before)?;
                adam = new_adam(&vars, lr)?;
                continue;
            }
            Epoch::Done { kl, share } => {
                let (v, loss, threshold) = validate(&params)?;
                let e = RouteEpoch {
                    epoch,
                    train_kl: kl,
                    train_share: share,
                    validation_kl: v.kl_to_base,
                    validation_share: v.routed_share,
                    validation_loss: loss,
                    threshold,
                    lr,
                    seconds: t.elapsed().as_secs_f64(),
                    note: (cuts > 0).then(|| warnings.last().cloned()).flatten(),
                };
                on_event(RouteEvent::Epoch(&e));
                if loss < best.1 {
                    best = (epoch, loss, params.values()?);
                }
                history.push(e);
                epoch += 1;
            }
        }
    }
    params.restore(&best.2)?;
    let routers = routers_of(&params, model)?;
    let (threshold, calibrated) = if cancelled {
        (0.0, None)
    } else {
        on_event(RouteEvent::Calibrating);
        let (th, r) = calibrate_threshold(model, plan, &routers, opts, data, cancel)?;
        (th, Some(r))
    };
    Ok(RouteResult {
        routers,
        threshold,
        history,
        best_epoch: best.0,
        cancelled,
        warnings,
        calibrated,
    })
}

/// How far from the capacity a validation share may land and still count as at it.
const SHARE_TOLERANCE: f64 = 0.02;

/// Validation loss per unit of share missed beyond the tolerance.
const MISSED_SHARE_COST: f64 = 100.0;

/// Training sequences each epoch's threshold is calibrated on.
const CALIBRATION_SEQUENCES: usize = 8;

/// Bisection steps of the threshold calibration.
const CALIBRATION_STEPS: usize = 12;

/// The widest threshold bracket searched (a logit past ±64 is certain).
const MAX_THRESHOLD: f32 = 64.0;

/// The threshold at which the training sequences execute `capacity` of the
/// routed blocks (the share falls as the threshold rises), by bisection.
pub fn calibrate_threshold(
    model: &Model,
    plan: &Plan,
    routers: &Routers,
    opts: &RouteOptions,
    data: &TrainingData,
    cancel: &AtomicBool,
) -> Result<(f32, RoutedReport)> {
    let measure = |threshold: f32| {
        let routed = Routed {
            plan,
            routers,
            kv: opts.kv,
            threshold,
        };
        measure_set(model, data.train, data.train_base, &routed, cancel)
    };
    // The bracket spans every logit the routers give on the data's scale.
    let span = routers
        .by_block
        .values()
        .map(|r: &Router| r.logit_bound(model.cfg().hidden_size))
        .try_fold(0f32, |m, s| s.map(|s| m.max(s)))?
        .min(MAX_THRESHOLD)
        + 1.0;
    let (mut lo, mut hi) = (-span, span);
    let mut best = (0.0f32, measure(0.0)?);
    for _ in 0..CALIBRATION_STEPS {
        let mid = 0.5 * (lo + hi);
        let r = measure(mid)?;
        if (r.routed_share - opts.capacity).abs() < (best.1.routed_share - opts.capacity).abs() {
            best = (mid, r.clone());
        }
        if r.routed_share > opts.capacity {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(best)
}
