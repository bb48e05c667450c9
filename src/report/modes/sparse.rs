//! Sparse plans: quality through `eval`'s sparse evaluation; decode timed
//! on the f32 candle path the sliced weights run on, against the
//! unmodified model on that path (TEAL/WINA executed there by the
//! sparse-input kernel on a column-major copy).

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Result;
use candle_core::{Tensor, D};

use super::{fact, Quality, Speed};
use crate::eval::bench::{ratio, Stat};
use crate::eval::perplexity::windows;
use crate::model::{Model, Pass, RunOptions, SeqState};
use crate::plan::Plan;
use crate::surgery::sparsity::activation::{ChannelProbe, ColumnWeights};
use crate::surgery::sparsity::evaluate::{self as sparse_eval, HeldOut};
use crate::surgery::sparsity::speed::SPEED_RUN;
use crate::surgery::sparsity::{ChannelThresholds, ColumnNorms};
use crate::surgery::sparsity::{MaskPolicy, Sparsifier, SparsitySection, UnitMask};

/// The head/neuron mask a sparse plan runs here: the one it gives the
/// first window (the predictor's and the oracle's depend on the text).
fn sparse_mask(
    model: &Model,
    plan: &Plan,
    sp: &Sparsifier,
    ids: &[u32],
    window: usize,
) -> Result<Option<UnitMask>> {
    let cfg = model.cfg();
    let bos = if cfg.add_bos { cfg.bos_token_id } else { None };
    let first = windows(ids, window, bos).swap_remove(0);
    sp.mask_for(model, plan, &first)
}

/// A sparse plan's quality, as `eval --plan` measures it.
pub fn sparse_quality(
    model: &Model,
    plan: &Plan,
    section: &SparsitySection,
    sp: &Sparsifier,
    ids: &[u32],
    window: usize,
    run: RunOptions,
) -> Result<Quality> {
    let held = HeldOut::new(model, ids, window, usize::MAX)?;
    let q = sparse_eval::evaluate(model, plan, sp, &held, run, false, &AtomicBool::new(false))?;
    let cfg = model.cfg();
    let total = 2 * model.n_layers();
    let kept = (total - plan.skip.len()) as f64;
    let units = section.method.drops_units();
    let mut facts = vec![fact(
        "sparsity",
        format!(
            "{} at level {} ({}, {} split; {})",
            section.method,
            section.level,
            section.method.unit(),
            section.split,
            if units {
                "executed: sliced weights"
            } else {
                "executed at decode by the sparse-input kernel; quality windows masked, the same \
                 decisions"
            }
        ),
    )];
    let share = match (
        sparse_mask(model, plan, sp, ids, window)?,
        q.channels_zeroed,
    ) {
        (Some(mask), _) => {
            let (heads, neurons) = mask.dropped_fractions(cfg);
            let w = mask.weight_fraction_dropped(cfg);
            facts.push(fact(
                "dropped",
                format!(
                    "{:.1}% of query heads and {:.1}% of MLP neurons: {:.1}% of the layers' \
                     projection weights not read",
                    heads * 100.0,
                    neurons * 100.0,
                    w * 100.0
                ),
            ));
            w
        }
        (None, Some(z)) => {
            facts.push(fact(
                "channels zeroed",
                format!(
                    "{:.1}% of projection inputs, measured on the evaluation text (the weights \
                     are still read)",
                    z * 100.0
                ),
            ));
            z
        }
        (None, None) => 0.0,
    };
    Ok(Quality {
        perplexity: q.perplexity,
        reference_perplexity: None,
        kl_to_base: q.kl_to_base,
        top1_agreement: q.top1_agreement,
        blocks_removed: Some(plan.skip.len() as f64 + share * kept),
        summary: Some(format!(
            "{} sparsity at level {:.2} ({})",
            section.method,
            section.level,
            if units {
                "executed"
            } else {
                "executed at decode"
            }
        )),
        facts,
    })
}

/// How a sparse plan runs a pass.
enum SparseRun<'a> {
    Dense,
    Mask(MaskPolicy<'a>),
    /// TEAL/WINA, executed at one-row steps on `columns`.
    Channels {
        thresholds: &'a ChannelThresholds,
        norms: Option<&'a ColumnNorms>,
        columns: &'a ColumnWeights,
    },
}

fn sparse_hidden(
    model: &Model,
    plan: &Plan,
    how: &SparseRun,
    input: &Tensor,
    state: &mut SeqState,
) -> Result<Tensor> {
    let t = &model.transformer;
    let pass = Pass::plan(plan, SPEED_RUN).with_state(state);
    Ok(match how {
        SparseRun::Dense => {
            let mut pass = pass;
            t.forward_hidden(input, &mut pass)?
        }
        SparseRun::Mask(p) => t.forward_hidden(input, &mut pass.with_policy(p))?,
        SparseRun::Channels {
            thresholds,
            norms,
            columns,
        } => {
            let mut probe = ChannelProbe::executed(model, thresholds, *norms, columns)?;
            t.forward_hidden(input, &mut pass.with_probe(&mut probe))?
        }
    })
}

