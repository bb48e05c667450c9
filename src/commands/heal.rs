//! `scalpel heal`: low-rank corrections of a skip plan's kept projections,
//! distilled from the base model; Ctrl-C keeps the best epoch so far.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::surgery_common as common;
use crate::cli::{self, DataArgs, LossArg};
use crate::plan::{PlanFile, HEAL_SECTION};
use crate::surgery::fit::FitOptions;
use crate::surgery::heal::{self, HealOptions, DEFAULT_RANK};
use crate::surgery::objective::{measure, BaseStates};
use crate::surgery::unless_cancelled;

#[derive(Args, Debug)]
pub struct HealArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Rank of each correction B·A.
    #[arg(long, default_value_t = DEFAULT_RANK)]
    pub rank: usize,
    /// Projections corrected: names (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj),
    /// or attn, mlp, all. Those of skipped blocks are left out.
    #[arg(long, default_value = "o_proj,down_proj")]
    pub targets: String,
    /// Layers corrected, e.g. 4..10,24 (default: all).
    #[arg(long, value_name = "LAYERS")]
    pub layers: Option<String>,
    /// Epochs over the calibration data (the best validation epoch is kept).
    #[arg(long, default_value_t = 6)]
    pub epochs: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Loss: kl = distillation from the base model (default); ce = the data's tokens.
    #[arg(long, value_enum, default_value = "kl")]
    pub loss: LossArg,
    /// Sequences per Adam step.
    #[arg(long, default_value_t = 2)]
    pub batch_size: usize,
    /// Seed of the factors' random start.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the healed plan (its factors go beside it).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
}

/// Parses `4..10,24` (half-open ranges and single layers).
pub fn parse_layers(s: &str) -> Result<Vec<usize>> {
    let mut out = std::collections::BTreeSet::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("--layers `{part}`: expected N or A..B (e.g. 4..10,24)");
        match part.split_once("..") {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().with_context(bad)?, b.parse().with_context(bad)?);
                if a >= b {
                    bail!("--layers `{part}`: the range is empty");
                }
                out.extend(a..b);
            }
            None => {
                out.insert(part.parse().with_context(bad)?);
            }
        }
    }
    if out.is_empty() {
        bail!("--layers names no layer");
    }
    Ok(out.into_iter().collect())
}

