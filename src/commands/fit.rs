//! `scalpel fit`: fit a plan's scales; Ctrl-C keeps the best epoch so far.

use std::sync::atomic::AtomicBool;

use anyhow::{bail, Result};

use super::surgery_common as common;
use crate::cli::{self, FitArgs};
use crate::eval::data::TokenSet;
use crate::model::Model;
use crate::plan::{Plan, PlanFile};
use crate::surgery::fit::fit_scales;
use crate::surgery::objective::{measure, BaseStates, SetReport};
use crate::surgery::unless_cancelled;

pub fn run(margs: &cli::ModelArgs, pargs: &cli::PlanArgs, args: FitArgs) -> Result<()> {
    let Some(out) = args.out.clone().or_else(|| pargs.plan.clone()) else {
        bail!("fit needs a plan: --plan FILE (and/or --skip BLOCKS with --out FILE)");
    };
    let cancel = common::cancel_on_ctrl_c();
    let model = cli::load_model(margs)?;
    let (plan, file) = cli::load_plan(pargs, &model)?;
    if plan.skip.is_empty() {
        bail!("the plan skips no block; there is nothing for the scales to compensate");
    }
    let calib = common::calibration(&model, &args.data, &cancel)?;
    let heldout = common::heldout(&model, &args.data, &cancel)?;
    let (train, validation) = common::fit_sets(&calib);
    let mut opts = common::fit_options(&args.fit);
    // A plan that already has scales is refined from them, not restarted from 1.
    opts.init = plan.scales.clone();
    eprintln!(
        "scalpel: fitting {} ({} loss, lr {}, {} epochs)",
        plan.describe(),
        opts.loss,
        opts.lr,
        opts.epochs
    );
    let result = fit_scales(&model, &plan, &train, &validation, &opts, &cancel, |e| {
        if e.epoch == 0 {
            eprintln!(
                "epoch 0 (unfitted)  validation {} {:.5}",
                opts.loss, e.heldout_loss
            );
        } else {
            eprintln!(
                "epoch {:<3} train {:.5}  validation {:.5}  ({:.1}s){}",
                e.epoch,
                e.train_loss,
                e.heldout_loss,
                e.seconds,
                e.note
                    .as_deref()
                    .map(|n| format!("  [{n}]"))
                    .unwrap_or_default()
            );
        }
    })?;
    for w in &result.warnings {
        eprintln!("scalpel: warning: {w}");
    }
    let mut pf = file.unwrap_or_else(|| PlanFile::new(model.identity.clone(), plan.clone()));
    pf.plan = result.plan.clone();
    pf.metrics
        .insert("fit_history".into(), serde_json::to_value(&result.history)?);
    pf.metrics
        .insert("fit_best_epoch".into(), result.best_epoch.into());
    pf.provenance.insert(
        "fit".into(),
        serde_json::json!({"loss": opts.loss, "lr": opts.lr, "epochs": opts.epochs,
            "batch_size": opts.batch_size, "training": train.source, "validation": validation.source,
            "heldout": heldout.source,
            "cancelled": result.cancelled}),
    );
    // Saved before the held-out measurement, so a Ctrl-C there loses nothing.
    pf.save(&out)?;
    if !result.cancelled {
        // The held-out set picked nothing above, so its numbers are honest.
        let measured = heldout_before_after(&model, &heldout, &plan, &result.plan, &cancel);
        match unless_cancelled(measured, &cancel)? {
            Some((before, after)) => {
                eprintln!(
                    "held-out ({} tokens): KL to base {:.5} unfitted → {:.5} fitted; perplexity {:.3} → {:.3}",
                    after.scored_tokens,
                    before.kl_to_base,
                    after.kl_to_base,
                    before.perplexity,
                    after.perplexity
                );
                pf.metrics.insert(
                    "heldout".into(),
                    serde_json::json!({"unfitted": before, "fitted": after}),
                );
                pf.save(&out)?;
            }
            None => eprintln!("scalpel: held-out measurement cancelled; the fitted plan is saved"),
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&pf)?);
    } else {
        println!(
            "best epoch {} (validation {} {:.5}, unfitted {:.5}){}; plan written to {}",
            result.best_epoch,
            opts.loss,
            result.best_heldout_loss,
            result.history[0].heldout_loss,
            if result.cancelled {
                " — cancelled, best so far kept"
            } else {
                ""
            },
            out.display()
        );
    }
    Ok(())
}

/// Held-out quality of the plan as given and as fitted.
fn heldout_before_after(
    model: &Model,
    heldout: &TokenSet,
    before: &Plan,
    after: &Plan,
    cancel: &AtomicBool,
) -> Result<(SetReport, SetReport)> {
    let base = BaseStates::compute(model, heldout, cancel)?;
    Ok((
        measure(model, heldout, &base, before, cancel)?,
        measure(model, heldout, &base, after, cancel)?,
    ))
}
