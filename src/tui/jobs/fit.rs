//! Hopscotch scale fitting (the `surgery` engine) of the current plan.

use std::sync::atomic::AtomicBool;

use anyhow::Result;

use super::Setup;
use crate::model::Model;
use crate::plan::Plan;
use crate::surgery::fit::{fit_scales, FitEpoch, FitOptions, FitResult};

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
