//! `scalpel sparsify`: a contextual-sparsity plan (a head/neuron mask or
//! channel thresholds at a level) written as a v2 plan section, or with
//! `--compare` every method's held-out quality over levels.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::surgery_common as common;
use crate::cli::{self, DataArgs};
use crate::eval::data::DEFAULT_EVAL_TEXT;
use crate::model::TrainableParams;
use crate::plan::PlanFile;
use crate::progress;
use crate::surgery::sparsity::activation::{thresholds, ActivationSamples, ColumnNorms};
use crate::surgery::sparsity::evaluate::{compare, CompareOptions, CompareRow, HeldOut};
use crate::surgery::sparsity::predictor::{
    LinearFit, Predictor, PREDICTOR_ARTIFACT, PREFIX_TOKENS,
};
use crate::surgery::sparsity::scores::{calibration_scores, UnitScores};
use crate::surgery::sparsity::speed::{decode_speed, SpeedOptions, SpeedRow};
use crate::surgery::sparsity::{
    check_level, Criterion, Method, Shape, SparsitySection, Split, UnitMask, SPARSITY_SECTION,
};

#[derive(Args, Debug)]
pub struct SparsifyArgs {
    /// random | magnitude | static (plainact) | shadow (its per-prompt predictor) | oracle | teal | wina.
    #[arg(long, default_value = "static")]
    pub method: String,
    /// Fraction dropped, in [0, 1): heads and neurons per layer, or input channels per projection (teal, wina).
    #[arg(long)]
    pub level: Option<f64>,
    /// Where to write the plan (v2, with a `sparsity` section).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Compare every method at these levels on held-out text instead, e.g. 0.1,0.25,0.4,0.5.
    #[arg(long, value_name = "LEVELS")]
    pub compare: Option<String>,
    /// Held-out text for --compare (default: the built-in GPL-3 text; never the calibration data).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Tokens per held-out window.
    #[arg(long, default_value_t = 128)]
    pub window: usize,
    /// Held-out windows scored.
    #[arg(long, default_value_t = 8)]
    pub windows: usize,
    /// Also time decode (tokens) of the static mask and of TEAL (executed, sparse-input kernel) against dense at each level (candle f32 path, interleaved).
    #[arg(long, default_value_t = 0)]
    pub bench: usize,
    /// Heads/neurons: per-layer (every layer drops the level) or global (the lowest across layers).
    #[arg(long, default_value = "per-layer")]
    pub split: String,
    /// Seed of the random mask.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long)]
    pub json: bool,
}

/// `0.1,0.25` → [0.1, 0.25], each in [0, 1).
pub fn parse_levels(spec: &str) -> Result<Vec<f64>> {
    let levels: Vec<f64> = spec
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<f64>()
                .with_context(|| format!("--compare `{s}`: expected levels like 0.1,0.25,0.4"))
        })
        .collect::<Result<_>>()?;
    for &l in &levels {
        check_level(l)?;
    }
    Ok(levels)
}

