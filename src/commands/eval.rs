//! `scalpel eval`: perplexity, KL to base and top-1 agreement over a text.

use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context, Result};

use crate::cli::{self, EvalArgs};
use crate::eval::perplexity;
use crate::progress;

pub use crate::eval::data::DEFAULT_EVAL_TEXT;

pub fn run(margs: &cli::ModelArgs, pargs: &cli::PlanArgs, args: EvalArgs) -> Result<()> {
    let text = match &args.text {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read --text {}", p.display()))?,
        None => DEFAULT_EVAL_TEXT.to_string(),
    };
    if text.trim().is_empty() {
        bail!("the evaluation text is empty");
    }
    // One window per thread at a time (main() set one thread per op).
    let load = args
        .weights
        .load_options(args.window, rayon::current_num_threads());
    let model = cli::load_model_for(margs, load)?;
    let (plan, _) = cli::load_plan(pargs, &model)?;
    let ids = model.codec()?.encode(&text)?;
    let run = args.weights.run_options(&model, false)?;
    let opts = perplexity::EvalOptions {
        window: args.window,
        compare_base: !args.no_base,
        run,
        // main() set one thread per op for `eval`.
        parallel_windows: true,
    };
    let pb = progress::bar(ids.len().div_ceil(args.window), "windows");
    let report = perplexity::evaluate(
        &model,
        &ids,
        &plan,
        opts,
        &AtomicBool::new(false),
        |d, _| pb.set_position(d as u64),
    );
    pb.finish_and_clear();
    let report = report?;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["plan"] = plan.describe().into();
        v["model"] = serde_json::to_value(&model.identity)?;
        v["window"] = args.window.into();
        v["threads"] = rayon::current_num_threads().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("plan            {}", plan.describe());
        println!("perplexity      {:.4}", report.perplexity);
        if plan.skip.is_empty() && !plan.has_scales() {
            println!("kl to base      0 (this is the base model)");
        } else if args.no_base {
            println!("kl to base      (not measured: --no-base)");
        } else {
            println!("kl to base      {:.5} nats/token", report.kl_to_base);
            println!("top-1 agreement {:.2}%", report.top1_agreement * 100.0);
        }
        println!(
            "tokens          {} in {} windows of {} ({} scored)",
            report.tokens, report.windows, args.window, report.scored_tokens
        );
        println!(
            "speed           {:.1} tok/s through {} forward pass{} per window ({:.2}s wall, {} threads, one window each)",
            report.tokens_per_sec,
            report.forward_passes,
            if report.forward_passes == 1 { "" } else { "es" },
            report.seconds,
            rayon::current_num_threads()
        );
    }
    Ok(())
}
