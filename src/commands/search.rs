//! `scalpel search`: the greedy Hopscotch search with progress and ETA;
//! each step is saved to --out so `--resume` continues it.

use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context, Result};

use super::surgery_common as common;
use crate::cli::{self, SearchArgs, SearchObjective};
use crate::eval::data::{prompts, TokenSet, CALIBRATION_PROMPTS};
use crate::model::Model;
use crate::surgery::hopscotch::{load_checkpoint, search, SearchEvent, SearchOptions};
use crate::surgery::speculative_search::{
    fit_draft, load_draft_search, save_draft_search, save_fitted_draft, search_draft, DraftFit,
    DraftScore, SpecSearchEvent, SpecSearchOptions, SpecSearchResult,
};
use crate::surgery::unless_cancelled;

pub fn run(margs: &cli::ModelArgs, args: SearchArgs) -> Result<()> {
    if args.objective == SearchObjective::Speculative {
        return run_speculative(margs, args);
    }
    let cancel = common::cancel_on_ctrl_c();
    let model = cli::load_model(margs)?;
    let mut opts = if args.exact {
        SearchOptions::exact(args.blocks, args.fit.loss.into(), args.refit_batch_size)
    } else {
        let mut o = SearchOptions::new(args.blocks, args.fit.loss.into());
        o.shortlist = args.shortlist;
        o.screen_samples = args.screen_samples;
        o.refit.batch_size = args.refit_batch_size;
        o.final_fit = common::fit_options(&args.fit);
        o
    };
    opts.include_mlp = args.include_mlp;
    opts.checkpoint = Some(args.out.clone());
    opts.validate(model.n_layers())?;
    if args.resume {
        if !args.out.exists() {
            bail!(
                "--resume: {} does not exist; run without --resume to start",
                args.out.display()
            );
        }
        opts.resume_from = load_checkpoint(&model, &opts, &args.out)?;
    }
    let calib = common::calibration(&model, &args.data, &cancel)?;
    let (train, validation) = common::fit_sets(&calib);
    let result = search(&model, &train, &validation, &opts, &cancel, |e| match e {
        SearchEvent::Preparing => eprintln!("scalpel: computing base states"),
        SearchEvent::Resumed { steps } => {
            eprintln!("scalpel: resuming after {steps} finished steps")
        }
        SearchEvent::Screening { step, done, total } if done == total => {
            eprintln!("step {step}: screened every candidate over {total} sequences")
        }
        SearchEvent::Screening { .. } => {}
        SearchEvent::Candidate {
            step,
            block,
            loss,
            done,
            total,
            eta_secs,
        } => eprintln!(
            "step {step}: {block:<8} loss {loss:.5}   [{done}/{total}, eta {}]",
            fmt_secs(*eta_secs)
        ),
        SearchEvent::StepDone {
            step,
            chosen,
            loss,
            seconds,
        } => eprintln!(
            "step {step}: skip {chosen} (loss {loss:.5}, {seconds:.1}s) — saved to {}",
            args.out.display()
        ),
        SearchEvent::Fitting(f) if f.epoch == 0 => {
            eprintln!("final fit: start, validation {:.5}", f.heldout_loss)
        }
        SearchEvent::Fitting(f) => eprintln!(
            "final fit: epoch {} train {:.5} validation {:.5} ({:.1}s)",
            f.epoch, f.train_loss, f.heldout_loss, f.seconds
        ),
    })?;
    let t = &result.timings;
    if result.cancelled {
        println!(
            "cancelled: {} of {} steps kept in {}; continue with --resume",
            result.steps.len(),
            args.blocks,
            args.out.display()
        );
        return Ok(());
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "plan": result.plan, "steps": result.steps, "timings": t,
            }))?
        );
    } else {
        println!("skip      {}", result.plan.describe());
        println!(
            "time      {:.1}s total: base states {:.1}s, screening {:.1}s, refits {:.1}s, final fit {:.1}s",
            t.total, t.base_states, t.screen, t.refit, t.final_fit
        );
        println!("plan      {}", args.out.display());
    }
    Ok(())
}

fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    format!("{}:{:02}", s / 60, s % 60)
}

