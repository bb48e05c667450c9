//! `scalpel compare`: Hopscotch against training-free selections at
//! k = 1..K on held-out data (chat answers and prose), as a table or JSON;
//! with `--routing`, routed plans beside them at the same realised compute.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context, Result};

use super::surgery_common as common;
use crate::cli::{self, CompareArgs};
use crate::eval::data::{text_file_set, TokenSet, TEXT_SEQUENCE_TOKENS};
use crate::model::routing::{load_from_plan, Routers, RoutingSection, ROUTING_SECTION};
use crate::model::Model;
use crate::plan::Plan;
use crate::progress;
use crate::setup::{self, PlanSource};
use crate::surgery::compare::{
    compare, CompareInputs, CompareRow, EvalSet, METHODS, ROUTING_METHODS,
};
use crate::surgery::hopscotch::{search, SearchOptions, SearchStep};
use crate::surgery::importance::compute_importance;
use crate::surgery::objective::{BaseStates, SetReport, TrainingData};
use crate::surgery::routing::compare::{
    at_equal_compute, bracketing_ks, measure_routed, static_executed, AtEqualCompute, RoutedRow,
};
use crate::surgery::routing::measure::Routed;

/// `1..8` or `8` → 8.
fn max_k(spec: &str) -> Result<usize> {
    let s = spec.trim();
    let k = match s.split_once("..") {
        Some((a, b)) => {
            if a.trim() != "1" {
                bail!("--blocks {s}: ranges start at 1 (e.g. 1..8)");
            }
            b.trim_start_matches('=').trim().parse::<usize>()
        }
        None => s.parse::<usize>(),
    }
    .with_context(|| format!("--blocks `{s}`: expected K or 1..K"))?;
    if k == 0 {
        bail!("--blocks must be at least 1");
    }
    Ok(k)
}

/// A routed plan from `--routing`, loaded and checked against the model.
struct RoutedPlan {
    name: String,
    plan: Plan,
    routing: (RoutingSection, Routers),
}

fn load_routed(model: &Model, path: &Path) -> Result<RoutedPlan> {
    let source = PlanSource {
        plan: Some(path.to_path_buf()),
        skip: None,
    };
    let (plan, file) = setup::load_plan_honouring(&source, model, &[ROUTING_SECTION])?;
    let routing = file
        .as_ref()
        .map(|f| load_from_plan(f, model))
        .transpose()?
        .flatten()
        .with_context(|| {
            format!(
                "--routing {}: not a routed plan (no `{ROUTING_SECTION}` section); make one with \
                 `scalpel route --capacity C --out plan.json`",
                path.display()
            )
        })?;
    Ok(RoutedPlan {
        name: path.display().to_string(),
        plan,
        routing,
    })
}

