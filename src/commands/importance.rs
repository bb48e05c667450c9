//! `scalpel importance`: Δloss and block influence of every block, as a
//! table (or JSON), saved into a plan file's metrics for the TUI grid.

use anyhow::Result;

use super::surgery_common as common;
use crate::cli::{self, ImportanceArgs};
use crate::plan::PlanFile;
use crate::progress;
use crate::surgery::importance::compute_importance;

pub fn run(margs: &cli::ModelArgs, pargs: &cli::PlanArgs, args: ImportanceArgs) -> Result<()> {
    let cancel = common::cancel_on_ctrl_c();
    let model = cli::load_model(margs)?;
    let (plan, file) = cli::load_plan(pargs, &model)?;
    let calib = common::calibration(&model, &args.data, &cancel)?;
    let pb = progress::bar(calib.sequences.len(), "importance");
    let imp = compute_importance(&model, &calib, &cancel, |d, _| pb.set_position(d as u64));
    pb.finish_and_clear();
    let imp = imp?;
    let out = args.out.clone().or_else(|| pargs.plan.clone());
    if let Some(path) = &out {
        let mut pf = file.unwrap_or_else(|| PlanFile::new(model.identity.clone(), plan.clone()));
        pf.metrics
            .insert("importance".into(), serde_json::to_value(&imp)?);
        pf.save(path)?;
        eprintln!("scalpel: importance saved in {}", path.display());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&imp)?);
        return Ok(());
    }
    println!(
        "base calibration loss {:.4} nats/token over {} tokens",
        imp.base_loss, imp.tokens
    );
    println!("{:>8}  {:>12}  {:>10}", "block", "delta_loss", "influence");
    for b in &imp.blocks {
        println!(
            "{:>8}  {:>12.4}  {:>10.5}",
            b.block.to_string(),
            b.delta_loss,
            b.block_influence
        );
    }
    Ok(())
}
