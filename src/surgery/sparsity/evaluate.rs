//! Held-out quality under a sparsifier: perplexity, KL to the base model and
//! top-1 agreement over windows of a text (the `eval` protocol: every
//! position scored, BOS first where the model wants it), and the comparison
//! of every method over levels.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::Tensor;
use rayon::prelude::*;
use serde::Serialize;

use super::activation::{
    thresholds, ActivationSamples, ChannelProbe, ChannelThresholds, ColumnNorms, Criterion,
};
use super::masks::{MaskPolicy, UnitMask};
use super::predictor::{
    rank_agreement, window_prefix_end, FitReport, LinearFit, Predictor, NEURON_GROUP, PREFIX_TOKENS,
};
use super::scores::{calibration_scores, sequence_scores, UnitScores};
use super::{Method, Sparsifier, Split};
use crate::eval::data::{Sequence, TokenSet};
use crate::eval::perplexity::windows;
use crate::eval::score::{score_rows, Reference, Scores};
use crate::model::{Model, Pass, RunOptions};
use crate::plan::Plan;

/// Windows of a held-out text with the base model's final hidden rows.
pub struct HeldOut {
    pub windows: Vec<Vec<u32>>,
    base_rows: Vec<Tensor>,
}

impl HeldOut {
    /// At most `max_windows` windows of `window` tokens of `ids`.
    pub fn new(model: &Model, ids: &[u32], window: usize, max_windows: usize) -> Result<Self> {
        if window < 2 {
            bail!("--window must be at least 2 tokens");
        }
        let cfg = model.cfg();
        let bos = if cfg.add_bos { cfg.bos_token_id } else { None };
        let mut wins = windows(ids, window, bos);
        wins.truncate(max_windows.max(1));
        if wins.is_empty() {
            bail!("the held-out text is too short for one window of {window} tokens");
        }
        let base = Plan::base();
        let base_rows = wins
            .iter()
            .map(|w| {
                let input = Tensor::new(w.as_slice(), model.device())?.unsqueeze(0)?;
                let mut pass = Pass::plan(&base, RunOptions::FAST);
                let h = model.transformer.forward_hidden(&input, &mut pass)?;
                Ok(h.squeeze(0)?.narrow(0, 0, w.len() - 1)?)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            windows: wins,
            base_rows,
        })
    }

    pub fn tokens(&self) -> usize {
        self.windows.iter().map(|w| w.len() - 1).sum()
    }
}

/// The plainact scores of each window on its own text (the oracle's input).
pub fn oracle_scores(model: &Model, held: &HeldOut, plan: &Plan) -> Result<Vec<UnitScores>> {
    held.windows
        .iter()
        .map(|w| {
            let seq = Sequence {
                ids: w.clone(),
                scored_from: 1,
            };
            Ok(sequence_scores(model, &seq, plan)?.0)
        })
        .collect()
}

/// Scores of one window under `plan` and the sparsifier, and the channels
/// (seen, kept) when it zeroes channels.
fn window_scores(
    model: &Model,
    plan: &Plan,
    sp: &Sparsifier,
    held: &HeldOut,
    wi: usize,
    run: RunOptions,
) -> Result<(Scores, Option<(u64, u64)>)> {
    let w = &held.windows[wi];
    let input = Tensor::new(w.as_slice(), model.device())?.unsqueeze(0)?;
    let t = &model.transformer;
    let cfg = model.cfg();
    let mut channels = None;
    let h = match sp {
        Sparsifier::Channels { thresholds, norms } => {
            let mut probe = ChannelProbe::new(model, thresholds, norms.as_deref())?;
            let h = t.forward_hidden(&input, &mut Pass::plan(plan, run).with_probe(&mut probe))?;
            channels = Some((probe.seen.iter().sum(), probe.kept.iter().sum()));
            h
        }
        _ => {
            let mask = match sp {
                Sparsifier::Oracle {
                    level,
                    split,
                    cached: Some(c),
                } => Some(UnitMask::with_split(&c[wi], *level, *split)?),
                _ => sp.mask_for(model, plan, w)?,
            };
            match mask {
                Some(mask) => {
                    let policy = MaskPolicy::new(plan, &mask, cfg)?;
                    t.forward_hidden(&input, &mut Pass::plan(plan, run).with_policy(&policy))?
                }
                None => t.forward_hidden(&input, &mut Pass::plan(plan, run))?,
            }
        }
    }
    .squeeze(0)?;
    let n = w.len() - 1;
    let s = score_rows(
        model,
        &h.narrow(0, 0, n)?,
        Some(Reference::Hidden(&held.base_rows[wi])),
        &w[1..],
        run,
    )?;
    Ok((s, channels))
}

/// Held-out quality of one sparsifier.
#[derive(Debug, Clone, Serialize)]
pub struct SparseQuality {
    pub perplexity: f64,
    pub kl_to_base: f64,
    pub top1_agreement: f64,
    pub scored_tokens: usize,
    /// Fraction of projection input channels zeroed (teal/wina only).
    pub channels_zeroed: Option<f64>,
}