pub fn run(margs: &cli::ModelArgs, pargs: &cli::PlanArgs, args: HealArgs) -> Result<()> {
    if pargs.plan.is_none() && pargs.skip.is_none() {
        bail!("heal needs a plan: --plan FILE (or --skip BLOCKS)");
    }
    let targets = heal::parse_targets(&args.targets)?;
    let layers = args.layers.as_deref().map(parse_layers).transpose()?;
    let cancel = common::cancel_on_ctrl_c();
    let model = cli::load_model(margs)?;
    let (plan, file) = cli::load_plan(pargs, &model)?;
    if plan.skip.is_empty() {
        bail!("the plan skips no block; there is nothing to heal");
    }
    let opts = HealOptions {
        rank: args.rank,
        targets,
        layers,
        fit: FitOptions {
            epochs: args.epochs,
            lr: args.lr,
            loss: args.loss.into(),
            batch_size: args.batch_size,
            init: None,
        },
        seed: args.seed,
    };
    let pairs = heal::corrected_projections(&plan, model.n_layers(), &opts)?;
    let parameters = heal::parameter_count(&model, &pairs, opts.rank);
    let calib = common::calibration(&model, &args.data, &cancel)?;
    let heldout = common::heldout(&model, &args.data, &cancel)?;
    let (train, validation) = common::fit_sets(&calib);
    eprintln!(
        "scalpel: healing {} — rank {} on {} projections ({} trained parameters, {:.2}% of the \
         model); {} loss, lr {}, {} epochs",
        plan.describe(),
        opts.rank,
        pairs.len(),
        parameters,
        100.0 * parameters as f64 / model_parameters(&model) as f64,
        opts.fit.loss,
        opts.fit.lr,
        opts.fit.epochs
    );
    let t0 = Instant::now();
    let epochs = opts.fit.epochs;
    let result = heal::heal(
        &model,
        &plan,
        &train,
        &validation,
        &opts,
        &cancel,
        &mut |e| {
            if e.epoch == 0 {
                eprintln!(
                    "epoch 0 (the plan)  validation {} {:.5}",
                    opts.fit.loss, e.heldout_loss
                );
                return;
            }
            let per_epoch = t0.elapsed().as_secs_f64() / e.epoch as f64;
            eprintln!(
                "epoch {:<3} train {:.5}  validation {:.5}  ({:.1}s, ETA {:.0}s){}",
                e.epoch,
                e.train_loss,
                e.heldout_loss,
                e.seconds,
                per_epoch * (epochs - e.epoch) as f64,
                e.note
                    .as_deref()
                    .map(|n| format!("  [{n}]"))
                    .unwrap_or_default()
            );
        },
    )?;
    let seconds = t0.elapsed().as_secs_f64();
    for w in &result.train.warnings {
        eprintln!("scalpel: warning: {w}");
    }
    let r = &result.train;
    let mut pf = file.unwrap_or_else(|| PlanFile::new(model.identity.clone(), plan.clone()));
    pf.plan = plan.clone();
    pf.sections.set(HEAL_SECTION, &result.section)?;
    pf.write_artifact(
        &args.out,
        &result.section.artifact,
        &r.best,
        Some("low-rank corrections lora.LAYER.PROJ.{a (rank, in), b (out, rank)}: W + B·A"),
    )?;
    pf.metrics
        .insert("heal_history".into(), serde_json::to_value(&r.history)?);
    pf.metrics
        .insert("heal_best_epoch".into(), r.best_epoch.into());
    pf.metrics.insert("heal_seconds".into(), seconds.into());
    pf.provenance.insert(
        "heal".into(),
        serde_json::json!({"rank": opts.rank, "targets": result.section.targets,
            "loss": opts.fit.loss, "lr": opts.fit.lr, "epochs": opts.fit.epochs,
            "batch_size": opts.fit.batch_size, "seed": opts.seed,
            "training": train.source, "validation": validation.source,
            "cancelled": r.cancelled}),
    );
    // Saved before the held-out measurement, so a Ctrl-C there loses nothing.
    pf.save(&args.out)?;
    if r.best_epoch == 0 {
        eprintln!(
            "scalpel: warning: no epoch beat the plan on validation data; the saved corrections \
             are zero (the plan itself); try a lower --lr or more --calib-samples"
        );
    }
    if !r.cancelled {
        let healed = heal::with_factors(&plan, r.best.clone().into_iter().collect());
        let measured = (|| {
            let base = BaseStates::compute(&model, &heldout, &cancel)?;
            Ok((
                measure(&model, &heldout, &base, &plan, &cancel)?,
                measure(&model, &heldout, &base, &healed, &cancel)?,
            ))
        })();
        match unless_cancelled(measured, &cancel)? {
            Some((before, after)) => {
                eprintln!(
                    "held-out ({} tokens): KL to base {:.5} plan → {:.5} healed; perplexity {:.3} → \
                     {:.3}; top-1 {:.2}% → {:.2}%",
                    after.scored_tokens,
                    before.kl_to_base,
                    after.kl_to_base,
                    before.perplexity,
                    after.perplexity,
                    before.top1_agreement * 100.0,
                    after.top1_agreement * 100.0
                );
                pf.metrics.insert(
                    "heldout".into(),
                    serde_json::json!({"plan": before, "healed": after}),
                );
                pf.save(&args.out)?;
            }
            None => eprintln!("scalpel: held-out measurement cancelled; the healed plan is saved"),
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&pf)?);
    } else {
        println!(
            "best epoch {} (validation {} {:.5}, plan {:.5}); {} parameters, trained in {:.0}s{}; \
             healed plan written to {}",
            r.best_epoch,
            opts.fit.loss,
            r.best_heldout_loss,
            r.history[0].heldout_loss,
            parameters,
            seconds,
            if r.cancelled {
                " — cancelled, best so far kept"
            } else {
                ""
            },
            args.out.display()
        );
    }
    Ok(())
}

/// Scalars in the model's weight matrices and embeddings (for the share).
fn model_parameters(model: &crate::model::Model) -> usize {
    let c = model.cfg();
    let per_layer: usize = model
        .transformer
        .layers
        .iter()
        .map(|l| {
            crate::model::lowrank::projection_shapes(l)
                .iter()
                .map(|(o, i)| o * i)
                .sum::<usize>()
        })
        .sum();
    per_layer + c.vocab_size * c.hidden_size
}
