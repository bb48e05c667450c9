//! `scalpel report`: measures each plan on the model and writes the
//! trade-off report (self-contained HTML plus the charts as SVG files, and
//! a PDF on request). Everything that can be refused is refused before the
//! first measurement: output paths, plans, the browser for `--pdf`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cli::{self, ReportArgs};
use crate::eval::bench::BenchOptions;
use crate::export;
use crate::model::routing::ROUTING_SECTION;
use crate::model::source::DEFAULT_GGUF_NAME;
use crate::model::{Model, RunOptions};
use crate::plan::{Plan, PlanFile, KV_SECTION};
use crate::progress;
use crate::report::modes::{self, Mode, Quality};
use crate::report::{charts, html, DraftSpeed, Report, Row, Settings, SpeedKind};
use crate::setup;
use crate::surgery::heal::{HealSection, HEAL_SECTION};
use crate::surgery::replace::{ReplaceSection, REPLACE_SECTION};
use crate::surgery::sparsity::SPARSITY_SECTION;

const WINDOW: usize = 512;
const BENCH_PREFILL: usize = 128;
const BENCH_DECODE: usize = 32;
const CHARTS: [&str; 3] = ["quality-vs-speed", "quality-vs-blocks", "speed-vs-blocks"];

/// A plan to measure, with what the report says about where it came from.
struct Entry {
    name: String,
    plan: Plan,
    method: String,
    details: Vec<(String, String)>,
    file: Option<PathBuf>,
    mode: Mode,
    /// Skips blocks and has no section: `speculate` can draft with it.
    drafts: bool,
}

