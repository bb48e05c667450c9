//! `scalpel compare --replace`: for each replaced plan's layers, keep vs
//! skip vs skip with fitted scales vs heal vs replace on the held-out sets
//! (`surgery::recovery`), with the KV cache each keeps.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Result};

use super::compare::{quality_cells, QUALITY_HEADER};
use crate::cli::{CompareArgs, PlanArgs};
use crate::model::Model;
use crate::plan::{Plan, HEAL_SECTION};
use crate::progress;
use crate::surgery::compare::EvalSet;
use crate::surgery::objective::TrainingData;
use crate::surgery::recovery::{
    fitted, kl_change, measure_variant, removed_attention, skipped_instead, RecoveryRow, Variant,
};
use crate::surgery::replace::REPLACE_SECTION;

/// The `--replace` and `--heal` plans, loaded and checked before any data
/// is generated.
pub struct Plans {
    replaced: Vec<(String, Plan)>,
    healed: Vec<(String, Plan)>,
}

fn load(model: &Model, path: &Path, section: &str) -> Result<(String, Plan)> {
    let pargs = PlanArgs {
        plan: Some(path.to_path_buf()),
        skip: None,
    };
    let (plan, _) = crate::cli::load_plan_honouring(&pargs, model, &[section])?;
    Ok((path.display().to_string(), plan))
}

pub fn load_plans(model: &Model, args: &CompareArgs) -> Result<Plans> {
    let mut replaced = Vec::new();
    for p in &args.replace {
        let (name, plan) = load(model, p, REPLACE_SECTION)?;
        if plan.replace.is_none() {
            bail!(
                "--replace {name}: not a replaced plan (no `{REPLACE_SECTION}` section); make one \
                 with `scalpel replace --layers … --out plan.json`"
            );
        }
        replaced.push((name, plan));
    }
    let mut healed = Vec::new();
    for p in &args.heal {
        let (name, plan) = load(model, p, HEAL_SECTION)?;
        if plan.tensors.is_none() {
            bail!(
                "--heal {name}: not a healed plan (no `{HEAL_SECTION}` section); make one with \
                 `scalpel heal --plan skip.json --out plan.json`"
            );
        }
        let layers = removed_attention(&plan);
        if !replaced.iter().any(|(_, r)| removed_attention(r) == layers) {
            bail!(
                "--heal {name} removes attention {layers:?}, which no --replace plan replaces: a \
                 heal is compared with the replacement of the same layers"
            );
        }
        healed.push((name, plan));
    }
    Ok(Plans { replaced, healed })
}

pub fn run(
    model: &Model,
    plans: &Plans,
    args: &CompareArgs,
    fit_data: &TrainingData,
    evals: &[EvalSet],
    cancel: &AtomicBool,
) -> Result<()> {
    let fit = super::surgery_common::fit_options(&args.fit);
    let mut all = Vec::new();
    for (name, replaced) in &plans.replaced {
        let layers = removed_attention(replaced);
        let mut keep = replaced.clone();
        keep.replace = None;
        let skip = skipped_instead(replaced);
        let sp = progress::spinner(&format!("fitting the scales of {name}'s layers skipped"));
        let skip_fit = fitted(model, &skip, fit_data, &fit, cancel);
        sp.finish_and_clear();
        let mut variants = vec![
            Variant {
                name: "keep".into(),
                plan: keep,
            },
            Variant {
                name: "skip".into(),
                plan: skip,
            },
            Variant {
                name: format!("skip + {} fit", fit.loss),
                plan: skip_fit?,
            },
        ];
        for (heal_name, healed) in &plans.healed {
            if removed_attention(healed) == layers {
                variants.push(Variant {
                    name: format!("heal ({heal_name})"),
                    plan: healed.clone(),
                });
            }
        }
        variants.push(Variant {
            name: format!("replace ({name})"),
            plan: replaced.clone(),
        });
        let pb = progress::bar(variants.len(), "plans");
        let mut rows = Vec::new();
        for v in &variants {
            rows.push(measure_variant(model, &layers, v, evals, cancel)?);
            pb.inc(1);
        }
        pb.finish_and_clear();
        all.push(rows);
    }
    if args.json {
        let rows: Vec<&RecoveryRow> = all.iter().flatten().collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    for rows in &all {
        print_set(rows);
    }
    Ok(())
}

fn print_set(rows: &[RecoveryRow]) {
    let layers: Vec<String> = rows[0].layers.iter().map(usize::to_string).collect();
    println!("\nattention {}:", layers.join(", "));
    println!(
        "{:<28} {QUALITY_HEADER}  {:>11} {:>12}",
        "variant", "KV B/token", "state B/seq"
    );
    for r in rows {
        println!(
            "{:<28} {}  {:>11} {:>12}",
            r.variant,
            quality_cells(&r.reports["heldout"], &r.reports["prose"]),
            r.kv_bytes_per_token,
            r.state_bytes_per_sequence
        );
    }
    // Every recovery against skipping with fitted scales (the third row).
    let reference = &rows[2];
    for r in &rows[3..] {
        let change = |set| {
            kl_change(r, reference, set).map_or("n/a".into(), |c| format!("{:+.1}%", c * 100.0))
        };
        println!(
            "{} vs {}: KL {} held-out, {} prose",
            r.variant,
            reference.variant,
            change("heldout"),
            change("prose")
        );
    }
}