/// `search --objective speculative`: greedy removal of the block that most
/// raises the self-speculative throughput proxy (candidates screened by
/// matchness first), saved after every step; `--fit` then fits the draft's
/// scales and drafts with and without them.
fn run_speculative(margs: &cli::ModelArgs, args: SearchArgs) -> Result<()> {
    let cancel = common::cancel_on_ctrl_c();
    if args.spec_prompts == 0 || args.spec_tokens < 2 {
        bail!("--spec-prompts must be at least 1 and --spec-tokens at least 2");
    }
    if !(args.verify_cost > 0.0 && args.verify_cost.is_finite()) {
        bail!("--verify-cost must be a positive number of decode steps");
    }
    let model = cli::load_model(margs)?;
    let run = args.weights.run_options(&model, true)?;
    let opts = SpecSearchOptions {
        max_blocks: args.blocks,
        include_mlp: args.include_mlp,
        draft_len: args.draft_len,
        max_new_tokens: args.spec_tokens,
        verify_cost: args.verify_cost,
        run,
        prescreen: args.prescreen,
        patience: args.patience,
    };
    // The built-in calibration prompts answered by the base model (as the
    // Hopscotch search fits on): the matchness screen's text and the fit's data.
    let calib = if opts.prescreen > 0 || args.fit_draft {
        common::calibration(&model, &args.data, &cancel)?
    } else {
        TokenSet {
            source: "none (no screen, no fit)".into(),
            sequences: Vec::new(),
        }
    };
    let screen = match args.screen_samples {
        0 => calib.clone(),
        n => calib.take(n),
    };
    let mut settings = serde_json::json!({
        "objective": "speculative",
        "include_mlp": opts.include_mlp,
        "draft_len": opts.draft_len.describe(),
        "prompts": args.spec_prompts,
        "tokens": opts.max_new_tokens,
        "verify_cost": opts.verify_cost,
        "quantized": run.quantized,
        "prescreen": opts.prescreen,
    });
    if opts.prescreen > 0 {
        settings["screen"] = serde_json::json!({
            "data": screen.source, "sequences": screen.sequences.len(),
            "scored_tokens": screen.scored_tokens(),
        });
        eprintln!(
            "scalpel: matchness screen on {} sequences ({} scored tokens); drafting the top {} per step",
            screen.sequences.len(),
            screen.scored_tokens(),
            opts.prescreen
        );
    }
    let resume = if args.resume {
        if !args.out.exists() {
            bail!(
                "--resume: {} does not exist; run without --resume to start",
                args.out.display()
            );
        }
        load_draft_search(&model, &settings, &args.out)?
    } else {
        Vec::new()
    };
    let calib_prompts = prompts(CALIBRATION_PROMPTS);
    let prompt_ids = calib_prompts
        .iter()
        .take(args.spec_prompts)
        .map(|p| model.prompt_ids(p, true))
        .collect::<Result<Vec<_>>>()?;
    if !resume.is_empty() {
        eprintln!("scalpel: resuming after {} finished steps", resume.len());
    }
    let mut done = resume.clone();
    let mut start = None;
    let result = search_draft(&model, &prompt_ids, &screen, &opts, resume, &cancel, |e| {
        match e {
                SpecSearchEvent::Matchness {
                    step,
                    block,
                    matchness,
                    done: n,
                    total,
                    eta_secs,
                } => eprintln!(
                    "step {step}: {block:<8} matchness {matchness:.4}   [screen {n}/{total}, eta {}]",
                    fmt_secs(*eta_secs)
                ),
                SpecSearchEvent::Candidate {
                    step,
                    block,
                    score,
                    done: n,
                    total,
                    eta_secs,
                } => eprintln!(
                    "step {step}: {block:<8} α {:.3} τ {:.2} c {:.3} proxy {:.3}×   [{n}/{total}, eta {}]",
                    score.acceptance_rate,
                    score.mean_accepted,
                    score.weight_fraction,
                    score.proxy_speedup,
                    fmt_secs(*eta_secs)
                ),
                SpecSearchEvent::Start(score) => {
                    start = Some(*score);
                    eprintln!(
                        "start: the full model as its own draft, proxy {:.3}×",
                        score.proxy_speedup
                    )
                }
                SpecSearchEvent::StepDone(s) => {
                    done.push(s.clone());
                    let start = start.context("the search reported a step before its start")?;
                    save_draft_search(&model, &start, &done, &settings, false, &args.out)?;
                    eprintln!(
                        "step {}: skip {} (proxy {:.3}×, {:.1}s) — saved to {}",
                        s.step,
                        s.chosen,
                        s.score.proxy_speedup,
                        s.seconds,
                        args.out.display()
                    );
                }
                SpecSearchEvent::NoGain { step, best } => eprintln!(
                    "step {step}: no removal raises the proxy above {best:.3}×; stopping"
                ),
            }
        Ok(())
    })?;
    save_draft_search(
        &model,
        &result.start,
        &result.steps,
        &settings,
        !result.cancelled,
        &args.out,
    )?;
    if result.cancelled {
        println!(
            "cancelled: {} steps kept in {}; continue with --resume",
            result.steps.len(),
            args.out.display()
        );
        return Ok(());
    }
    let fitted = if args.fit_draft {
        fit_the_draft(
            &model,
            &result,
            &prompt_ids,
            &opts,
            &calib,
            &args,
            &settings,
            &cancel,
        )?
    } else {
        None
    };
    if args.json {
        let mut v = serde_json::json!({
            "plan": result.plan, "start": result.start, "steps": result.steps,
            "seconds": result.seconds,
        });
        if let Some(f) = &fitted {
            v["plan"] = serde_json::to_value(&f.plan)?;
            v["unfitted"] = serde_json::to_value(f.unfitted)?;
            v["fitted"] = serde_json::to_value(f.fitted)?;
            v["fit_best_epoch"] = f.best_epoch.into();
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        // The kept prefix's score: a patient search may end past its best.
        let kept = result.plan.skip.len();
        let last = result.steps[..kept]
            .last()
            .map_or(result.start, |s| s.score);
        if kept == 0 {
            println!(
                "no draft beat the full model as its own draft (proxy {:.3}×); the saved plan skips nothing",
                result.start.proxy_speedup
            );
        }
        println!("skip      {}", result.plan.describe());
        let line = |label: &str, s: &DraftScore| {
            println!(
                "{label}α {:.3}, τ {:.2}, weights read {:.3} (not timed), proxy speed-up {:.3}× \
                 (verify cost {} step)",
                s.acceptance_rate,
                s.mean_accepted,
                s.weight_fraction,
                s.proxy_speedup,
                opts.verify_cost
            )
        };
        match &fitted {
            Some(f) => {
                line("unfitted  ", &f.unfitted);
                line("fitted    ", &f.fitted);
            }
            None => line("draft     ", &last),
        }
        println!("time      {:.1}s", result.seconds);
        println!(
            "plan      {} (scalpel speculate --plan {} to measure)",
            args.out.display(),
            args.out.display()
        );
    }
    Ok(())
}

/// `--fit`: the chosen skip set's scales fitted (the fit settings, KL by
/// default, as `scalpel fit`), drafted with and without them, and saved.
#[allow(clippy::too_many_arguments)]
fn fit_the_draft(
    model: &Model,
    result: &SpecSearchResult,
    prompt_ids: &[Vec<u32>],
    opts: &SpecSearchOptions,
    calib: &TokenSet,
    args: &SearchArgs,
    settings: &serde_json::Value,
    cancel: &AtomicBool,
) -> Result<Option<DraftFit>> {
    if result.plan.skip.is_empty() {
        eprintln!("scalpel: --fit: the search skipped no block, so there is nothing to fit");
        return Ok(None);
    }
    let (train, validation) = common::fit_sets(calib);
    let fit_opts = common::fit_options(&args.fit);
    eprintln!(
        "scalpel: fitting the draft's scales ({} loss, lr {}, {} epochs)",
        fit_opts.loss, fit_opts.lr, fit_opts.epochs
    );
    let fitted = fit_draft(
        model,
        &result.plan,
        prompt_ids,
        opts,
        &train,
        &validation,
        &fit_opts,
        cancel,
        |e| {
            if e.epoch == 0 {
                eprintln!("fit: epoch 0 (unfitted) validation {:.5}", e.heldout_loss)
            } else {
                eprintln!(
                    "fit: epoch {} train {:.5} validation {:.5} ({:.1}s)",
                    e.epoch, e.train_loss, e.heldout_loss, e.seconds
                )
            }
        },
    );
    let Some(Some(fitted)) = unless_cancelled(fitted, cancel)? else {
        eprintln!("scalpel: fit cancelled; the unfitted draft is saved");
        return Ok(None);
    };
    for w in &fitted.warnings {
        eprintln!("scalpel: warning: {w}");
    }
    save_fitted_draft(
        model,
        &result.start,
        &result.steps,
        settings,
        &fitted,
        &args.out,
    )?;
    eprintln!(
        "fit: best epoch {}; drafted unfitted α {:.3} τ {:.2} → fitted α {:.3} τ {:.2} — saved to {}",
        fitted.best_epoch,
        fitted.unfitted.acceptance_rate,
        fitted.unfitted.mean_accepted,
        fitted.fitted.acceptance_rate,
        fitted.fitted.mean_accepted,
        args.out.display()
    );
    Ok(Some(fitted))
}
