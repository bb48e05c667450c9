//! `scalpel search`: the greedy Hopscotch search with progress and ETA;
//! each step is saved to --out so `--resume` continues it.

use anyhow::{bail, Result};

use super::surgery_common as common;
use crate::cli::{self, SearchArgs};
use crate::surgery::hopscotch::{load_checkpoint, search, SearchEvent, SearchOptions};

pub fn run(margs: &cli::ModelArgs, args: SearchArgs) -> Result<()> {
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
