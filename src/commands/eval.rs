//! `scalpel eval`: perplexity, KL to base and top-1 agreement over a text.

use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context, Result};

use crate::cli::{self, EvalArgs};
use crate::eval::{kv, perplexity};
use crate::model::kv::KvSpec;
use crate::model::routing::{load_from_given, ROUTING_SECTION};
use crate::model::{Model, RunOptions};
use crate::plan::{KvSection, Plan, HEAL_SECTION, KV_SECTION};
use crate::progress;
use crate::surgery::replace::REPLACE_SECTION;
use crate::surgery::sparsity::{
    self, evaluate::HeldOut, Sparsifier, SparsitySection, SPARSITY_SECTION,
};

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
    let (plan, file) = cli::load_plan_honouring(
        pargs,
        &model,
        &[
            KV_SECTION,
            REPLACE_SECTION,
            SPARSITY_SECTION,
            ROUTING_SECTION,
            HEAL_SECTION,
        ],
    )?;
    let ids = model.codec()?.encode(&text)?;
    let run = args.weights.run_options(&model, false)?;
    // Before the routers: a plan with both sections is refused, not run routed.
    let sparse = sparsity::load_from_given(file.as_ref(), &model)?;
    if let Some((section, routers)) = load_from_given(file.as_ref(), &model)? {
        return super::route::eval_routed(&model, &plan, &ids, section, &routers, &args, run);
    }
    let section = match &file {
        Some(f) => f.sections.get::<KvSection>(KV_SECTION)?,
        None => None,
    };
    let specs = match (&args.kv, section) {
        (Some(list), _) => Some(KvSpec::parse_list(list)?),
        (None, Some(s)) => Some(vec![s.spec()?]),
        (None, None) => None,
    };
    if let Some((section, sp)) = sparse {
        if specs.is_some() {
            bail!("a sparsity plan is not combined with a KV budget policy yet: drop --kv");
        }
        return run_sparse(&model, &plan, &section, &sp, &ids, &args, run);
    }
    if let Some(specs) = specs {
        return run_kv(&model, &plan, &ids, &specs, &args, run);
    }
    if args.context.is_some() || args.decode_speed > 0 {
        bail!("--context and --decode-speed go with --kv (a KV budget policy); use --window for plain perplexity");
    }
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
        if plan == Plan::base() {
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

/// `eval --plan` with a `sparsity` section: the plan's block skips plus
/// its head/neuron mask or channel thresholds.
fn run_sparse(
    model: &Model,
    plan: &Plan,
    section: &SparsitySection,
    sp: &Sparsifier,
    ids: &[u32],
    args: &EvalArgs,
    run: RunOptions,
) -> Result<()> {
    let held = HeldOut::new(model, ids, args.window, usize::MAX)?;
    let cancel = AtomicBool::new(false);
    let q = sparsity::evaluate::evaluate(model, plan, sp, &held, run, true, &cancel)?;
    let what = format!(
        "{} at level {} ({}; {})",
        section.method,
        section.level,
        section.method.unit(),
        if section.method.drops_units() {
            "executed: sliced weights"
        } else {
            "masked in these windows; decode runs the sparse-input kernel"
        }
    );
    if args.json {
        let mut v = serde_json::to_value(&q)?;
        v["plan"] = plan.describe().into();
        v["sparsity"] = what.into();
        v["window"] = args.window.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("plan            {}", plan.describe());
    println!("sparsity        {what}");
    println!("perplexity      {:.4}", q.perplexity);
    println!("kl to base      {:.5} nats/token", q.kl_to_base);
    println!("top-1 agreement {:.2}%", q.top1_agreement * 100.0);
    if let Some(z) = q.channels_zeroed {
        println!("channels zeroed {:.1}% of projection inputs", z * 100.0);
    }
    println!(
        "tokens          {} scored in {} windows of {}",
        q.scored_tokens,
        held.windows.len(),
        args.window
    );
    Ok(())
}

/// `eval --kv`: the policies against the full cache at long context.
fn run_kv(
    model: &Model,
    plan: &Plan,
    ids: &[u32],
    specs: &[KvSpec],
    args: &EvalArgs,
    run: RunOptions,
) -> Result<()> {
    let max = model.transformer.max_positions();
    let context = args.context.unwrap_or(max.min(8192));
    let opts = kv::KvEvalOptions {
        context,
        chunk: args.chunk,
        recall: !args.no_recall,
        run,
        parallel_windows: true,
        cancel: None,
    };
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    if args.decode_speed > 0 {
        let cfg = model.cfg();
        let bos = if cfg.add_bos { cfg.bos_token_id } else { None };
        let mut prompt = perplexity::windows(ids, context, bos).swap_remove(0);
        prompt.truncate(max - args.decode_speed - 1);
        let decode_run = args.weights.run_options(model, true)?;
        let rows = kv::decode_speed_under(
            model,
            &prompt,
            plan,
            specs,
            args.decode_speed,
            3,
            decode_run,
        )?;
        if args.json {
            let v = serde_json::json!({"context": prompt.len(), "steps": args.decode_speed, "decode_speed": rows, "plan": plan.describe()});
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        println!(
            "decode          {} steps after a {}-token prefill ({}, plan {})",
            args.decode_speed,
            prompt.len(),
            if decode_run.quantized {
                "quantized weights"
            } else {
                "f32 weights"
            },
            plan.describe()
        );
        for s in &rows {
            println!(
                "  {:<22} {:>7.1} tok/s  KV {:>6.1} MiB  {}",
                s.policy,
                s.decode_tokens_per_sec,
                mib(s.kv_bytes),
                if s.executed { "executed" } else { "baseline" }
            );
        }
        return Ok(());
    }
    let report = kv::evaluate_kv_under(model, ids, plan, specs, opts, |_, _| {})?;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["plan"] = plan.describe().into();
        v["model"] = serde_json::to_value(&model.identity)?;
        v["threads"] = rayon::current_num_threads().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "context         {} tokens in {} window{}, prefill chunks of {}; scored: positions ≥ {} ({} tokens)",
        report.context,
        report.windows,
        if report.windows == 1 { "" } else { "s" },
        report.chunk,
        report.scored_from,
        report.scored_tokens
    );
    if *plan != Plan::base() {
        println!(
            "plan            {} (the full cache and every policy run under it; KL is to the plan with the full cache)",
            plan.describe()
        );
    }
    println!(
        "full cache      perplexity {:.4}, KV {:.1} MiB",
        report.full_perplexity,
        mib(report.full_kv_bytes)
    );
    println!(
        "{:<22} {:>10} {:>8} {:>9} {:>7} {:>7} {:>8}",
        "policy", "perplexity", "Δ", "KL", "top-1", "recall", "KV MiB"
    );
    for r in &report.rows {
        let recall = r
            .attention_recall
            .map_or("-".to_string(), |x| format!("{:.1}%", x * 100.0));
        println!(
            "{:<22} {:>10.4} {:>+7.2}% {:>9.5} {:>6.2}% {:>7} {:>8.1}{}",
            r.policy,
            r.perplexity,
            (r.perplexity / report.full_perplexity - 1.0) * 100.0,
            r.kl_to_full,
            r.top1_agreement * 100.0,
            recall,
            mib(r.kv_bytes),
            if r.budget_covers_context {
                "  (the budget holds the whole context: this is the full cache)"
            } else {
                ""
            }
        );
    }
    println!("({:.1}s)", report.seconds);
    Ok(())
}
