//! Hopscotch scale fitting: Adam (no weight decay) on the four scalars of
//! every layer, model weights frozen (plain tensors, so no gradient is even
//! computed for them). A skipped block's output scale (`b_att` / `b_mlp`) is
//! never read by the forward pass, so it gets no gradient: it is held at the
//! neutral 1, so restoring the block later gives it its full output (its
//! `s_*` scale does matter and is fitted). Held-out loss after each epoch; the
//! best epoch, the unfitted start included, is what is returned.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};

use super::objective::{
    mean_loss, mean_loss_with, sequence_loss, BaseStates, LayerInputs, LossKind, Start,
};
use crate::eval::data::TokenSet;
use crate::model::{Model, ParamValues, RunOptions, TrainableParams};
use crate::plan::{LayerScales, Plan};

/// How many times a non-finite loss may cut the learning rate before giving up.
pub(crate) const MAX_LR_CUTS: usize = 3;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FitOptions {
    pub epochs: usize,
    pub lr: f64,
    pub loss: LossKind,
    /// Sequences per Adam step (gradients summed over them).
    pub batch_size: usize,
    /// Starting scales (`None`: all 1, as the reference).
    #[serde(skip)]
    pub init: Option<Vec<LayerScales>>,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            epochs: 4,
            // The reference's final-fit rate; 1e-2 overshoots (measured: a
            // 1-epoch fit raised the held-out KL of attn.7 0.0317 → 0.0473).
            lr: 3e-3,
            loss: LossKind::Kl,
            batch_size: 4,
            init: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FitEpoch {
    /// 0 is the starting point, before any step.
    pub epoch: usize,
    /// Mean of this epoch's per-batch training losses (NaN for epoch 0).
    pub train_loss: f64,
    pub heldout_loss: f64,
    pub lr: f64,
    pub seconds: f64,
    /// A warning raised during this epoch (non-finite loss, lr lowered).
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FitResult {
    /// The input plan with the best epoch's scales.
    pub plan: Plan,
    pub history: Vec<FitEpoch>,
    pub best_epoch: usize,
    pub best_heldout_loss: f64,
    pub cancelled: bool,
    pub warnings: Vec<String>,
}

/// The fit's state: a plan's trainable parameters (Hopscotch's four scalars
/// per layer, or any named set a mode trains) and Adam over them.
pub struct Trainer<'a> {
    model: &'a Model,
    plan: &'a Plan,
    data: &'a TokenSet,
    base: Option<&'a BaseStates>,
    kind: LossKind,
    batch_size: usize,
    params: TrainableParams,
    adam: AdamW,
    pub lr: f64,
    start: Start<'a>,
}

/// What one epoch did: per-batch mean losses, or a non-finite loss.
pub enum EpochOutcome {
    Done(Vec<f64>),
    NonFinite,
    Cancelled,
}

impl<'a> Trainer<'a> {
    /// A trainer of the plan's Hopscotch scales (4 per layer).
    pub fn new(
        model: &'a Model,
        plan: &'a Plan,
        data: &'a TokenSet,
        base: Option<&'a BaseStates>,
        opts: &FitOptions,
    ) -> Result<Self> {
        let n = model.n_layers();
        let init = opts
            .init
            .clone()
            .unwrap_or_else(|| vec![LayerScales::IDENTITY; n]);
        if init.len() != n {
            bail!(
                "starting scales cover {} layers, the model has {n}",
                init.len()
            );
        }
        // Skipped blocks' output scales start (and so stay) neutral, as does
        // a kept block's meaningless 0 (see Plan::neutralise_output_scales).
        let mut start = plan.clone();
        start.scales = Some(init);
        start.neutralise_output_scales();
        let scales = start.scales.unwrap_or_default();
        let params = TrainableParams::residual_scales(&scales, model.device())?;
        Self::with_params(model, plan, data, base, opts, params)
    }

    /// A trainer of any named parameter set, read over the plan's constants
    /// (`TrainableParams::over`): whatever the pass reads by those names.
    pub fn with_params(
        model: &'a Model,
        plan: &'a Plan,
        data: &'a TokenSet,
        base: Option<&'a BaseStates>,
        opts: &FitOptions,
        params: TrainableParams,
    ) -> Result<Self> {
        if opts.batch_size == 0 {
            bail!("the fit's batch size must be at least 1");
        }
        if !(opts.lr.is_finite() && opts.lr > 0.0) {
            bail!("--lr must be a positive number");
        }
        if opts.loss == LossKind::Kl && base.is_none() {
            bail!("the KL loss needs the base model's states");
        }
        if params.is_empty() {
            bail!("nothing to train: the parameter set is empty");
        }
        let adam = new_adam(&params.vars(), opts.lr)?;
        Ok(Self {
            model,
            plan,
            data,
            base,
            kind: opts.loss,
            batch_size: opts.batch_size,
            params,
            adam,
            lr: opts.lr,
            start: Start::Embeddings,
        })
    }

    /// Trains only the layers from `layer` on, starting every sequence from
    /// its cached input to that layer (earlier scales stay as they are).
    pub fn starting_at(mut self, layer: usize, inputs: &'a LayerInputs) -> Self {
        self.start = Start::Layer(layer, inputs);
        self
    }

    pub fn params(&self) -> &TrainableParams {
        &self.params
    }

    /// The current residual scales as plain numbers (the plan's own for
    /// layers whose scales are not trained).
    pub fn scales(&self) -> Result<Vec<LayerScales>> {
        let fallback: Vec<_> = (0..self.model.n_layers())
            .map(|l| self.plan.scales_for(l))
            .collect();
        self.params.layer_scales(&fallback)
    }

    /// Restarts Adam at a (lower) learning rate, moments cleared.
    pub fn reset_optimizer(&mut self, lr: f64) -> Result<()> {
        self.lr = lr;
        self.adam = new_adam(&self.params.vars(), lr)?;
        Ok(())
    }

    /// The plan with the current scales.
    pub fn plan_with_scales(&self) -> Result<Plan> {
        let mut p = self.plan.clone();
        p.scales = Some(self.scales()?);
        Ok(p)
    }

    /// One pass over the data, one Adam step per batch.
    pub fn epoch(&mut self, cancel: &AtomicBool) -> Result<EpochOutcome> {
        let mut batch_losses = Vec::new();
        let data = self.data;
        let vars = self.params.vars();
        let mut index = 0;
        for batch in data.sequences.chunks(self.batch_size) {
            let tokens: usize = batch.iter().map(|s| s.scored()).sum();
            let mut grads = GradStore::default();
            let mut loss_sum = 0.0f64;
            for seq in batch {
                if cancel.load(Ordering::Relaxed) {
                    return Ok(EpochOutcome::Cancelled);
                }
                let run = RunOptions::DIFFERENTIABLE;
                let params = self.params.over(self.plan);
                let h = self
                    .start
                    .forward(self.model, seq, index, self.plan, &params, run)?;
                let b = self.base.map(|b| &b.hidden[index]);
                let loss =
                    (sequence_loss(self.model, seq, &h, b, self.kind, run)? / tokens as f64)?;
                loss_sum += f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
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
                index += 1;
            }
            if !loss_sum.is_finite() || !grads_finite(&grads, &vars)? {
                return Ok(EpochOutcome::NonFinite);
            }
            self.adam.step(&grads)?;
            if !self.params.all_finite()? {
                return Ok(EpochOutcome::NonFinite);
            }
            batch_losses.push(loss_sum);
        }
        Ok(EpochOutcome::Done(batch_losses))
    }
}

/// Adam as the fits use it (no weight decay); shared by every mode's trainer.
pub(crate) fn new_adam(vars: &[Var], lr: f64) -> Result<AdamW> {
    // torch.optim.Adam: no weight decay (candle's AdamW defaults to 0.01).
    let params = ParamsAdamW {
        lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    Ok(AdamW::new(vars.to_vec(), params)?)
}

/// Whether every gradient `vars` received is finite.
pub(crate) fn grads_finite(grads: &GradStore, vars: &[Var]) -> Result<bool> {
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            let a: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            if a.iter().any(|x| !x.is_finite()) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// The outcome of training a parameter set: the best epoch's values (the
/// start included) by held-out loss.
pub struct TrainResult {
    pub best: ParamValues,
    pub history: Vec<FitEpoch>,
    pub best_epoch: usize,
    pub best_heldout_loss: f64,
    pub cancelled: bool,
    pub warnings: Vec<String>,
}

/// Trains `trainer`'s parameters for `epochs`, measuring `heldout_loss`
/// after each epoch and keeping the best. A non-finite loss restarts the
/// epoch at a tenth of the learning rate (at most `MAX_LR_CUTS` times).
pub fn train(
    trainer: &mut Trainer,
    epochs: usize,
    cancel: &AtomicBool,
    heldout_loss: &mut dyn FnMut(&Trainer) -> Result<f64>,
    on_epoch: &mut dyn FnMut(&FitEpoch),
) -> Result<TrainResult> {
    let t0 = Instant::now();
    let first = FitEpoch {
        epoch: 0,
        train_loss: f64::NAN,
        heldout_loss: heldout_loss(trainer)?,
        lr: trainer.lr,
        seconds: t0.elapsed().as_secs_f64(),
        note: None,
    };
    on_epoch(&first);
    let mut best = (0usize, first.heldout_loss, trainer.params.values()?);
    let mut history = vec![first];
    let mut warnings = Vec::new();
    let mut cuts = 0;
    let mut epoch = 1;
    let mut cancelled = false;
    while epoch <= epochs {
        let t = Instant::now();
        let before = trainer.params.values()?;
        match trainer.epoch(cancel)? {
            EpochOutcome::Cancelled => {
                cancelled = true;
                break;
            }
            EpochOutcome::NonFinite => {
                cuts += 1;
                let lr = trainer.lr / 10.0;
                if cuts > MAX_LR_CUTS {
                    bail!(
                        "the fit's loss stayed non-finite after lowering the learning rate {MAX_LR_CUTS} times \
                         (last tried {:.1e}); nothing was saved; try a smaller --lr",
                        trainer.lr
                    );
                }
                warnings.push(format!(
                    "non-finite loss in epoch {epoch} at lr {:.1e}; restarted the epoch at lr {lr:.1e}",
                    trainer.lr
                ));
                trainer.params.restore(&before)?;
                trainer.reset_optimizer(lr)?;
                continue;
            }
            EpochOutcome::Done(losses) => {
                let e = FitEpoch {
                    epoch,
                    train_loss: losses.iter().sum::<f64>() / losses.len().max(1) as f64,
                    heldout_loss: heldout_loss(trainer)?,
                    lr: trainer.lr,
                    seconds: t.elapsed().as_secs_f64(),
                    note: warnings
                        .last()
                        .filter(|_| {
                            cuts > 0
                                && history
                                    .last()
                                    .is_some_and(|h: &FitEpoch| h.lr != trainer.lr)
                        })
                        .cloned(),
                };
                on_epoch(&e);
                if e.heldout_loss < best.1 {
                    best = (epoch, e.heldout_loss, trainer.params.values()?);
                }
                history.push(e);
                epoch += 1;
            }
        }
    }
    Ok(TrainResult {
        best: best.2,
        history,
        best_epoch: best.0,
        best_heldout_loss: best.1,
        cancelled,
        warnings,
    })
}

/// Trains a named parameter set read over `plan` (frozen weights), judged
/// by the same loss on `heldout`: the entry point for a mode's parameters.
#[allow(clippy::too_many_arguments)]
pub fn fit_params(
    model: &Model,
    plan: &Plan,
    params: TrainableParams,
    data: &TokenSet,
    heldout: &TokenSet,
    opts: &FitOptions,
    cancel: &AtomicBool,
    on_epoch: &mut dyn FnMut(&FitEpoch),
) -> Result<TrainResult> {
    model.check_plan(plan)?;
    let base = BaseStates::for_loss(model, opts.loss, data, cancel)?;
    let held_base = BaseStates::for_loss(model, opts.loss, heldout, cancel)?;
    let mut trainer = Trainer::with_params(model, plan, data, base.as_ref(), opts, params)?;
    let never = AtomicBool::new(false);
    let mut heldout_loss = |t: &Trainer| {
        let params = t.params().over(plan);
        mean_loss_with(
            model,
            heldout,
            held_base.as_ref(),
            plan,
            &params,
            opts.loss,
            Start::Embeddings,
            &never,
        )
    };
    train(
        &mut trainer,
        opts.epochs,
        cancel,
        &mut heldout_loss,
        on_epoch,
    )
}

/// Fits the scales of `plan` on `data`, keeping the epoch with the lowest
/// held-out loss. `on_epoch` sees epoch 0 (the start) and every epoch after.
/// Cancelling returns the best scales so far with `cancelled` set.
pub fn fit_scales(
    model: &Model,
    plan: &Plan,
    data: &TokenSet,
    heldout: &TokenSet,
    opts: &FitOptions,
    cancel: &AtomicBool,
    mut on_epoch: impl FnMut(&FitEpoch),
) -> Result<FitResult> {
    model.check_plan(plan)?;
    let base = BaseStates::for_loss(model, opts.loss, data, cancel)?;
    let held_base = BaseStates::for_loss(model, opts.loss, heldout, cancel)?;
    fit_with_states(
        model,
        plan,
        data,
        base.as_ref(),
        heldout,
        held_base.as_ref(),
        opts,
        cancel,
        &mut on_epoch,
    )
}

/// `fit_scales` with the base states already computed (the search and
/// `compare` fit many plans on the same data).
#[allow(clippy::too_many_arguments)]
pub fn fit_with_states(
    model: &Model,
    plan: &Plan,
    data: &TokenSet,
    base: Option<&BaseStates>,
    heldout: &TokenSet,
    held_base: Option<&BaseStates>,
    opts: &FitOptions,
    cancel: &AtomicBool,
    on_epoch: &mut dyn FnMut(&FitEpoch),
) -> Result<FitResult> {
    let mut trainer = Trainer::new(model, plan, data, base, opts)?;
    let never = AtomicBool::new(false);
    // The scales are judged as the plan's constants, as every later run uses them.
    let mut heldout_loss = |t: &Trainer| {
        let p = t.plan_with_scales()?;
        mean_loss(model, heldout, held_base, &p, opts.loss, &never)
    };
    let r = train(
        &mut trainer,
        opts.epochs,
        cancel,
        &mut heldout_loss,
        on_epoch,
    )?;
    trainer.params().restore(&r.best)?;
    Ok(FitResult {
        plan: trainer.plan_with_scales()?,
        history: r.history,
        best_epoch: r.best_epoch,
        best_heldout_loss: r.best_heldout_loss,
        cancelled: r.cancelled,
        warnings: r.warnings,
    })
}