pub fn run(margs: &cli::ModelArgs, args: ReportArgs) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if args.max_windows == Some(0) {
        bail!("--max-windows must be at least 1");
    }
    if !(args.budget.is_finite() && args.budget >= 0.0) {
        bail!("--budget must be a perplexity increase in percent, 0 or more");
    }
    let chart_paths: Vec<PathBuf> = CHARTS
        .iter()
        .map(|s| sibling(&args.out, s, "svg"))
        .collect();
    let pdf_path = args.pdf.then(|| args.out.with_extension("pdf"));
    for p in std::iter::once(&args.out)
        .chain(&chart_paths)
        .chain(pdf_path.as_ref())
    {
        export::check_output(p, args.force)?;
    }
    check_writable_folder(&args.out)?;
    let browser = match args.pdf {
        true => Some(find_browser().context(
            "--pdf prints the page with headless Chromium, which is not installed: install it \
             (Debian: apt-get install chromium) or leave out --pdf and print the HTML from a browser",
        )?),
        false => None,
    };
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
    let mut entries = vec![Entry {
        name: "base".into(),
        plan: model.implied_plan.clone(),
        method: "base".into(),
        details: Vec::new(),
        file: None,
        mode: Mode::Plain,
        drafts: false,
    }];
    for p in &args.plans {
        // Every mode's plan is measured through its own evaluation and
        // timing (`report::modes`); a section this build adds later is
        // refused by name until the report measures it.
        let source = setup::PlanSource {
            plan: Some(p.clone()),
            skip: None,
        };
        setup::refuse_sections(&model.load_plan(p)?, p, "`report`", REPORTED_SECTIONS)?;
        let (plan, file) = setup::load_plan_honouring(&source, &model, REPORTED_SECTIONS)?;
        let pf = file.context("a plan file was given")?;
        let mode = Mode::of(&pf, &plan, &model, p)?;
        entries.push(Entry {
            drafts: pf.sections.is_empty() && !plan.skip.is_empty(),
            name: plan_name(p),
            method: mode.method().map_or_else(|| method_of(&pf), str::to_string),
            plan,
            details: details_of(&pf),
            file: Some(p.clone()),
            mode,
        });
    }
    let mut ids = model.codec()?.encode(&text)?;
    if let Some(n) = args.max_windows {
        ids.truncate(n * (WINDOW - usize::from(model.cfg().add_bos)));
    }
    if ids.len() < 2 {
        bail!("the evaluation text is too short");
    }
    let model_name = user_model_name(margs);
    let run = RunOptions::FAST;
    let kv_context = modes::kv_context(&model, &ids);
    let quality: Vec<Quality> = entries
        .iter()
        .map(|e| measure_quality(&model, e, &ids, run, kv_context))
        .collect::<Result<_>>()?;
    let bopts = BenchOptions {
        prefill_tokens: BENCH_PREFILL,
        decode_tokens: BENCH_DECODE,
        context_tokens: 16,
        runs: args.runs,
        run: RunOptions {
            quantized: model.has_quantized && model.device().is_cpu(),
            ..run
        },
    };
    let plans: Vec<(&Plan, &Mode)> = entries.iter().map(|e| (&e.plan, &e.mode)).collect();
    let speeds = modes::speeds(&model, &plans, &ids, WINDOW, bopts, kv_context)?;
    let drafts = match args.speculative {
        true => measure_drafts(&model, &entries, args.runs, bopts.run)?,
        false => vec![None; entries.len()],
    };
    let n_blocks = 2 * model.n_layers();
    let windows = ids.len().div_ceil(WINDOW);
    let rows: Vec<Row> = entries
        .iter()
        .zip(quality)
        .zip(speeds)
        .zip(drafts)
        .map(|(((e, q), s), draft)| {
            let mut details = q.facts;
            details.extend(s.facts);
            details.extend(e.details.iter().cloned());
            let row = Row {
                name: e.name.clone(),
                method: e.method.clone(),
                skipped: e.plan.skip.iter().map(|b| b.to_string()).collect(),
                blocks_total: n_blocks,
                blocks_removed: q.blocks_removed.unwrap_or(e.plan.skip.len() as f64),
                has_scales: e.plan.has_scales(),
                mode_summary: q.summary,
                perplexity: q.perplexity,
                reference_perplexity: q.reference_perplexity,
                kl_to_base: q.kl_to_base,
                top1_agreement: q.top1_agreement,
                prefill_tokens_per_sec: s.prefill,
                decode_tokens_per_sec: s.decode,
                prefill_speedup: s.prefill_speedup,
                decode_speedup: s.decode_speedup,
                speed_kind: if s.executed {
                    SpeedKind::Executed
                } else {
                    SpeedKind::Simulated
                },
                speed_reference: s.reference,
                commands: reproduce(margs, e, &args, windows, kv_context),
                draft,
                details,
            };
            eprintln!(
                "scalpel: {}: perplexity {:.3}, decode {:.1} tok/s ({:.3}× {}, runs {:.3}–{:.3}×, {})",
                row.name,
                row.perplexity,
                row.decode_tokens_per_sec.median,
                row.decode_speedup.median,
                row.speed_reference.as_deref().unwrap_or("base"),
                row.decode_speedup.min,
                row.decode_speedup.max,
                row.speed_kind.label()
            );
            row
        })
        .collect();
    let report = Report {
        title: format!("Trade-offs of pruning {model_name}"),
        rows,
        settings: Settings {
            model: model_name,
            architecture: model.identity.architecture.clone(),
            origin: model.origin.clone(),
            text: text_name,
            tokens: ids.len(),
            windows,
            window: WINDOW,
            threads: candle_core::utils::get_num_threads(),
            device: margs.device.clone(),
            machine: machine(),
            weights: if bopts.run.quantized {
                "quality on dequantized f32 weights (exact); speed on the file's quantized weights"
                    .into()
            } else {
                "f32 (bf16 on GPU) for quality and speed".into()
            },
            bench: bench_settings(&entries, args.runs, args.speculative, kv_context),
            quality_budget_pct: args.budget,
            generated_by: std::env::args().collect::<Vec<_>>().join(" "),
            date: date_utc(),
        },
    };
    let svgs = charts::all(&report.rows)?;
    let page = html::page(&report, &svgs);
    for ((_, _, svg), path) in svgs.iter().zip(&chart_paths) {
        write_text(path, svg, args.force)?;
    }
    write_text(&args.out, &page, args.force)?;
    if let (Some(browser), Some(pdf)) = (browser, &pdf_path) {
        print_pdf(&browser, &args.out, pdf)?;
    }
    println!(
        "wrote {} ({} plans + base; charts {}{})",
        args.out.display(),
        args.plans.len(),
        chart_paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        pdf_path
            .map(|p| format!("; {}", p.display()))
            .unwrap_or_default()
    );
    Ok(())
}