/// Perplexity, KL to the base model and top-1 agreement over `held`.
/// `parallel`: one window per thread (when ops run on one thread each).
pub fn evaluate(
    model: &Model,
    plan: &Plan,
    sp: &Sparsifier,
    held: &HeldOut,
    run: RunOptions,
    parallel: bool,
    cancel: &AtomicBool,
) -> Result<SparseQuality> {
    model.check_plan(plan)?;
    let one = |wi: usize| {
        if cancel.load(Ordering::Relaxed) {
            bail!("evaluation cancelled");
        }
        window_scores(model, plan, sp, held, wi, run)
    };
    let per: Vec<_> = if parallel {
        (0..held.windows.len())
            .into_par_iter()
            .map(one)
            .collect::<Result<_>>()?
    } else {
        (0..held.windows.len()).map(one).collect::<Result<_>>()?
    };
    let mut total = Scores::default();
    let (mut seen, mut kept) = (0u64, 0u64);
    let mut any_channels = false;
    for (s, c) in &per {
        total.add(s);
        if let Some((a, b)) = c {
            any_channels = true;
            seen += a;
            kept += b;
        }
    }
    Ok(SparseQuality {
        perplexity: total.mean_nll().exp(),
        kl_to_base: total.mean_kl(),
        top1_agreement: total.agreement(),
        scored_tokens: total.scored,
        channels_zeroed: any_channels.then(|| 1.0 - kept as f64 / seen.max(1) as f64),
    })
}

/// One row of the comparison.
#[derive(Debug, Clone, Serialize)]
pub struct CompareRow {
    pub method: Method,
    pub level: f64,
    /// "units" (heads and neurons, sliced weights) or "channels" (input
    /// channels per token; executed at decode by the sparse-input kernel,
    /// masked in these multi-row windows: the same decisions).
    pub drops: &'static str,
    /// Fraction of the layers' projection weights a token does not need
    /// (heads/neurons: from the mask; teal/wina: the zeroed channel fraction).
    pub weights_skipped: f64,
    #[serde(flatten)]
    pub quality: SparseQuality,
}

/// The base model's held-out quality and every method's rows.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub base: SparseQuality,
    pub rows: Vec<CompareRow>,
    pub predictor: PredictorReport,
    /// TEAL's thresholds at each level (for timing them).
    pub teal: Vec<ChannelThresholds>,
}

/// How the ShadowLLM predictor was trained and how well its per-window
/// scores rank the units as the windows' own (oracle) scores do.
#[derive(Debug, Clone, Serialize)]
pub struct PredictorReport {
    pub parameters: usize,
    /// The model's projection and embedding weights (norms left out).
    pub model_parameters: usize,
    pub fit: FitReport,
    /// Mean over held-out windows of Spearman's ρ against the oracle scores,
    /// over every query head / every neuron group.
    pub heads_rho: f64,
    pub neuron_groups_rho: f64,
    /// The same for the static (calibration) scores: what a predictor must beat.
    pub static_heads_rho: f64,
    pub static_neuron_groups_rho: f64,
    pub prefix_tokens: usize,
    pub neuron_group: usize,
}

/// Trains the predictor on `calib` and predicts every held-out window's
/// scores from its prefix; the report compares them with the oracle's.
fn predicted_scores(
    model: &Model,
    calib: &TokenSet,
    held: &HeldOut,
    static_scores: &UnitScores,
    oracle: &[UnitScores],
    cancel: &AtomicBool,
) -> Result<(Vec<UnitScores>, PredictorReport)> {
    let (predictor, fit) =
        Predictor::train(model, calib, static_scores, &LinearFit::grid(), cancel)?;
    let predicted: Vec<UnitScores> = held
        .windows
        .iter()
        .map(|w| predictor.scores(model, w, window_prefix_end(w)))
        .collect::<Result<_>>()?;
    let mean = |pairs: Vec<(f64, f64)>| {
        let n = pairs.len() as f64;
        let (a, b) = pairs
            .iter()
            .fold((0.0, 0.0), |(x, y), (p, q)| (x + p, y + q));
        (a / n, b / n)
    };
    let (heads_rho, neuron_groups_rho) = mean(
        predicted
            .iter()
            .zip(oracle)
            .map(|(p, o)| rank_agreement(p, o))
            .collect(),
    );
    let (static_heads_rho, static_neuron_groups_rho) = mean(
        oracle
            .iter()
            .map(|o| rank_agreement(static_scores, o))
            .collect(),
    );
    let report = PredictorReport {
        parameters: predictor.map.parameters(),
        model_parameters: {
            let cfg = model.cfg();
            let (attn, mlp) = cfg.block_params();
            cfg.n_layers * (attn + mlp) + cfg.vocab_size * cfg.hidden_size
        },
        fit,
        heads_rho,
        neuron_groups_rho,
        static_heads_rho,
        static_neuron_groups_rho,
        prefix_tokens: PREFIX_TOKENS,
        neuron_group: NEURON_GROUP,
    };
    Ok((predicted, report))
}

