//! `scalpel bench`: prefill/decode speed of the base model and the plan.

use anyhow::{bail, Result};

use crate::cli::{self, BenchArgs};
use crate::eval::bench;
use crate::model::routing::{load_from_given, ROUTING_SECTION};
use crate::model::{synthetic, Model, RunOptions};
use crate::plan::{Plan, PlanFile};
use crate::progress;
use crate::report::modes::sparse_speeds;
use crate::surgery::routing::speed::{speed_interleaved, SpeedEntry, SpeedOptions};
use crate::surgery::sparsity::{SparsitySection, SPARSITY_SECTION};

/// Plan sections `bench` carries out (a routed plan only as `--plan`).
const STATIC_SECTIONS: [&str; 2] = [
    crate::surgery::replace::REPLACE_SECTION,
    crate::plan::HEAL_SECTION,
];

/// `--against`'s plan (skips, scales, a replacement or a healing), checked
/// against the model.
pub fn against_plan(model: &Model, args: &BenchArgs) -> Result<Option<Plan>> {
    let Some(path) = &args.against else {
        return Ok(None);
    };
    let pargs = cli::PlanArgs {
        plan: Some(path.clone()),
        skip: None,
    };
    Ok(Some(
        cli::load_plan_honouring(&pargs, model, &STATIC_SECTIONS)?.0,
    ))
}

/// Times `entries` one after another per round on the built-in text (drift
/// hits all alike) and prints the table, or JSON with `--json`.
pub fn interleaved(
    model: &Model,
    entries: &[SpeedEntry],
    args: &BenchArgs,
    run: RunOptions,
    label: &str,
) -> Result<()> {
    let ids = model
        .codec()?
        .encode(crate::eval::data::DEFAULT_EVAL_TEXT)?;
    let opts = SpeedOptions {
        prefill_tokens: args.prefill,
        decode_tokens: args.decode,
        runs: args.runs,
        run,
    };
    let pb = progress::bar(args.runs, "runs");
    let rows = speed_interleaved(model, entries, &ids, opts, |d, _| pb.set_position(d as u64));
    pb.finish_and_clear();
    let rows = rows?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{label}; {} threads; {} runs interleaved (median [min–max]); prefill {} tokens, then {} decode steps over the built-in text ({} weights for decode)",
        rayon::current_num_threads(),
        args.runs,
        args.prefill,
        args.decode,
        if run.quantized { "quantized" } else { "f32" }
    );
    println!("| | executed | prefill tok/s | decode tok/s | decode vs base |");
    println!("|---|---|---|---|---|");
    let base_decode = rows[0].decode_tokens_per_sec.median;
    for r in &rows {
        let p = &r.prefill_tokens_per_sec;
        let d = &r.decode_tokens_per_sec;
        println!(
            "| {} | {:.3} | {:.1} [{:.1}–{:.1}] | {:.1} [{:.1}–{:.1}] | {:.3}× |",
            r.name,
            r.executed_fraction,
            p.median,
            p.min,
            p.max,
            d.median,
            d.min,
            d.max,
            d.median / base_decode
        );
    }
    Ok(())
}

/// A predicted or oracle mask is the one the built-in text's first window
/// gives (`eval`'s and `report`'s window), so the three agree.
const SPARSE_MASK_WINDOW: usize = 512;

