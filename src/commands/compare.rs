//! `scalpel compare`: Hopscotch against training-free selections at
//! k = 1..K on held-out data (chat answers and prose), as a table or JSON.

use anyhow::{bail, Context, Result};

use super::surgery_common as common;
use crate::cli::{self, CompareArgs};
use crate::eval::data::{text_file_set, TokenSet, TEXT_SEQUENCE_TOKENS};
use crate::progress;
use crate::surgery::compare::{compare, CompareInputs, EvalSet, METHODS};
use crate::surgery::hopscotch::{search, SearchOptions, SearchStep};
use crate::surgery::importance::compute_importance;
use crate::surgery::objective::BaseStates;

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

pub fn run(margs: &cli::ModelArgs, args: CompareArgs) -> Result<()> {
    let k = max_k(&args.blocks)?;
    let cancel = common::cancel_on_ctrl_c();
    let model = cli::load_model(margs)?;
    if k > model.n_layers() {
        bail!(
            "--blocks {k} is more than the model's {} attention blocks",
            model.n_layers()
        );
    }
    let calib = common::calibration(&model, &args.data, &cancel)?;
    let heldout = common::heldout(&model, &args.data, &cancel)?;
    let (train, validation) = common::fit_sets(&calib);
    let prose = match &args.prose {
        Some(p) => text_file_set(&model, p)?,
        None => {
            let ids = model
                .codec()?
                .encode(crate::eval::data::DEFAULT_EVAL_TEXT)?;
            let ids = &ids[..ids.len().min(args.prose_tokens)];
            TokenSet::from_id_sequences(
                "GPL-3 prose",
                ids.chunks(TEXT_SEQUENCE_TOKENS)
                    .map(<[u32]>::to_vec)
                    .collect(),
            )?
        }
    };
    let steps: Vec<SearchStep> = match &args.search_plan {
        Some(path) => {
            let pf = model.load_plan(path)?;
            let steps = pf
                .metrics
                .get("search_steps")
                .with_context(|| format!("{} is not a search plan", path.display()))?;
            serde_json::from_value(steps.clone())?
        }
        None => {
            eprintln!("scalpel: searching {k} blocks (reuse a search with --search-plan)");
            let mut o = SearchOptions::new(k, args.fit.loss.into());
            o.final_fit = common::fit_options(&args.fit);
            o.final_fit.epochs = 0;
            search(&model, &train, &validation, &o, &cancel, |_| {})?.steps
        }
    };
    let pb = progress::bar(train.sequences.len(), "importance");
    let imp = compute_importance(&model, &train, &cancel, |d, _| pb.set_position(d as u64));
    pb.finish_and_clear();
    let imp = imp?;
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
    let inputs = CompareInputs {
        importance: &imp,
        steps: &steps,
        max_k: k,
        fit: common::fit_options(&args.fit),
        seed: args.seed,
    };
    let pb = progress::bar(k * METHODS.len(), "plans");
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
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
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
    println!(
        "{:>2}  {:<24} {:>9} {:>9} {:>7}  {:>9} {:>9} {:>7}  blocks",
        "k", "method", "ppl", "kl", "top1", "prose ppl", "prose kl", "top1"
    );
    for r in &rows {
        let h = &r.reports["heldout"];
        let p = &r.reports["prose"];
        let name = match r.fit {
            Some(loss) => format!("{} + {loss} fit", r.method),
            None => r.method.clone(),
        };
        let blocks: Vec<String> = r.blocks.iter().map(|b| b.layer.to_string()).collect();
        println!(
            "{:>2}  {:<24} {:>9.3} {:>9.4} {:>6.1}%  {:>9.3} {:>9.4} {:>6.1}%  attn {}",
            r.k,
            name,
            h.perplexity,
            h.kl_to_base,
            h.top1_agreement * 100.0,
            p.perplexity,
            p.kl_to_base,
            p.top1_agreement * 100.0,
            blocks.join(",")
        );
    }
    Ok(())
}