/// Seconds for `n` greedy decode steps after `prompt`.
fn time_sparse_decode(
    model: &Model,
    plan: &Plan,
    how: &SparseRun,
    prompt: &[u32],
    n: usize,
) -> Result<f64> {
    let t = &model.transformer;
    let mut state = t.new_state(prompt.len() + n + 1);
    let step = |ids: &[u32], state: &mut SeqState| -> Result<u32> {
        let input = Tensor::new(ids, model.device())?.unsqueeze(0)?;
        let h = sparse_hidden(model, plan, how, &input, state)?;
        let last = h.narrow(1, ids.len() - 1, 1)?.squeeze(1)?;
        Ok(t.logits(&last, SPEED_RUN)?
            .argmax(D::Minus1)?
            .squeeze(0)?
            .to_scalar::<u32>()?)
    };
    let mut next = step(prompt, &mut state)?;
    let start = Instant::now();
    for _ in 0..n {
        next = step(&[next], &mut state)?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Decode speed of sparse plans against the unmodified model, both on the
/// f32 candle path (the sliced weights are f32 copies; the lean quantized
/// path would fall back to candle for every masked block), one run of each
/// in turn per round, after a warm-up each.
pub fn sparse_speeds(
    model: &Model,
    plans: &[(&Plan, &SparsitySection, &Sparsifier)],
    ids: &[u32],
    window: usize,
    prompt_tokens: usize,
    steps: usize,
    runs: usize,
) -> Result<Vec<Speed>> {
    let prompt = &ids[..prompt_tokens.min(ids.len()).max(1)];
    let cfg = model.cfg();
    let base = Plan::base();
    let masks: Vec<Option<UnitMask>> = plans
        .iter()
        .map(|(p, _, sp)| sparse_mask(model, p, sp, ids, window))
        .collect::<Result<_>>()?;
    // One column-major copy for every TEAL/WINA plan.
    let any_channels = plans
        .iter()
        .any(|(_, _, sp)| matches!(sp, Sparsifier::Channels { .. }));
    let wina_norms = plans.iter().find_map(|(_, _, sp)| match sp {
        Sparsifier::Channels { norms, .. } => norms.as_deref(),
        _ => None,
    });
    let columns = any_channels
        .then(|| ColumnWeights::of(model, wina_norms))
        .transpose()?;
    let mut runners: Vec<(&Plan, SparseRun)> = vec![(&base, SparseRun::Dense)];
    for ((plan, _, sp), mask) in plans.iter().zip(&masks) {
        let how = match (mask, sp, &columns) {
            (Some(m), _, _) => SparseRun::Mask(MaskPolicy::new(plan, m, cfg)?),
            (None, Sparsifier::Channels { thresholds, norms }, Some(columns)) => {
                SparseRun::Channels {
                    thresholds,
                    norms: norms.as_deref(),
                    columns,
                }
            }
            (None, _, _) => SparseRun::Dense,
        };
        runners.push((plan, how));
    }
    for (plan, how) in &runners {
        time_sparse_decode(model, plan, how, prompt, steps.min(4))?;
    }
    let mut times = vec![Vec::new(); runners.len()];
    for _ in 0..runs {
        for ((plan, how), t) in runners.iter().zip(times.iter_mut()) {
            // The slice cache holds about one mask: warm this one first.
            time_sparse_decode(model, plan, how, prompt, 1)?;
            t.push(steps as f64 / time_sparse_decode(model, plan, how, prompt, steps)?);
        }
    }
    let stats: Vec<Stat> = times.into_iter().map(Stat::from).collect();
    let dense = stats[0].clone();
    Ok(plans
        .iter()
        .zip(stats.into_iter().skip(1))
        .map(|((_, s, _), decode)| {
            // Both kinds are executed at decode: sliced weights, or the
            // sparse-input kernel on a column-major copy.
            let how = if s.method.drops_units() {
                "the sliced weights are f32 copies"
            } else {
                "each projection reads only its kept input channels' columns of a column-major \
                 f32 copy (`kernels::sparse_input`)"
            };
            Speed {
                prefill: None,
                prefill_speedup: None,
                decode_speedup: ratio(&decode, &dense),
                decode,
                executed: true,
                reference: Some("vs dense, f32 path, decode only".to_string()),
                facts: vec![fact(
                    "speed",
                    format!(
                        "executed, decode only, on the f32 candle path ({how}) against the \
                         unmodified model on the same path (decode {:.1} tok/s, runs \
                         {:.1}–{:.1}), in the same rounds",
                        dense.median, dense.min, dense.max
                    ),
                )],
            }
        })
        .collect())
}
