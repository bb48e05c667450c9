//! Hopscotch scale fitting (the `surgery` engine) of the current plan; the
//! job that runs it (`FitJob`) and its result (`Fitted`).

use std::sync::atomic::AtomicBool;

use anyhow::Result;

use super::activity::Busy;
use super::interface::{Apply, Job, JobCx, JobLane};
use super::Setup;
use crate::model::Model;
use crate::plan::Plan;
use crate::surgery::fit::{fit_scales, FitEpoch, FitOptions, FitResult};
use crate::tui::app::{App, JobKind, Origin, Request, Update};

pub fn options() -> FitOptions {
    FitOptions::default()
}

/// Fits the four scalars per layer on the calibration set; the best epoch
/// on the validation set wins.
pub fn fit(
    model: &Model,
    setup: &Setup,
    plan: &Plan,
    cancel: &AtomicBool,
    on_epoch: impl FnMut(&FitEpoch),
) -> Result<FitResult> {
    fit_scales(
        model,
        plan,
        &setup.calibration,
        &setup.validation,
        &options(),
        cancel,
        on_epoch,
    )
}

#[derive(Debug, Clone, PartialEq)]
pub struct FitJob {
    pub plan: Plan,
}

impl Job for FitJob {
    fn name(&self) -> String {
        JobKind::Fit.label()
    }

    fn lane(&self) -> JobLane {
        JobLane::Long
    }

    fn run(self: Box<Self>, cx: &JobCx) {
        let _busy = cx.busy(Busy::Fit);
        let epochs = options().epochs;
        let r = fit(cx.model, cx.setup, &self.plan, cx.cancel(), |e| {
            cx.send(Update::JobProgress {
                done: e.epoch,
                total: epochs,
                loss: Some(e.heldout_loss),
                detail: format!("epoch {}/{epochs}", e.epoch),
            })
        });
        match r {
            Ok(res) if res.cancelled => cx.send(Update::JobCancelled),
            Ok(res) => {
                cx.apply(Fitted(res.plan.clone()));
                cx.send(Update::JobFinished(format!(
                    "scales fitted (best epoch {}, validation KL {:.4})",
                    res.best_epoch, res.best_heldout_loss
                )));
            }
            Err(_) if cx.cancelled() => cx.send(Update::JobCancelled),
            Err(e) => cx.send(Update::JobFailed(format!("fit: {e:#}"))),
        }
    }
}

/// A fit finished: the plan with its scales becomes the current one.
#[derive(Debug, Clone, PartialEq)]
pub struct Fitted(pub Plan);

impl Apply for Fitted {
    fn apply(self: Box<Self>, app: &mut App) -> Vec<Request> {
        app.record_mut(&self.0, Origin::User);
        app.push_plan(self.0)
    }
}