fn measure_quality(
    model: &Model,
    e: &Entry,
    ids: &[u32],
    run: RunOptions,
    kv_context: usize,
) -> Result<Quality> {
    let sp = progress::spinner(&format!("{}: quality", e.name));
    let q = modes::quality(
        model,
        &e.plan,
        &e.mode,
        e.file.is_none(),
        ids,
        WINDOW,
        run,
        kv_context,
    );
    sp.finish_and_clear();
    q.with_context(|| format!("measuring the quality of {}", e.name))
}

/// How the speeds were timed, each mode's group named where present.
fn bench_settings(entries: &[Entry], runs: usize, speculative: bool, kv_context: usize) -> String {
    let has = |f: &dyn Fn(&Mode) -> bool| entries.iter().any(|e| f(&e.mode));
    let mut s = format!(
        "prefill {BENCH_PREFILL} tokens, then decode {BENCH_DECODE} after a 16-token prompt; \
         {runs} runs of every plan, interleaved (one of each in turn), after one warm-up run each"
    );
    if has(&|m| matches!(m, Mode::Kv(_))) {
        s.push_str(&format!(
            "; KV plans: {BENCH_DECODE} decode steps after one prefill of up to {kv_context} \
             tokens, against the full cache, {runs} interleaved rounds"
        ));
    }
    if has(&|m| matches!(m, Mode::Sparse(..))) {
        s.push_str(&format!(
            "; sparse plans: {BENCH_DECODE} decode steps after a 16-token prompt on the f32 \
             candle path, against the unmodified model on that path, {runs} interleaved rounds"
        ));
    }
    if has(&|m| matches!(m, Mode::Routed(..))) {
        s.push_str(&format!(
            "; routed plans: prefill {BENCH_PREFILL} and decode {BENCH_DECODE} tokens of the \
             evaluation text, against the base, {runs} interleaved rounds"
        ));
    }
    if speculative {
        s.push_str(&format!(
            "; drafts: greedy self-speculative decoding of {} new tokens (k = {}) after the first \
             prompt of each built-in kind, against plain decoding, {runs} interleaved runs",
            modes::DRAFT_TOKENS,
            modes::DRAFT_LEN
        ));
    }
    s
}

/// `--speculative`: every plan that skips blocks and has no section (what
/// `speculate` drafts with) also as the draft of self-speculative decoding.
fn measure_drafts(
    model: &Model,
    entries: &[Entry],
    runs: usize,
    run: RunOptions,
) -> Result<Vec<Option<DraftSpeed>>> {
    let drafts: Vec<usize> = (0..entries.len()).filter(|&i| entries[i].drafts).collect();
    let mut out = vec![None; entries.len()];
    if drafts.is_empty() {
        eprintln!("scalpel: --speculative: no plan skips blocks without a section, so none drafts");
        return Ok(out);
    }
    let plans: Vec<&Plan> = drafts.iter().map(|&i| &entries[i].plan).collect();
    let pb = progress::bar(runs, "speculative (drafts against plain decoding)");
    let r = modes::draft_speeds(model, &plans, runs, run, |d, _| pb.set_position(d as u64));
    pb.finish_and_clear();
    for (&i, d) in drafts.iter().zip(r?) {
        out[i] = Some(d);
    }
    Ok(out)
}

/// How a plan was made, from what its file records.
fn method_of(pf: &PlanFile) -> String {
    if let Some(section) = pf.sections.names().next() {
        return section.to_string();
    }
    let command = pf.provenance.get("command").and_then(|v| v.as_str());
    match command {
        Some("search") => "Hopscotch search".into(),
        Some("fit") => "fitted by hand".into(),
        Some(other) => other.to_string(),
        None if pf.plan.has_scales() => "fitted by hand".into(),
        None => "by hand".into(),
    }
}

