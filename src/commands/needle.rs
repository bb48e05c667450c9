//! `scalpel needle`: passkey retrieval under KV budget policies, against
//! the full cache, as a grid of contexts × depths.

use anyhow::Result;

use crate::cli::{self, NeedleArgs};
use crate::eval::needle::{needle_grid, NeedleOptions, NeedleReport};
use crate::model::kv::KvSpec;
use crate::plan::{KvSection, HEAL_SECTION, KV_SECTION};
use crate::progress;
use crate::surgery::replace::REPLACE_SECTION;

pub fn run(margs: &cli::ModelArgs, pargs: &cli::PlanArgs, args: NeedleArgs) -> Result<()> {
    let longest = args.context.iter().copied().max().unwrap_or(0);
    let model = cli::load_model_for(margs, args.weights.load_options(longest, 1))?;
    let (plan, file) =
        cli::load_plan_honouring(pargs, &model, &[KV_SECTION, REPLACE_SECTION, HEAL_SECTION])?;
    let mut specs = if args.kv.trim().is_empty() {
        Vec::new()
    } else {
        KvSpec::parse_list(&args.kv)?
    };
    if let Some(s) = file.and_then(|f| f.sections.get::<KvSection>(KV_SECTION).transpose()) {
        specs.push(s?.spec()?);
    }
    let opts = NeedleOptions {
        contexts: args.context.clone(),
        depths: args.depths.clone(),
        trials: args.trials,
        chunk: args.chunk,
        seed: args.seed,
        run: args.weights.run_options(&model, false)?,
    };
    let pb = progress::bar(0, "answers");
    let report = needle_grid(&model, &plan, &specs, &opts, |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    });
    pb.finish_and_clear();
    let report = report?;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["model"] = serde_json::to_value(&model.identity)?;
        v["seed"] = args.seed.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_grid(&report, &opts);
    }
    Ok(())
}

/// One row per context and depth, one column per policy: keys found / trials.
fn print_grid(report: &NeedleReport, opts: &NeedleOptions) {
    print!("{:>8} {:>6}", "context", "depth");
    for p in &report.policies {
        print!(" {p:>16}");
    }
    println!();
    for &context in &opts.contexts {
        for &depth in &opts.depths {
            print!("{context:>8} {depth:>6.2}");
            for p in &report.policies {
                let cell = report
                    .cells
                    .iter()
                    .find(|c| c.policy == *p && c.context == context && c.depth == depth);
                match cell {
                    Some(c) => print!(" {:>16}", format!("{}/{}", c.found, c.trials)),
                    None => print!(" {:>16}", "-"),
                }
            }
            println!();
        }
    }
    print!("{:>15}", "all");
    for p in &report.policies {
        let (found, n) = report.found(p);
        print!(" {:>16}", format!("{found}/{n}"));
    }
    println!();
    if let Some(c) = report.cells.iter().find(|c| c.found < c.trials) {
        println!(
            "a miss ({} at {} tokens, depth {:.2}) answered: {:?}",
            c.policy, c.context, c.depth, c.example_answer
        );
    }
    println!(
        "({:.1}s, greedy answers of up to 12 tokens)",
        report.seconds
    );
}