/// What `compare` compares.
pub struct CompareOptions {
    pub levels: Vec<f64>,
    pub split: Split,
    /// Of the random mask.
    pub seed: u64,
}

/// Every method at every level on `held`, scored and thresholded on `calib`.
pub fn compare(
    model: &Model,
    calib: &TokenSet,
    held: &HeldOut,
    opts: &CompareOptions,
    cancel: &AtomicBool,
    mut log: impl FnMut(&str),
) -> Result<Comparison> {
    let (levels, split, seed) = (&opts.levels[..], opts.split, opts.seed);
    for &l in levels {
        super::check_level(l)?;
    }
    let plan = Plan::base();
    let run = RunOptions::FAST;
    log("scoring heads and neurons on the calibration data (plainact, magnitude)");
    let (scores, cached) = calibration_scores(model, calib, cancel, |_, _| {})?;
    if cached {
        log("  (loaded from the cache)");
    }
    let random = UnitScores::random(model, seed);
    log("sampling projection inputs on the calibration data (teal, wina)");
    let samples = ActivationSamples::collect(model, calib, cancel)?;
    let norms = Arc::new(ColumnNorms::of(model)?);
    let teal = thresholds(&samples, None, Criterion::Teal, levels)?;
    let wina = thresholds(&samples, Some(&norms), Criterion::Wina, levels)?;
    log("scoring each held-out window on its own text (oracle)");
    let oracle = Arc::new(oracle_scores(model, held, &plan)?);
    log("training the ShadowLLM predictor on the calibration sequences' own scores");
    let (predicted, predictor) =
        predicted_scores(model, calib, held, &scores.plainact, &oracle, cancel)?;
    let predicted = Arc::new(predicted);
    log(&format!(
        "  {} parameters; validation error {:.3} (1 = every unit its mean; lr {}, l2 {}, step {}); Spearman ρ with the oracle: heads {:.3} (static {:.3}), neuron groups {:.3} (static {:.3})",
        predictor.parameters,
        predictor.fit.validation_mse / predictor.fit.validation_mse_of_mean,
        predictor.fit.settings.lr,
        predictor.fit.settings.l2,
        predictor.fit.best_step,
        predictor.heads_rho,
        predictor.static_heads_rho,
        predictor.neuron_groups_rho,
        predictor.static_neuron_groups_rho
    ));
    let cfg = model.cfg();
    let base = evaluate(model, &plan, &Sparsifier::Dense, held, run, false, cancel)?;
    log(&format!("  base model: perplexity {:.3}", base.perplexity));
    let mut rows = Vec::new();
    for (li, &level) in levels.iter().enumerate() {
        for method in Method::ALL {
            if cancel.load(Ordering::Relaxed) {
                bail!("comparison cancelled");
            }
            let from = |s: &UnitScores| UnitMask::with_split(s, level, split);
            let (sp, skipped) = match method {
                Method::Random => {
                    let m = from(&random)?;
                    let f = m.weight_fraction_dropped(cfg);
                    (Sparsifier::Mask(m), f)
                }
                Method::Magnitude => {
                    let m = from(&scores.magnitude)?;
                    let f = m.weight_fraction_dropped(cfg);
                    (Sparsifier::Mask(m), f)
                }
                Method::Static => {
                    let m = from(&scores.plainact)?;
                    let f = m.weight_fraction_dropped(cfg);
                    (Sparsifier::Mask(m), f)
                }
                Method::Oracle | Method::Shadow => {
                    let per_window = if method == Method::Oracle {
                        &oracle
                    } else {
                        &predicted
                    };
                    // Per-layer counts are the same for every window; a
                    // global split's vary: the mean over windows.
                    let f = per_window
                        .iter()
                        .map(|s| Ok(from(s)?.weight_fraction_dropped(cfg)))
                        .sum::<Result<f64>>()?
                        / per_window.len() as f64;
                    let sp = Sparsifier::Oracle {
                        level,
                        split,
                        cached: Some(per_window.clone()),
                    };
                    (sp, f)
                }
                Method::Teal => (
                    Sparsifier::Channels {
                        thresholds: teal[li].clone(),
                        norms: None,
                    },
                    f64::NAN,
                ),
                Method::Wina => (
                    Sparsifier::Channels {
                        thresholds: wina[li].clone(),
                        norms: Some(norms.clone()),
                    },
                    f64::NAN,
                ),
            };
            let quality = evaluate(model, &plan, &sp, held, run, false, cancel)?;
            let weights_skipped = quality.channels_zeroed.unwrap_or(skipped);
            log(&format!(
                "  {method:<9} p={level:.2}: perplexity {:.3}, KL {:.4}",
                quality.perplexity, quality.kl_to_base
            ));
            rows.push(CompareRow {
                method,
                level,
                drops: if method.drops_units() {
                    "units"
                } else {
                    "channels"
                },
                weights_skipped,
                quality,
            });
        }
    }
    Ok(Comparison {
        base,
        rows,
        predictor,
        teal,
    })
}