pub fn run(margs: &cli::ModelArgs, args: CompareArgs) -> Result<()> {
    let cancel = common::cancel_on_ctrl_c();
    let model = cli::load_model(margs)?;
    // Bad plans and block counts fail before minutes of data generation.
    let routed: Vec<RoutedPlan> = args
        .routing
        .iter()
        .map(|p| load_routed(&model, p))
        .collect::<Result<_>>()?;
    let replaced = super::compare_replace::load_plans(&model, &args)?;
    let blocks = match &args.blocks {
        Some(spec) => {
            let k = max_k(spec)?;
            if k > model.n_layers() {
                bail!(
                    "--blocks {k} is more than the model's {} attention blocks",
                    model.n_layers()
                );
            }
            Some(k)
        }
        None => None,
    };
    let calib = common::calibration(&model, &args.data, &cancel)?;
    let heldout = common::heldout(&model, &args.data, &cancel)?;
    let (train, validation) = common::fit_sets(&calib);
    let prose = prose_set(&model, &args)?;
    let evals = vec![
        EvalSet {
            name: "heldout".into(),
            base: BaseStates::compute(&model, &heldout, &cancel)?,
            data: &heldout,
        },
        EvalSet {
            name: "prose".into(),
            base: BaseStates::compute(&model, &prose, &cancel)?,
            data: &prose,
        },
    ];
    if !args.replace.is_empty() {
        print_header(&heldout, &prose, &args);
        let fit_data = TrainingData {
            train: &train,
            train_base: &BaseStates::compute(&model, &train, &cancel)?,
            validation: &validation,
            validation_base: &BaseStates::compute(&model, &validation, &cancel)?,
        };
        return super::compare_replace::run(&model, &replaced, &args, &fit_data, &evals, &cancel);
    }
    let (ks, methods, routed_rows) = match blocks {
        Some(k) => ((1..=k).collect::<Vec<_>>(), &METHODS[..], Vec::new()),
        None => {
            let mut rows = Vec::new();
            for r in &routed {
                let sp = progress::spinner(&format!("routed plan {}", r.name));
                let row = measure_routed(
                    &model,
                    &r.name,
                    &Routed::of(&r.plan, &r.routing),
                    &evals,
                    &cancel,
                );
                sp.finish_and_clear();
                rows.push(row?);
            }
            let mut ks: Vec<usize> = rows
                .iter()
                .flat_map(|r: &RoutedRow| r.reports.values())
                .flat_map(|rep| bracketing_ks(rep.executed_fraction, model.n_layers()))
                .collect();
            ks.sort_unstable();
            ks.dedup();
            (ks, &ROUTING_METHODS[..], rows)
        }
    };
    let max_k = ks.iter().copied().max().unwrap_or(1);
    let steps = search_steps(&model, &args, &train, &validation, max_k, &cancel)?;
    let pb = progress::bar(train.sequences.len(), "importance");
    let imp = compute_importance(&model, &train, &cancel, |d, _| pb.set_position(d as u64));
    pb.finish_and_clear();
    let imp = imp?;
    let inputs = CompareInputs {
        importance: &imp,
        steps: &steps,
        ks,
        methods,
        fit: common::fit_options(&args.fit),
        seed: args.seed,
    };
    let pb = progress::bar(inputs.plan_count(), "plans");
    let rows = compare(
        &model,
        &train,
        &validation,
        &evals,
        &inputs,
        &cancel,
        |d, _| pb.set_position(d as u64),
    );
    pb.finish_and_clear();
    let rows = rows?;
    let loss = crate::surgery::objective::LossKind::from(args.fit.loss);
    let equal: Vec<AtEqualCompute> = [
        ("hopscotch", Some(loss)),
        ("hopscotch", None),
        ("block-influence", Some(loss)),
    ]
    .into_iter()
    .flat_map(|(m, fit)| at_equal_compute(&routed_rows, &rows, m, fit, model.n_layers()))
    .collect();
    if args.json {
        let v = if routed.is_empty() {
            serde_json::to_value(&rows)?
        } else {
            serde_json::json!({
                "routed": routed_rows,
                "static": rows,
                "at_equal_compute": equal,
            })
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print_header(&heldout, &prose, &args);
    if !routed_rows.is_empty() {
        print_routed(&routed_rows, &routed);
    }
    print_static(&rows, model.n_layers(), !routed_rows.is_empty());
    if !routed_rows.is_empty() {
        print_equal(&equal);
    }
    Ok(())
}

/// The column heads of `quality_cells`.
pub(super) const QUALITY_HEADER: &str = "      ppl        kl    top1  prose ppl  prose kl    top1";

/// Perplexity, KL and top-1 agreement on the held-out answers and the prose,
/// as table cells under `QUALITY_HEADER`.
pub(super) fn quality_cells(heldout: &SetReport, prose: &SetReport) -> String {
    format!(
        "{:>9.3} {:>9.4} {:>6.1}%  {:>9.3} {:>9.4} {:>6.1}%",
        heldout.perplexity,
        heldout.kl_to_base,
        heldout.top1_agreement * 100.0,
        prose.perplexity,
        prose.kl_to_base,
        prose.top1_agreement * 100.0
    )
}

fn print_header(heldout: &TokenSet, prose: &TokenSet, args: &CompareArgs) {
    println!(
        "held-out: {} ({} tokens); prose: {} ({} tokens); fits: {} loss, {} epochs, lr {}",
        heldout.source,
        heldout.scored_tokens(),
        prose.source,
        prose.scored_tokens(),
        crate::surgery::objective::LossKind::from(args.fit.loss),
        args.fit.epochs,
        args.fit.lr
    );
}

fn prose_set(model: &Model, args: &CompareArgs) -> Result<TokenSet> {
    if let Some(p) = &args.prose {
        return text_file_set(model, p);
    }
    let ids = model
        .codec()?
        .encode(crate::eval::data::DEFAULT_EVAL_TEXT)?;
    let ids = &ids[..ids.len().min(args.prose_tokens)];
    TokenSet::from_id_sequences(
        "GPL-3 prose",
        ids.chunks(TEXT_SEQUENCE_TOKENS)
            .map(<[u32]>::to_vec)
            .collect(),
    )
}

/// The Hopscotch selections up to `k` blocks: from `--search-plan`, or searched.
fn search_steps(
    model: &Model,
    args: &CompareArgs,
    train: &TokenSet,
    validation: &TokenSet,
    k: usize,
    cancel: &AtomicBool,
) -> Result<Vec<SearchStep>> {
    let Some(path) = &args.search_plan else {
        eprintln!("scalpel: searching {k} blocks (reuse a search with --search-plan)");
        let mut o = SearchOptions::new(k, args.fit.loss.into());
        o.final_fit = common::fit_options(&args.fit);
        o.final_fit.epochs = 0;
        return Ok(search(model, train, validation, &o, cancel, |_| {})?.steps);
    };
    let pf = model.load_plan(path)?;
    let steps = pf
        .metrics
        .get("search_steps")
        .with_context(|| format!("{} is not a search plan", path.display()))?;
    let steps: Vec<SearchStep> = serde_json::from_value(steps.clone())?;
    if steps.len() < k {
        bail!(
            "--search-plan {} searched {} blocks; this comparison needs {k} (run `scalpel search \
             --blocks {k}`)",
            path.display(),
            steps.len()
        );
    }
    Ok(steps)
}

fn method_name(method: &str, fit: Option<crate::surgery::objective::LossKind>) -> String {
    match fit {
        Some(loss) => format!("{method} + {loss} fit"),
        None => method.to_string(),
    }
}

fn print_routed(rows: &[RoutedRow], plans: &[RoutedPlan]) {
    println!(
        "\nrouted plans (executed = blocks run per token over all blocks, measured on each set):"
    );
    println!(
        "{:<28} {QUALITY_HEADER}  executed (held-out, prose)",
        "plan"
    );
    for (r, p) in rows.iter().zip(plans) {
        let h = &r.reports["heldout"];
        let s = &r.reports["prose"];
        println!(
            "{:<28} {}  {:.4}, {:.4}  (on {:?}, capacity {}, K/V {:?})",
            r.plan,
            quality_cells(&h.quality(), &s.quality()),
            h.executed_fraction,
            s.executed_fraction,
            p.routing.0.on,
            p.routing.0.capacity,
            p.routing.0.kv,
        );
    }
    println!();
}

fn print_static(rows: &[CompareRow], n_layers: usize, with_executed: bool) {
    if with_executed {
        println!("static plans (executed = 1 − k / {}):", 2 * n_layers);
    }
    println!("{:>2}  {:<24} {QUALITY_HEADER}  blocks", "k", "method");
    for r in rows {
        let blocks: Vec<String> = r.blocks.iter().map(|b| b.layer.to_string()).collect();
        let executed = if with_executed {
            format!("  (executed {:.4})", static_executed(r.k, n_layers))
        } else {
            String::new()
        };
        println!(
            "{:>2}  {:<24} {}  attn {}{executed}",
            r.k,
            method_name(&r.method, r.fit),
            quality_cells(&r.reports["heldout"], &r.reports["prose"]),
            blocks.join(","),
        );
    }
}

fn print_equal(equal: &[AtEqualCompute]) {
    println!(
        "\nat equal realised compute (static metrics interpolated linearly in executed fraction \
         between the bracketing k):"
    );
    for e in equal {
        let ks: Vec<String> = e.between_k.iter().map(usize::to_string).collect();
        let range = if e.interpolated_within_range {
            String::new()
        } else {
            " (outside the static plans' range: nearest k)".into()
        };
        println!(
            "{:<28} {:<8} executed {:.4}: routing KL {:.4} vs {} {:.4} (k = {}{range}): {:+.1}%",
            e.plan,
            e.set,
            e.executed,
            e.routed_kl,
            method_name(&e.method, e.fit),
            e.static_kl,
            ks.join(".."),
            e.kl_change * 100.0
        );
    }
}
