//! `scalpel route`: train per-token routers on the frozen model and write
//! them as a v2 plan (a `routing` section and a `routers` artifact), over an
//! optional static base plan (its skips and scales kept).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};

use super::surgery_common as common;
use crate::cli::{self, BenchArgs, DataArgs, EvalArgs};
use crate::model::routing::{
    check_capacity, save_to_plan, KvPolicy, RouteOn, RouterKind, Routers, RoutingSection,
    ROUTERS_ARTIFACT,
};
use crate::model::{Model, RunOptions};
use crate::plan::{Plan, PlanFile};
use crate::progress;
use crate::surgery::objective::BaseStates;
use crate::surgery::objective::TrainingData;
use crate::surgery::routing::measure::{evaluate_text, measure_set, Routed};
use crate::surgery::routing::speed::SpeedEntry;
use crate::surgery::routing::{train_routers, RouteEvent, RouteOptions};
use crate::surgery::unless_cancelled;

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnArg {
    Attn,
    Mlp,
    Both,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterArg {
    Linear,
    Mlp,
}

impl From<RouterArg> for RouterKind {
    fn from(r: RouterArg) -> Self {
        match r {
            RouterArg::Linear => RouterKind::Linear,
            RouterArg::Mlp => RouterKind::Mlp,
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvArg {
    /// A token that skips attention still writes its K/V (as in training).
    Write,
    /// It writes none: later tokens cannot attend to it at that layer.
    Gap,
}

impl From<KvArg> for KvPolicy {
    fn from(k: KvArg) -> Self {
        match k {
            KvArg::Write => KvPolicy::Write,
            KvArg::Gap => KvPolicy::Gap,
        }
    }
}

#[derive(Args, Debug)]
pub struct RouteArgs {
    /// Share of the routed blocks a token executes, in (0, 1] (e.g. 0.8).
    #[arg(long)]
    pub capacity: f64,
    /// Which blocks get routers.
    #[arg(long, value_enum, default_value = "attn")]
    pub on: OnArg,
    /// The router: linear on the normalised block input (577 parameters per block on SmolLM2),
    /// or SkipGPT's d → d/4 → 1 MLP with a ReLU (83,233).
    #[arg(long, value_enum, default_value = "linear")]
    pub router: RouterArg,
    /// A static plan to route on top of (its skips stay skipped, its scales apply).
    #[arg(long, value_name = "PLAN")]
    pub base_plan: Option<PathBuf>,
    /// K/V of tokens that skip attention.
    #[arg(long, value_enum, default_value = "write")]
    pub kv: KvArg,
    #[command(flatten)]
    pub data: DataArgs,
    /// Epochs over the training sequences (the best validation epoch is kept).
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Adam learning rate of the routers.
    #[arg(long, default_value_t = 2e-2)]
    pub lr: f64,
    /// Sequences per Adam step.
    #[arg(long, default_value_t = 2)]
    pub batch_size: usize,
    /// Weight of |executed share − capacity| in the training loss.
    #[arg(long, default_value_t = 2.0)]
    pub penalty: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the routed plan.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
}

pub fn run(margs: &cli::ModelArgs, args: RouteArgs) -> Result<()> {
    check_capacity(args.capacity)?;
    let cancel = common::cancel_on_ctrl_c();
    let model = cli::load_model(margs)?;
    let pargs = cli::PlanArgs {
        plan: args.base_plan.clone(),
        skip: None,
    };
    let (plan, file) = cli::load_plan(&pargs, &model)?;
    let calib = common::calibration(&model, &args.data, &cancel)?;
    let heldout = common::heldout(&model, &args.data, &cancel)?;
    let (train, validation) = common::fit_sets(&calib);
    let never = AtomicBool::new(false);
    let t0 = Instant::now();
    let train_base = BaseStates::compute(&model, &train, &cancel)?;
    let validation_base = BaseStates::compute(&model, &validation, &cancel)?;
    let opts = RouteOptions {
        capacity: args.capacity,
        on: match args.on {
            OnArg::Attn => RouteOn::Attn,
            OnArg::Mlp => RouteOn::Mlp,
            OnArg::Both => RouteOn::Both,
        },
        router: args.router.into(),
        epochs: args.epochs,
        lr: args.lr,
        batch_size: args.batch_size,
        penalty: args.penalty,
        seed: args.seed,
        kv: args.kv.into(),
        ..RouteOptions::default()
    };
    eprintln!(
        "scalpel: training {:?} routers on {:?} blocks over {} (capacity {}, lr {}, {} epochs, penalty {})",
        opts.router,
        opts.on,
        plan.describe(),
        opts.capacity,
        opts.lr,
        opts.epochs,
        opts.penalty
    );
    let data = TrainingData {
        train: &train,
        train_base: &train_base,
        validation: &validation,
        validation_base: &validation_base,
    };
    let pb = progress::bar(train.sequences.len() * opts.epochs, "sequences");
    let result = train_routers(&model, &plan, &data, &opts, &cancel, &mut |e| match e {
        RouteEvent::Step {
            epoch,
            done,
            total,
            kl,
            share,
        } => {
            pb.set_position(((epoch - 1) * total + done) as u64);
            pb.set_message(format!("epoch {epoch}: kl {kl:.4}, executed {share:.3}"));
        }
        // eprintln under `suspend`: shown with or without a terminal.
        RouteEvent::Epoch(e) => pb.suspend(|| {
            eprintln!(
                "epoch {:<2} train kl {:.5} executed {:.3} | validation kl {:.5} executed {:.3} \
             (threshold {:.3}) ({:.1}s){}",
                e.epoch,
                e.train_kl,
                e.train_share,
                e.validation_kl,
                e.validation_share,
                e.threshold,
                e.seconds,
                e.note
                    .as_deref()
                    .map(|n| format!("  [{n}]"))
                    .unwrap_or_default()
            )
        }),
        RouteEvent::Calibrating => pb.set_message("calibrating the threshold"),
    })?;
    pb.finish_and_clear();
    let train_seconds = t0.elapsed().as_secs_f64();
    for w in &result.warnings {
        eprintln!("scalpel: warning: {w}");
    }
    let section = RoutingSection {
        artifact: ROUTERS_ARTIFACT.into(),
        on: opts.on,
        capacity: opts.capacity,
        kv: opts.kv,
        threshold: result.threshold,
    };
    let mut pf = file.unwrap_or_else(|| PlanFile::new(model.identity.clone(), plan.clone()));
    save_to_plan(&mut pf, &args.out, &result.routers, &section)?;
    pf.metrics.insert(
        "route_history".into(),
        serde_json::to_value(&result.history)?,
    );
    pf.metrics
        .insert("route_best_epoch".into(), result.best_epoch.into());
    pf.metrics
        .insert("route_train_seconds".into(), train_seconds.into());
    if let Some(c) = &result.calibrated {
        pf.metrics
            .insert("route_calibration".into(), serde_json::to_value(c)?);
    }
    pf.provenance.insert(
        "route".into(),
        serde_json::json!({"options": opts, "training": train.source,
            "training_sequences": train.sequences.len(), "validation_sequences": validation.sequences.len(),
            "cancelled": result.cancelled}),
    );
    // Saved before the held-out measurement, so a Ctrl-C there loses nothing.
    pf.save(&args.out)?;
    let routed = Routed {
        plan: &plan,
        routers: &result.routers,
        kv: opts.kv,
        threshold: result.threshold,
    };
    let measured = (|| {
        let base = BaseStates::compute(&model, &heldout, &cancel)?;
        measure_set(&model, &heldout, &base, &routed, &never)
    })();
    if let Some(r) = unless_cancelled(measured, &cancel)? {
        eprintln!(
            "held-out ({} tokens): KL to base {:.5}, perplexity {:.3}, top-1 {:.2}%, executed \
             {:.4} of all blocks ({:.4} of the routed ones)",
            r.scored_tokens,
            r.kl_to_base,
            r.perplexity,
            r.top1_agreement * 100.0,
            r.executed_fraction,
            r.routed_share
        );
        pf.metrics
            .insert("heldout".into(), serde_json::to_value(&r)?);
        pf.save(&args.out)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&pf)?);
    } else {
        println!(
            "best epoch {} (validation kl {:.5}); threshold {:.4}; {:.0}s; routed plan written to {}{}",
            result.best_epoch,
            result.history[result.best_epoch].validation_kl,
            result.threshold,
            train_seconds,
            args.out.display(),
            if result.cancelled {
                " — cancelled, best so far kept"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// `eval --plan` of a routed plan: the routers carried out for real over
/// the text's windows, with the compute they realised.
pub fn eval_routed(
    model: &Model,
    plan: &Plan,
    ids: &[u32],
    section: RoutingSection,
    routers: &Routers,
    args: &EvalArgs,
    run: RunOptions,
) -> Result<()> {
    if args.kv.is_some() || args.no_base {
        bail!("a routed plan is evaluated against the base model with its own K/V policy; drop --kv / --no-base (use --routing-kv write|gap)");
    }
    let kv = args.routing_kv.map_or(section.kv, KvPolicy::from);
    let routed = Routed {
        plan,
        routers,
        kv,
        threshold: section.threshold,
    };
    let sp = progress::spinner("routed windows");
    let r = evaluate_text(model, ids, args.window, &routed, run, true);
    sp.finish_and_clear();
    let r = r?;
    if args.json {
        let mut v = serde_json::to_value(&r)?;
        v["plan"] = plan.describe().into();
        v["routing"] = serde_json::to_value(&section)?;
        v["kv"] = serde_json::to_value(kv)?;
        v["model"] = serde_json::to_value(&model.identity)?;
        v["window"] = args.window.into();
        v["threads"] = rayon::current_num_threads().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "plan            {} + routing on {:?} (capacity {}, K/V of skipping tokens: {:?})",
        plan.describe(),
        section.on,
        section.capacity,
        kv
    );
    println!("perplexity      {:.4}", r.perplexity);
    println!("kl to base      {:.5} nats/token", r.kl_to_base);
    println!("top-1 agreement {:.2}%", r.top1_agreement * 100.0);
    println!(
        "executed        {:.4} of all blocks per token ({:.4} of the routed ones), measured",
        r.executed_fraction, r.routed_share
    );
    println!(
        "tokens          {} scored, windows of {} ({:.1}s)",
        r.scored_tokens, args.window, r.seconds
    );
    Ok(())
}

/// `bench --plan` of a routed plan: the base model, `--against` (a static
/// plan), and the routing with each K/V policy, timed interleaved on the
/// built-in text.
pub fn bench_routed(
    model: &Model,
    plan: &Plan,
    section: RoutingSection,
    routers: &Routers,
    args: &BenchArgs,
    run: RunOptions,
) -> Result<()> {
    let base = Plan::base();
    let against = super::bench::against_plan(model, args)?;
    let mut entries = vec![SpeedEntry {
        name: "base".into(),
        plan: &base,
        routed: None,
    }];
    if let Some(a) = &against {
        entries.push(SpeedEntry {
            name: format!("static {}", a.describe()),
            plan: a,
            routed: None,
        });
    }
    for kv in [KvPolicy::Write, KvPolicy::Gap] {
        entries.push(SpeedEntry {
            name: format!("routed ({kv:?} K/V)"),
            plan,
            routed: Some(Routed {
                plan,
                routers,
                kv,
                threshold: section.threshold,
            }),
        });
    }
    super::bench::interleaved(model, &entries, args, run, "routing executed for real")
}