/// The plan sections `report` carries out: heal and replace change only the
/// weights a pass reads (measured as any plan); the others through their
/// mode's own evaluation and timing (`report::modes`).
const REPORTED_SECTIONS: &[&str] = &[
    HEAL_SECTION,
    REPLACE_SECTION,
    KV_SECTION,
    SPARSITY_SECTION,
    ROUTING_SECTION,
];

/// A plan's mode-specific facts worth showing (its sections, and what its
/// metrics record about how it was made).
fn details_of(pf: &PlanFile) -> Vec<(String, String)> {
    let mut d: Vec<(String, String)> = Vec::new();
    if let Ok(Some(h)) = pf.sections.get::<HealSection>(HEAL_SECTION) {
        let layers = h.layers.iter().map(ToString::to_string).collect::<Vec<_>>();
        d.push((
            "healed".into(),
            format!(
                "rank-{} corrections on {} of layers {} ({} trained parameters)",
                h.rank,
                h.targets.join(", "),
                layers.join(", "),
                h.parameters
            ),
        ));
    }
    if let Ok(Some(r)) = pf.sections.get::<ReplaceSection>(REPLACE_SECTION) {
        let layers = r.layers.iter().map(ToString::to_string).collect::<Vec<_>>();
        d.push((
            "replaced".into(),
            format!(
                "attention of layers {} by distilled `{}` mixers (no KV cache there)",
                layers.join(", "),
                r.mixer
            ),
        ));
    }
    for (k, label) in [
        ("fit_best_epoch", "best fit epoch"),
        ("search_seconds", "search time (s)"),
        ("heal_best_epoch", "best heal epoch"),
        ("heal_seconds", "heal training time (s)"),
        ("replace_train_seconds", "mixer distillation time (s)"),
    ] {
        if let Some(v) = pf.metrics.get(k) {
            d.push((label.into(), v.to_string()));
        }
    }
    if !pf.artifacts.is_empty() {
        let names: Vec<&str> = pf.artifacts.iter().map(|a| a.name.as_str()).collect();
        d.push(("trained parameters".into(), names.join(", ")));
    }
    d
}

/// The commands that reproduce a row's numbers.
fn reproduce(
    margs: &cli::ModelArgs,
    e: &Entry,
    args: &ReportArgs,
    windows: usize,
    kv_context: usize,
) -> Vec<String> {
    let model = margs
        .model
        .as_ref()
        .map(|m| format!(" --model {m}"))
        .unwrap_or_default();
    let plan = e
        .file
        .as_ref()
        .map(|p| format!(" --plan {}", p.display()))
        .unwrap_or_default();
    let text = args
        .text
        .as_ref()
        .map(|p| format!(" --text {}", p.display()))
        .unwrap_or_default();
    let windows = args
        .max_windows
        .map(|_| format!(" (the first {windows} windows)"))
        .unwrap_or_default();
    let runs = args.runs;
    let mut c = match &e.mode {
        Mode::Kv(_) => vec![
            format!("scalpel{model} eval{plan}{text} --context {kv_context}{windows}"),
            format!(
                "scalpel{model} eval{plan}{text} --context {kv_context} --decode-speed \
                 {BENCH_DECODE}{windows} (3 rounds; the report times {runs})"
            ),
        ],
        Mode::Sparse(..) => vec![
            format!("scalpel{model} eval{plan}{text}{windows}"),
            format!(
                "scalpel{model} bench{plan} --context 16 --decode {BENCH_DECODE} --runs {runs} \
                 (f32 path)"
            ),
        ],
        Mode::Plain | Mode::Routed(..) => vec![
            format!("scalpel{model} eval{plan}{text}{windows}"),
            format!(
                "scalpel{model} bench{plan} --prefill {BENCH_PREFILL} --decode {BENCH_DECODE} \
                 --runs {runs}"
            ),
        ],
    };
    if args.speculative && e.drafts {
        c.push(format!(
            "scalpel{model}{plan} speculate --prompt-set all --per-kind 1 -n {} --draft-len {} \
             --runs {runs}",
            modes::DRAFT_TOKENS,
            modes::DRAFT_LEN
        ));
    }
    c
}