/// A sparse plan's decode against the unmodified model, both on the f32
/// candle path its sliced weights run on, interleaved (as `report` times
/// it): executed, by sliced weights for head/neuron masks and by the
/// sparse-input kernel for TEAL/WINA.
fn bench_sparse(
    model: &Model,
    plan: &Plan,
    section: &SparsitySection,
    file: &PlanFile,
    args: &BenchArgs,
) -> Result<()> {
    if args.weights == cli::Weights::Quantized || args.against.is_some() {
        bail!(
            "a sparse plan is timed against the unmodified model on the f32 path its sliced \
             weights run on: drop --weights quantized and --against"
        );
    }
    let sp = section.sparsifier_in(file, model)?;
    let ids = model
        .codec()?
        .encode(crate::eval::data::DEFAULT_EVAL_TEXT)?;
    let pb = progress::spinner(&format!("timing {} runs, interleaved", args.runs));
    let speeds = sparse_speeds(
        model,
        &[(plan, section, &sp)],
        &ids,
        SPARSE_MASK_WINDOW,
        args.context,
        args.decode,
        args.runs,
    );
    pb.finish_and_clear();
    let speed = speeds?.swap_remove(0);
    if args.json {
        let v = serde_json::json!({
            "plan": plan.describe(),
            "sparsity": section,
            "execution": if speed.executed { "executed" } else { "simulated" },
            "decode_tokens_per_sec": speed.decode,
            "decode_speedup": speed.decode_speedup,
            "reference": speed.reference,
            "threads": rayon::current_num_threads(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let d = &speed.decode;
    let x = &speed.decode_speedup;
    println!(
        "plan {} + {} sparsity at level {} ({}); {} threads; {} runs interleaved (median \
         [min–max]); {} decode steps after {} prompt tokens (--context)",
        plan.describe(),
        section.method,
        section.level,
        if speed.executed {
            "executed"
        } else {
            "simulated"
        },
        rayon::current_num_threads(),
        args.runs,
        args.decode,
        args.context
    );
    println!(
        "decode {:.1} [{:.1}–{:.1}] tok/s, {:.3}× [{:.3}–{:.3}] {}",
        d.median,
        d.min,
        d.max,
        x.median,
        x.min,
        x.max,
        speed
            .reference
            .as_deref()
            .unwrap_or("vs the unmodified model")
    );
    for (k, v) in &speed.facts {
        println!("{k}: {v}");
    }
    Ok(())
}

pub fn run(margs: &cli::ModelArgs, pargs: &cli::PlanArgs, args: BenchArgs) -> Result<()> {
    if args.runs == 0 || args.prefill < 1 || args.decode < 1 {
        bail!("--runs, --prefill and --decode must be at least 1");
    }
    let context = args.prefill.max(args.context + args.decode);
    let load = args.weights.load_options(context, 1);
    let model: Model = match &args.synthetic {
        Some(shape) => {
            let device = crate::setup::device(&margs.device)?;
            synthetic::check_memory(shape, &device, &load)?;
            let pb = progress::spinner(&format!("building synthetic {shape}"));
            let m = synthetic::build_with(shape, &device, load.keep);
            pb.finish_and_clear();
            m?
        }
        None => cli::load_model_for(margs, load)?,
    };
    let honoured: Vec<&str> = STATIC_SECTIONS
        .into_iter()
        .chain([ROUTING_SECTION, SPARSITY_SECTION])
        .collect();
    let (plan, file) = cli::load_plan_honouring(pargs, &model, &honoured)?;
    if let Some(file) = &file {
        if let Some(section) = file.sections.get::<SparsitySection>(SPARSITY_SECTION)? {
            return bench_sparse(&model, &plan, &section, file, &args);
        }
    }
    let run = args.weights.run_options(&model, true)?;
    if let Some((section, routers)) = load_from_given(file.as_ref(), &model)? {
        return super::route::bench_routed(&model, &plan, section, &routers, &args, run);
    }
    if let Some(against) = against_plan(&model, &args)? {
        let base = Plan::base();
        let entry = |name: String, plan| SpeedEntry {
            name,
            plan,
            routed: None,
        };
        let entries = [
            entry("base".into(), &base),
            entry(format!("against {}", against.describe()), &against),
            entry(format!("plan {}", plan.describe()), &plan),
        ];
        return interleaved(&model, &entries, &args, run, "executed");
    }
    let opts = bench::BenchOptions {
        prefill_tokens: args.prefill,
        decode_tokens: args.decode,
        context_tokens: args.context,
        runs: args.runs,
        run,
    };
    let pb = progress::bar(args.runs, "runs");
    let report = bench::bench(&model, &plan, opts, |d, _| pb.set_position(d as u64));
    pb.finish_and_clear();
    let r = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "model {} | device {} | weights {} | {} threads | {} runs (median [min–max])",
        model.identity.name, r.device, r.weights, r.threads, r.runs
    );
    println!("plan  {}", r.plan);
    println!(
        "| | prefill {} tok/s | decode {} tok/s after {} tokens |",
        r.prefill_tokens, r.decode_tokens, r.context_tokens
    );
    println!("|---|---|---|");
    let row = |name: &str, s: &bench::SpeedReport| {
        let p = &s.prefill_tokens_per_sec;
        let d = &s.decode_tokens_per_sec;
        println!(
            "| {name} | {:.1} [{:.1}–{:.1}] | {:.1} [{:.1}–{:.1}] |",
            p.median, p.min, p.max, d.median, d.min, d.max
        );
    };
    row("base", &r.base);
    row("plan", &r.pruned);
    println!(
        "| plan / base | {:.3}× | {:.3}× |",
        r.prefill_speedup, r.decode_speedup
    );
    Ok(())
}
