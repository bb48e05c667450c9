//! `scalpel replace`: attention layers become distilled gated linear mixers
//! (`surgery::replace`); writes a v2 plan with a `replace` section and the
//! mixers as an artifact. Ctrl-C keeps the best epoch so far.

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Result};

use super::surgery_common as common;
use crate::cli::{self, ReplaceArgs};
use crate::model::mixer::{Dims, Replaced};
use crate::plan::{BlockId, LayerScales, Plan, PlanFile};
use crate::setup;
use crate::surgery::fit::{FitEpoch, FitOptions};
use crate::surgery::objective::{measure, BaseStates, LossKind};
use crate::surgery::replace::{self as rep, LocalTargets};
use crate::surgery::unless_cancelled;

pub fn run(margs: &cli::ModelArgs, pargs: &cli::PlanArgs, args: ReplaceArgs) -> Result<()> {
    let cancel = common::cancel_on_ctrl_c();
    let model = cli::load_model(margs)?;
    let (plan, layers, input_plan) = layers_and_plan(&model, pargs, &args)?;
    let dims = Dims::of(model.cfg());
    eprintln!(
        "scalpel: replacing attention {} with gated linear mixers ({} trained parameters each, \
         {} bytes of recurrent state per sequence instead of a KV cache)",
        list(&layers),
        dims.parameters(),
        dims.state_bytes()
    );
    let t0 = Instant::now();
    let calib = common::calibration(&model, &args.data, &cancel)?;
    let heldout = common::heldout(&model, &args.data, &cancel)?;
    let (train, validation) = common::fit_sets(&calib);
    let mut params = rep::init_params(&model, &layers)?;

    // 1. Layer-local: each mixer against its attention on cached inputs.
    let local_opts = FitOptions {
        epochs: args.local_epochs,
        lr: args.local_lr,
        loss: LossKind::Kl,
        batch_size: args.local_batch_size,
        init: None,
    };
    let local = if args.local_epochs > 0 {
        let tt = rep::LocalTargets::compute(&model, &train, &layers, &cancel)?;
        let vt = LocalTargets::compute(&model, &validation, &layers, &cancel)?;
        let started = Instant::now();
        let total_steps =
            layers.len() * args.local_epochs * tt_batches(&train, args.local_batch_size);
        let mut done = 0usize;
        let fits = rep::distil_local(
            &model,
            &layers,
            &params,
            &tt,
            &vt,
            &local_opts,
            &cancel,
            &mut |layer, epoch, b, n, loss| {
                done += 1;
                let eta = started.elapsed().as_secs_f64() / done as f64
                    * total_steps.saturating_sub(done) as f64;
                eprint!(
                    "\rlocal attn.{layer} epoch {epoch} step {b}/{n}  loss {loss:.4}  ETA {}   ",
                    secs(eta)
                );
                let _ = std::io::stderr().flush();
            },
            &mut |layer, e| {
                eprintln!(
                    "\rlocal attn.{layer} epoch {:<2} train {:.4}  validation rel. error {:.4}  ({:.1}s){}",
                    e.epoch,
                    e.train_loss,
                    e.heldout_loss,
                    e.seconds,
                    note(e)
                )
            },
        )?;
        Some(fits)
    } else {
        None
    };

    // 2. End to end: KL to the base model, only the mixers (and maybe scales).
    let mut training_plan = plan.clone();
    training_plan.replace = Some(Replaced::layers(layers.iter().copied()));
    if args.train_scales {
        rep::add_scales(&mut params, &training_plan, &model)?;
    }
    let mut history = Vec::new();
    let mut cancelled = cancel.load(std::sync::atomic::Ordering::Relaxed);
    if args.epochs > 0 && !cancelled {
        let opts = FitOptions {
            epochs: args.epochs,
            lr: args.lr,
            loss: LossKind::Kl,
            batch_size: args.batch_size,
            init: None,
        };
        let started = Instant::now();
        let (r, best) = rep::distil_end_to_end(
            &model,
            &training_plan,
            params,
            &train,
            &validation,
            &opts,
            &cancel,
            &mut |e: &FitEpoch| {
                let eta = if e.epoch == 0 {
                    String::new()
                } else {
                    let per = started.elapsed().as_secs_f64() / e.epoch as f64;
                    format!(
                        "  ETA {}",
                        secs(per * (args.epochs.saturating_sub(e.epoch)) as f64)
                    )
                };
                eprintln!(
                    "end-to-end epoch {:<2} train KL {:.5}  validation KL {:.5}  ({:.1}s){eta}{}",
                    e.epoch,
                    e.train_loss,
                    e.heldout_loss,
                    e.seconds,
                    note(e)
                )
            },
        )?;
        for w in &r.warnings {
            eprintln!("scalpel: warning: {w}");
        }
        cancelled |= r.cancelled;
        eprintln!(
            "end-to-end best epoch {} (validation KL {:.5})",
            r.best_epoch, r.best_heldout_loss
        );
        history = r.history;
        params = best;
    }
    let train_seconds = t0.elapsed().as_secs_f64();

    // 3. The plan: mixers as constants, trained scales if any.
    let mut out_plan = rep::plan_with_mixers(&plan, &layers, &params)?;
    if args.train_scales {
        let fallback: Vec<LayerScales> =
            (0..model.n_layers()).map(|l| plan.scales_for(l)).collect();
        out_plan.scales = Some(params.layer_scales(&fallback)?);
    }
    let mut pf = PlanFile::new(model.identity.clone(), out_plan.clone());
    rep::save(&mut pf, &args.out, &layers, &params)?;
    pf.metrics
        .insert("replace_local".into(), serde_json::to_value(&local)?);
    pf.metrics
        .insert("replace_end_to_end".into(), serde_json::to_value(&history)?);
    pf.metrics
        .insert("replace_train_seconds".into(), train_seconds.into());
    pf.provenance.insert(
        "replace".into(),
        serde_json::json!({"layers": layers, "from_plan": args.from_plan, "local_epochs": args.local_epochs,
            "local_lr": args.local_lr, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "local_batch_size": args.local_batch_size,
            "train_scales": args.train_scales, "training": train.source, "validation": validation.source,
            "cancelled": cancelled, "threads": rayon::current_num_threads()}),
    );
    pf.save(&args.out)?;
    eprintln!(
        "scalpel: trained in {} ({} threads); plan written to {}",
        secs(train_seconds),
        rayon::current_num_threads(),
        args.out.display()
    );

    // 4. Held-out: the plan that was given (skips) against the replacement.
    let measured = (|| -> Result<_> {
        let base = BaseStates::compute(&model, &heldout, &cancel)?;
        let before = measure(&model, &heldout, &base, &input_plan, &cancel)?;
        let after = measure(&model, &heldout, &base, &out_plan, &cancel)?;
        Ok((before, after))
    })();
    if let Some((before, after)) = unless_cancelled(measured, &cancel)? {
        eprintln!(
            "held-out ({} tokens): {} KL {:.5}, ppl {:.3}, top-1 {:.2}% → replaced KL {:.5}, ppl {:.3}, top-1 {:.2}%",
            after.scored_tokens,
            input_plan.describe(),
            before.kl_to_base,
            before.perplexity,
            before.top1_agreement * 100.0,
            after.kl_to_base,
            after.perplexity,
            after.top1_agreement * 100.0
        );
        pf.metrics.insert(
            "heldout".into(),
            serde_json::json!({"input_plan": before, "replaced": after}),
        );
        pf.save(&args.out)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&pf)?);
    } else {
        println!(
            "replaced {} ({}); plan written to {}",
            list(&layers),
            if cancelled {
                "cancelled: best so far kept"
            } else {
                "distilled"
            },
            args.out.display()
        );
    }
    Ok(())
}