pub fn run(margs: &cli::ModelArgs, pargs: &cli::PlanArgs, args: SparsifyArgs) -> Result<()> {
    let cancel = common::cancel_on_ctrl_c();
    if let Some(spec) = &args.compare {
        let levels = parse_levels(spec)?;
        let model = cli::load_model(margs)?;
        let calib = common::calibration(&model, &args.data, &cancel)?;
        let text = match &args.text {
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("cannot read --text {}", p.display()))?,
            None => DEFAULT_EVAL_TEXT.to_string(),
        };
        let ids = model.codec()?.encode(&text)?;
        let held = HeldOut::new(&model, &ids, args.window, args.windows)?;
        let split: Split = args.split.parse()?;
        let opts = CompareOptions {
            levels: levels.clone(),
            split,
            seed: args.seed,
        };
        let cmp = compare(&model, &calib, &held, &opts, &cancel, |m| {
            eprintln!("scalpel: {m}")
        })?;
        let speed = if args.bench > 0 {
            let (scores, _) = calibration_scores(&model, &calib, &cancel, |_, _| {})?;
            let opts = SpeedOptions {
                decode_tokens: args.bench,
                ..SpeedOptions::default()
            };
            Some(decode_speed(
                &model,
                &scores.plainact,
                &levels,
                &cmp.teal,
                &opts,
            )?)
        } else {
            None
        };
        if args.json {
            let v = serde_json::json!({
                "held_out": {"windows": held.windows.len(), "window": args.window, "tokens": held.tokens()},
                "calibration": crate::surgery::sparsity::scores::describe(&calib),
                "base": cmp.base,
                "split": split.name(),
                "rows": cmp.rows,
                "predictor": cmp.predictor,
                "decode_speed": speed,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!(
                "held-out: {} windows of {} tokens ({} scored), not the calibration data; base perplexity {:.3}; heads/neurons split {}",
                held.windows.len(),
                args.window,
                held.tokens(),
                cmp.base.perplexity,
                split.name()
            );
            print_table(&cmp.rows, cmp.base.perplexity);
            let p = &cmp.predictor;
            println!(
                "shadow: a linear predictor of {} parameters ({:.2}% of the model's {}) from the layer-0 attention output at the prompt's last token (a held-out window's token {}); per window, Spearman ρ with the window's own scores: heads {:.3}, neuron groups of {} {:.3} (the static scores: {:.3}, {:.3}); validation error {:.3} of predicting the mean",
                p.parameters,
                100.0 * p.parameters as f64 / p.model_parameters as f64,
                p.model_parameters,
                p.prefix_tokens,
                p.heads_rho,
                p.neuron_group,
                p.neuron_groups_rho,
                p.static_heads_rho,
                p.static_neuron_groups_rho,
                p.fit.validation_mse / p.fit.validation_mse_of_mean
            );
            if let Some(s) = speed {
                print_speed(&s);
            }
        }
        return Ok(());
    }
    let level = args
        .level
        .context("give --level P (e.g. --level 0.4), or --compare LEVELS")?;
    check_level(level)?;
    let method: Method = args.method.parse()?;
    let split: Split = args.split.parse()?;
    let out = args.out.clone().context(
        "give --out plan.json to write the plan (or --compare LEVELS to compare methods)",
    )?;
    let model = cli::load_model(margs)?;
    let (plan, file) = cli::load_plan(pargs, &model)?;
    let needs_calibration = !matches!(method, Method::Random | Method::Oracle);
    let calib = if needs_calibration {
        Some(common::calibration(&model, &args.data, &cancel)?)
    } else {
        None
    };
    let cfg = model.cfg();
    let (mask, thresh) = match method {
        Method::Random => (
            Some(UnitMask::with_split(
                &UnitScores::random(&model, args.seed),
                level,
                split,
            )?),
            None,
        ),
        Method::Oracle | Method::Shadow => (None, None),
        Method::Magnitude | Method::Static => {
            let calib = calib.as_ref().expect("calibration data");
            let (s, _) = calibration_scores(&model, calib, &cancel, |_, _| {})?;
            let s = if method == Method::Static {
                s.plainact
            } else {
                s.magnitude
            };
            (Some(UnitMask::with_split(&s, level, split)?), None)
        }
        Method::Teal | Method::Wina => {
            let calib = calib.as_ref().expect("calibration data");
            let samples = ActivationSamples::collect(&model, calib, &cancel)?;
            let (crit, norms) = if method == Method::Wina {
                (Criterion::Wina, Some(ColumnNorms::of(&model)?))
            } else {
                (Criterion::Teal, None)
            };
            let t = thresholds(&samples, norms.as_ref(), crit, &[level])?;
            (None, t.into_iter().next())
        }
    };
    let predictor = if method == Method::Shadow {
        let calib = calib.as_ref().expect("calibration data");
        let (s, _) = calibration_scores(&model, calib, &cancel, |_, _| {})?;
        let sp = progress::spinner("training the ShadowLLM predictor on the calibration sequences");
        let trained = Predictor::train(&model, calib, &s.plainact, &LinearFit::grid(), &cancel);
        sp.finish_and_clear();
        let (p, fit) = trained?;
        eprintln!(
            "scalpel: predictor of {} parameters; validation error {:.3} of predicting every unit's mean (lr {}, l2 {}, step {})",
            p.map.parameters(),
            fit.validation_mse / fit.validation_mse_of_mean,
            fit.settings.lr,
            fit.settings.l2,
            fit.best_step
        );
        Some(p)
    } else {
        None
    };
    let section = SparsitySection {
        method,
        level,
        split: if method.drops_units() {
            split.name()
        } else {
            "per-projection"
        }
        .into(),
        shape: Shape::of(cfg),
        mask,
        thresholds: thresh,
        artifact: predictor.as_ref().map(|_| PREDICTOR_ARTIFACT.into()),
    };
    let mut pf = file.unwrap_or_else(|| PlanFile::new(model.identity.clone(), plan.clone()));
    if pf.sections.names().any(|n| n != SPARSITY_SECTION) {
        bail!("the --plan already has other sections; sparsity combines with block skips only");
    }
    if let Some(p) = &predictor {
        let mut params = TrainableParams::new();
        for (name, t) in p.tensors()? {
            params.insert(&name, &t)?;
        }
        params.save_artifact(
            &mut pf,
            &out,
            PREDICTOR_ARTIFACT,
            "ShadowLLM predictor: layer-0 attention output -> ln plainact of heads and neuron groups (surgery::sparsity::predictor), f32",
        )?;
    }
    pf.sections.set(SPARSITY_SECTION, &section)?;
    pf.save(&out)?;
    match &section.mask {
        Some(m) => {
            let (h, n) = m.dropped_fractions(cfg);
            eprintln!(
                "scalpel: {method} at {level} ({}): {:.1}% of query heads and {:.1}% of neurons dropped ({:.1}% of projection weights), executed with sliced weights",
                split.name(),
                h * 100.0,
                n * 100.0,
                m.weight_fraction_dropped(cfg) * 100.0
            );
        }
        None if method == Method::Shadow => eprintln!(
            "scalpel: shadow at {level}: each evaluated window's mask is predicted from its first {PREFIX_TOKENS} tokens (executed with sliced weights)"
        ),
        None if method == Method::Oracle => eprintln!(
            "scalpel: oracle at {level}: each evaluated window is scored on its own text (an upper bound that reads the targets)"
        ),
        None => eprintln!(
            "scalpel: {method} at {level}: per-token thresholds on all seven projection inputs (executed at decode by the sparse-input kernel; masked in multi-row passes)"
        ),
    }
    eprintln!(
        "scalpel: plan written to {}; measure it with `scalpel eval --plan {}`",
        out.display(),
        out.display()
    );
    Ok(())
}

fn print_table(rows: &[CompareRow], base_perplexity: f64) {
    println!(
        "{:<10} {:>5} {:>10} {:>8} {:>8} {:>7} {:>8} {:>9}",
        "method", "level", "perplexity", "Δ", "KL", "top-1", "skipped", "drops"
    );
    for r in rows {
        println!(
            "{:<10} {:>5.2} {:>10.3} {:>+7.1}% {:>8.4} {:>6.1}% {:>7.1}% {:>9}",
            r.method.name(),
            r.level,
            r.quality.perplexity,
            (r.quality.perplexity / base_perplexity - 1.0) * 100.0,
            r.quality.kl_to_base,
            r.quality.top1_agreement * 100.0,
            r.weights_skipped * 100.0,
            r.drops
        );
    }
}

fn print_speed(rows: &[SpeedRow]) {
    println!(
        "decode, candle path, f32 weights, interleaved in this run (static plainact masks; TEAL \
         by the sparse-input kernel):"
    );
    for r in rows {
        println!(
            "  {:<14} {:>7.1} tok/s  {:>5.2}x  {}",
            r.label, r.decode_tokens_per_sec.median, r.speedup, r.execution
        );
    }
}
