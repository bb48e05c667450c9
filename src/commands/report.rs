//! `scalpel report`: measures each plan on the model and writes the
//! trade-off report (self-contained HTML plus the charts as SVG files).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context, Result};

use crate::cli::{self, ReportArgs};
use crate::eval::bench::{self, BenchOptions};
use crate::eval::perplexity::{self, EvalOptions};
use crate::export;
use crate::model::{Model, RunOptions};
use crate::plan::Plan;
use crate::progress;
use crate::report::{charts, html, Report, Row, Settings};

const WINDOW: usize = 512;
const BENCH_PREFILL: usize = 128;
const BENCH_DECODE: usize = 32;

pub fn run(margs: &cli::ModelArgs, args: ReportArgs) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if args.max_windows == Some(0) {
        bail!("--max-windows must be at least 1");
    }
    let chart_paths: Vec<PathBuf> = ["quality-vs-blocks", "speed-vs-blocks", "quality-vs-speed"]
        .iter()
        .map(|stem| chart_path(&args.out, stem))
        .collect();
    for p in std::iter::once(&args.out).chain(&chart_paths) {
        export::check_output(p, args.force)?;
    }
    let (text, text_name) = match &args.text {
        Some(p) => (
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read --text {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (
            crate::eval::data::DEFAULT_EVAL_TEXT.to_string(),
            "built-in held-out text (Debian's GPL-3)".to_string(),
        ),
    };
    let model = cli::load_model(margs)?;
    // Every plan must belong to this model; refuse before measuring anything.
    let mut plans: Vec<(String, Plan)> = vec![("base".into(), model.implied_plan.clone())];
    for p in &args.plans {
        let pf = model.load_plan(p)?;
        plans.push((plan_name(p), model.with_implied(&pf.plan)));
    }
    let mut ids = model.codec()?.encode(&text)?;
    if let Some(n) = args.max_windows {
        ids.truncate(n * (WINDOW - usize::from(model.cfg().add_bos)));
    }
    if ids.len() < 2 {
        bail!("the evaluation text is too short");
    }
    let run = RunOptions::FAST;
    let mut rows = Vec::new();
    let mut windows = 0;
    for (name, plan) in &plans {
        let row = measure(&model, name, plan, &ids, run, args.runs)?;
        eprintln!(
            "scalpel: {name}: perplexity {:.3}, decode {:.1} tok/s ({:.3}× base)",
            row.perplexity, row.decode_tokens_per_sec, row.decode_speedup
        );
        windows = ids.len().div_ceil(WINDOW);
        rows.push(row);
    }
    let report = Report {
        title: format!("Block-skipping trade-offs: {}", model.identity.name),
        rows,
        settings: Settings {
            model: model.identity.to_string(),
            text: text_name,
            tokens: ids.len(),
            windows,
            window: WINDOW,
            threads: candle_core::utils::get_num_threads(),
            device: margs.device.clone(),
            weights: if model.has_quantized && model.device().is_cpu() {
                "quality on dequantized f32 weights (exact); speed on the file's quantized weights"
                    .into()
            } else {
                "f32 (bf16 on GPU) for quality and speed".into()
            },
            bench: format!(
                "prefill {BENCH_PREFILL} tokens then decode {BENCH_DECODE}, median of {} runs; \
                 speed-ups against the base model timed in the same run",
                args.runs
            ),
            generated_by: format!(
                "scalpel {} report --plans {}",
                env!("CARGO_PKG_VERSION"),
                args.plans
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        },
    };
    let svgs = charts::all(&report.rows)?;
    let page = html::page(&report, &svgs);
    for ((_, _, svg), path) in svgs.iter().zip(&chart_paths) {
        write_text(path, svg, args.force)?;
    }
    write_text(&args.out, &page, args.force)?;
    println!(
        "wrote {} ({} plans + base; charts {})",
        args.out.display(),
        args.plans.len(),
        chart_paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

fn measure(
    model: &Model,
    name: &str,
    plan: &Plan,
    ids: &[u32],
    run: RunOptions,
    runs: usize,
) -> Result<Row> {
    let opts = EvalOptions {
        window: WINDOW,
        compare_base: !plan.skip.is_empty() || plan.has_scales(),
        run,
        parallel_windows: false,
    };
    let pb = progress::bar(ids.len().div_ceil(WINDOW), &format!("{name}: quality"));
    let q = perplexity::evaluate(model, ids, plan, opts, &AtomicBool::new(false), |d, _| {
        pb.set_position(d as u64)
    });
    pb.finish_and_clear();
    let q = q?;
    let bopts = BenchOptions {
        prefill_tokens: BENCH_PREFILL,
        decode_tokens: BENCH_DECODE,
        context_tokens: 16,
        runs,
        run: RunOptions {
            quantized: model.has_quantized && model.device().is_cpu(),
            ..run
        },
    };
    let pb = progress::bar(runs, &format!("{name}: speed"));
    let s = bench::bench(model, plan, bopts, |d, _| pb.set_position(d as u64));
    pb.finish_and_clear();
    let s = s?;
    Ok(Row {
        name: name.to_string(),
        skipped: plan.skip.iter().map(|b| b.to_string()).collect(),
        has_scales: plan.has_scales(),
        perplexity: q.perplexity,
        kl_to_base: q.kl_to_base,
        top1_agreement: q.top1_agreement,
        prefill_tokens_per_sec: s.pruned.prefill_tokens_per_sec.median,
        decode_tokens_per_sec: s.pruned.decode_tokens_per_sec.median,
        prefill_speedup: s.prefill_speedup,
        decode_speedup: s.decode_speedup,
    })
}

fn plan_name(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// `report.html` -> `report-quality-vs-blocks.svg` beside it.
fn chart_path(out: &Path, stem: &str) -> PathBuf {
    let base = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "report".into());
    out.with_file_name(format!("{base}-{stem}.svg"))
}

fn write_text(path: &Path, text: &str, force: bool) -> Result<()> {
    export::write_file_atomic(path, force, |w| {
        use std::io::Write;
        w.write_all(text.as_bytes())?;
        Ok(())
    })
}