/// The plan to start from, the layers to replace and the plan they are
/// compared with: `--layers` over `--plan`/`--skip` (a skipped layer is
/// refused), or `--from-plan`, whose skipped attention becomes mixers.
fn layers_and_plan(
    model: &crate::model::Model,
    pargs: &cli::PlanArgs,
    args: &ReplaceArgs,
) -> Result<(Plan, Vec<usize>, Plan)> {
    let (plan, mut layers, input) = match (&args.layers, &args.from_plan) {
        (Some(_), Some(_)) => bail!("give --layers or --from-plan, not both"),
        (None, None) => {
            bail!("replace needs --layers (e.g. --layers 6,7,25,28) or --from-plan PLAN")
        }
        (Some(ls), None) => {
            let (plan, _) = cli::load_plan(pargs, model)?;
            if let Some(l) = ls.iter().find(|&&l| plan.skips_attn(l)) {
                bail!(
                    "attn.{l} is skipped by the plan; a block is either skipped or replaced: drop it \
                     from --layers, or use --from-plan to replace the plan's skipped attention"
                );
            }
            let mut input = plan.clone();
            input.skip.extend(ls.iter().map(|&l| BlockId::attn(l)));
            (plan, ls.clone(), input)
        }
        (None, Some(path)) => {
            let pf = model.load_plan(path)?;
            setup::refuse_sections(&pf, path, "replace", &[])?;
            let input = model.with_implied(&pf.plan);
            model.check_plan(&input)?;
            let layers = input.skipped_attn_layers();
            if layers.is_empty() {
                bail!(
                    "plan {} skips no attention layer: there is nothing to replace (use --layers)",
                    path.display()
                );
            }
            let mut plan = input.clone();
            for &l in &layers {
                plan.skip.remove(&BlockId::attn(l));
                if let Some(s) = plan.scales.as_mut().and_then(|s| s.get_mut(l)) {
                    s.b_att = 1.0;
                    s.s_att = 1.0;
                }
            }
            eprintln!(
                "scalpel: the plan's skipped attention {} is replaced (no longer skipped); its other \
                 skips and scales are kept, those layers' attention scales reset to 1",
                list(&layers)
            );
            (plan, layers, input)
        }
    };
    layers.sort_unstable();
    layers.dedup();
    let n = model.n_layers();
    if let Some(l) = layers.iter().find(|&&l| l >= n) {
        bail!(
            "--layers names {l}, but the model has {n} layers (0..={})",
            n - 1
        );
    }
    Ok((plan, layers, input))
}

fn tt_batches(set: &crate::eval::data::TokenSet, batch: usize) -> usize {
    set.sequences.len().div_ceil(batch.max(1))
}

fn list(layers: &[usize]) -> String {
    layers
        .iter()
        .map(|l| format!("attn.{l}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn note(e: &FitEpoch) -> String {
    e.note
        .as_deref()
        .map(|n| format!("  [{n}]"))
        .unwrap_or_default()
}

fn secs(s: f64) -> String {
    if s >= 60.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{s:.0}s")
    }
}