/// The model as the user named it: the hub id, or the file or folder name.
fn user_model_name(margs: &cli::ModelArgs) -> String {
    match &margs.model {
        None => format!("{DEFAULT_GGUF_NAME} (the default model)"),
        Some(m) => {
            let p = Path::new(m);
            match (p.exists(), p.file_name()) {
                (true, Some(f)) => f.to_string_lossy().into_owned(),
                _ => m.clone(),
            }
        }
    }
}

/// CPU model and core count, for the footer.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!(
        "{cpu}, {} cores, {} {}",
        num_cpus::get(),
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

fn date_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The output's folder must exist and take a file, checked before minutes
/// of measuring.
fn check_writable_folder(out: &Path) -> Result<()> {
    let dir = export::parent_of(out);
    if !dir.is_dir() {
        bail!(
            "the output folder {} does not exist; create it first (mkdir -p {})",
            dir.display(),
            dir.display()
        );
    }
    tempfile::Builder::new()
        .prefix(".scalpel-report-")
        .tempfile_in(&dir)
        .with_context(|| format!("cannot write to the output folder {}", dir.display()))?;
    Ok(())
}

pub fn find_browser() -> Option<String> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|name| {
            Command::new(name)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(str::to_string)
}

fn print_pdf(browser: &str, html: &Path, pdf: &Path) -> Result<()> {
    let html = std::fs::canonicalize(html)?;
    let profile = tempfile::tempdir()?;
    let tmp = pdf.with_extension("pdf.partial");
    let o = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-pdf-header-footer",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--print-to-pdf={}", tmp.display()))
        .arg(format!("file://{}", html.display()))
        .output()
        .with_context(|| format!("cannot run {browser}"))?;
    let ok = o.status.success() && std::fs::metadata(&tmp).is_ok_and(|m| m.len() > 0);
    if !ok {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "{browser} could not print {} to PDF: {}",
            html.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    std::fs::rename(&tmp, pdf).with_context(|| format!("cannot write {}", pdf.display()))
}

fn plan_name(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// `report.html` -> `report-quality-vs-blocks.svg` beside it.
fn sibling(out: &Path, stem: &str, ext: &str) -> PathBuf {
    let base = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "report".into());
    out.with_file_name(format!("{base}-{stem}.{ext}"))
}

fn write_text(path: &Path, text: &str, force: bool) -> Result<()> {
    export::write_file_atomic(path, force, |w| {
        use std::io::Write;
        w.write_all(text.as_bytes())?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::ModelIdentity;

    fn identity() -> ModelIdentity {
        ModelIdentity {
            name: "test".into(),
            architecture: "llama".into(),
            n_layers: 30,
            shape: None,
            content_hash: String::new(),
        }
    }

    #[test]
    fn healed_and_replaced_plans_say_what_was_trained_and_how_long() {
        let mut pf = PlanFile::new(identity(), Plan::base());
        let heal = HealSection {
            rank: 8,
            targets: vec!["o_proj".into(), "down_proj".into()],
            layers: vec![1, 2],
            artifact: "lora".into(),
            parameters: 1234,
        };
        pf.sections.set(HEAL_SECTION, &heal).unwrap();
        pf.metrics.insert("heal_seconds".into(), 723.0.into());
        let d = details_of(&pf);
        assert!(d.contains(&(
            "healed".to_string(),
            "rank-8 corrections on o_proj, down_proj of layers 1, 2 (1234 trained parameters)"
                .to_string()
        )));
        assert!(d.contains(&("heal training time (s)".to_string(), "723.0".to_string())));

        let mut pf = PlanFile::new(identity(), Plan::base());
        let replace = ReplaceSection {
            layers: vec![6, 7],
            mixer: "gla-v1".into(),
            artifact: "mixers".into(),
        };
        pf.sections.set(REPLACE_SECTION, &replace).unwrap();
        let d = details_of(&pf);
        assert_eq!(
            d[0],
            (
                "replaced".to_string(),
                "attention of layers 6, 7 by distilled `gla-v1` mixers (no KV cache there)"
                    .to_string()
            )
        );
    }
}
