//! Plans of the modes beyond block skips, measured for the report through
//! each mode's own evaluation and timing, never as their skips alone:
//! - a KV budget at its context: `eval --kv`'s `evaluate_kv` (quality
//!   against the full cache on the positions past the budget) and
//!   `decode_speed` (the full cache and the policies, interleaved);
//! - contextual sparsity: `eval`'s sparse evaluation; decode timed here on
//!   the f32 candle path the sliced weights run on, against the unmodified
//!   model on that path (TEAL/WINA are simulated: the zeroed channels are
//!   still multiplied);
//! - token routing: `eval`'s routed evaluation (the realised compute) and
//!   `bench`'s routed timing on real text;
//! - any plan as the draft of lossless self-speculative decoding:
//!   `speculate`'s loop against plain decoding, interleaved.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Tensor, D};

use super::DraftSpeed;
use crate::eval::bench::{ratio, Stat};
use crate::eval::data::Sequence;
use crate::eval::generate::{self, GenOptions};
use crate::eval::kv::{self, KvEvalOptions};
use crate::eval::perplexity::windows;
use crate::eval::prompt_sets;
use crate::eval::speculative::{self, Drafter, SpecOptions};
use crate::model::kv::KvSpec;
use crate::model::routing::{load_from_plan, Routers, RoutingSection};
use crate::model::{Model, Pass, RunOptions, SeqState};
use crate::plan::{KvSection, Plan, PlanFile, KV_SECTION};
use crate::surgery::routing::measure::{evaluate_text, Routed};
use crate::surgery::routing::speed::{speed_interleaved, SpeedEntry, SpeedOptions};
use crate::surgery::sparsity::activation::ChannelProbe;
use crate::surgery::sparsity::evaluate::{self as sparse_eval, HeldOut};
use crate::surgery::sparsity::scores::sequence_scores;
use crate::surgery::sparsity::speed::SPEED_RUN;
use crate::surgery::sparsity::{
    MaskPolicy, Sparsifier, SparsitySection, UnitMask, SPARSITY_SECTION,
};

/// `eval --kv`'s prefill chunk: the policy acts after every chunk.
pub const KV_CHUNK: usize = 256;
/// `eval --kv`'s longest default context.
pub const KV_MAX_CONTEXT: usize = 8192;
/// Tokens each draft run generates, and tokens drafted per verify
/// (`speculate`'s default).
pub const DRAFT_TOKENS: usize = 32;
pub const DRAFT_LEN: usize = 4;

/// What a plan computes besides its skips and scales.
pub enum Mode {
    /// Skips, scales, healed or replaced blocks: one forward pass, timed
    /// with the other such plans.
    Plain,
    Kv(KvSpec),
    Sparse(SparsitySection),
    Routed(RoutingSection, Routers),
}

impl Mode {
    /// The plan's mode, refusing what no command measures (a KV budget on
    /// a plan that also skips, two modes in one plan) before any work.
    pub fn of(pf: &PlanFile, plan: &Plan, model: &Model, path: &Path) -> Result<Mode> {
        let kv = pf.sections.get::<KvSection>(KV_SECTION)?;
        let sparse = pf.sections.get::<SparsitySection>(SPARSITY_SECTION)?;
        let routed = load_from_plan(pf, model)?;
        let modes = [kv.is_some(), sparse.is_some(), routed.is_some()];
        if modes.iter().filter(|&&m| m).count() > 1 {
            bail!(
                "plan {} combines a KV budget, sparsity or routing; no command measures such a \
                 combination yet: keep one of those sections",
                path.display()
            );
        }
        if let Some(kv) = kv {
            if *plan != Plan::base() {
                bail!(
                    "plan {} has a `kv` section and also skips, rescales or trains blocks; KV \
                     budgets are measured on the full model only (as `eval --kv` does): keep \
                     only the `kv` section",
                    path.display()
                );
            }
            return Ok(Mode::Kv(kv.spec()?));
        }
        if let Some(s) = sparse {
            s.sparsifier(model)?;
            return Ok(Mode::Sparse(s));
        }
        if let Some((s, r)) = routed {
            return Ok(Mode::Routed(s, r));
        }
        Ok(Mode::Plain)
    }

    /// The method the report colours it by: one per mode.
    pub fn method(&self) -> Option<&'static str> {
        match self {
            Mode::Plain => None,
            Mode::Kv(_) => Some("KV budget"),
            Mode::Sparse(_) => Some("sparsity"),
            Mode::Routed(..) => Some("token routing"),
        }
    }
}

/// A plan's measured quality and the mode's facts behind it.
pub struct Quality {
    pub perplexity: f64,
    pub reference_perplexity: Option<f64>,
    pub kl_to_base: f64,
    pub top1_agreement: f64,
    /// Blocks removed or their equivalent in compute; `None`: the skips.
    pub blocks_removed: Option<f64>,
    pub summary: Option<String>,
    pub facts: Vec<(String, String)>,
}

/// A plan's timing against its reference (the unmodified model on the same
/// path, in the same rounds).
pub struct Speed {
    pub prefill: Option<Stat>,
    pub prefill_speedup: Option<Stat>,
    pub decode: Stat,
    pub decode_speedup: Stat,
    pub executed: bool,
    /// What the speed-up is against, when not the base row's timing.
    pub reference: Option<String>,
    pub facts: Vec<(String, String)>,
}

fn fact(k: &str, v: String) -> (String, String) {
    (k.to_string(), v)
}

/// The context a KV plan is measured at: the text as one window, at most
/// `eval --kv`'s default (the model's positions, at most 8192).
pub fn kv_context(model: &Model, ids: &[u32]) -> usize {
    let max = model.transformer.max_positions().min(KV_MAX_CONTEXT);
    (ids.len() + usize::from(model.cfg().add_bos)).min(max)
}

/// A KV plan's quality with its policy applied, as `eval --kv` measures it.
pub fn kv_quality(
    model: &Model,
    ids: &[u32],
    spec: &KvSpec,
    context: usize,
    run: RunOptions,
) -> Result<Quality> {
    let opts = KvEvalOptions {
        context,
        chunk: KV_CHUNK,
        recall: false,
        run,
        parallel_windows: false,
    };
    let r = kv::evaluate_kv(model, ids, std::slice::from_ref(spec), opts, |_, _| {})?;
    let row = &r.rows[0];
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    let mut facts = vec![
        fact(
            "KV budget",
            match spec.budget() {
                Some(b) => format!("{spec}: {b} keys per layer and KV head"),
                None => format!("{spec}: every key"),
            },
        ),
        fact(
            "KV context",
            format!(
                "quality measured at a {}-token context ({} window{}, prefill chunks of {}, the \
                 policy acting between chunks), on the {} positions past the budget, against the \
                 full cache on the same positions (perplexity {:.3})",
                r.context,
                r.windows,
                if r.windows == 1 { "" } else { "s" },
                r.chunk,
                r.scored_tokens,
                r.full_perplexity
            ),
        ),
        fact(
            "KV cache",
            format!(
                "{:.2} MiB against {:.2} MiB for the full cache",
                mib(row.kv_bytes),
                mib(r.full_kv_bytes)
            ),
        ),
    ];
    if row.budget_covers_context {
        facts.push(fact(
            "note",
            "the budget holds the whole context, so this is the full cache: give a longer \
             --text or more --max-windows to measure the budget"
                .into(),
        ));
    }
    Ok(Quality {
        perplexity: row.perplexity,
        reference_perplexity: Some(r.full_perplexity),
        kl_to_base: row.kl_to_full,
        top1_agreement: row.top1_agreement,
        blocks_removed: Some(0.0),
        summary: Some(format!(
            "Keep a KV budget of {spec} at a {}-token context",
            r.context
        )),
        facts,
    })
}

/// Decode speed of each KV policy against the full cache, all interleaved
/// round by round after one prefill of the context (`eval --kv
/// --decode-speed`).
pub fn kv_speeds(
    model: &Model,
    ids: &[u32],
    specs: &[&KvSpec],
    context: usize,
    steps: usize,
    runs: usize,
    run: RunOptions,
) -> Result<Vec<Speed>> {
    let cfg = model.cfg();
    let bos = if cfg.add_bos { cfg.bos_token_id } else { None };
    let max = model.transformer.max_positions();
    let mut prompt = windows(ids, context, bos).swap_remove(0);
    prompt.truncate(max.saturating_sub(steps + 1));
    let mut unique: Vec<KvSpec> = Vec::new();
    for s in specs {
        if !unique.contains(s) {
            unique.push((*s).clone());
        }
    }
    let rows = kv::decode_speed(model, &prompt, &unique, steps, runs, run)?;
    let full = Stat::from(rows[0].all_tokens_per_sec.clone());
    specs
        .iter()
        .map(|s| {
            let name = s.to_string();
            let row = rows
                .iter()
                .find(|r| r.policy == name)
                .expect("decode_speed times every policy");
            let decode = Stat::from(row.all_tokens_per_sec.clone());
            Ok(Speed {
                prefill: None,
                prefill_speedup: None,
                decode_speedup: ratio(&decode, &full),
                decode,
                executed: row.executed,
                reference: Some(format!(
                    "decode only, against the full cache after the same {}-token prefill, in \
                     the same rounds",
                    prompt.len()
                )),
                facts: vec![fact(
                    "full cache decode",
                    format!(
                        "{:.1} tok/s (runs {:.1}–{:.1})",
                        full.median, full.min, full.max
                    ),
                )],
            })
        })
        .collect()
}

/// The head/neuron mask a sparse plan runs (for the oracle: the one its
/// scores on the first window give); `None` for TEAL/WINA and level 0.
fn sparse_mask(
    model: &Model,
    plan: &Plan,
    sp: &Sparsifier,
    ids: &[u32],
    window: usize,
) -> Result<Option<UnitMask>> {
    Ok(match sp {
        Sparsifier::Mask(m) => Some(m.clone()),
        Sparsifier::Oracle { level, split, .. } => {
            let cfg = model.cfg();
            let bos = if cfg.add_bos { cfg.bos_token_id } else { None };
            let w = windows(ids, window, bos).swap_remove(0);
            let seq = Sequence {
                ids: w,
                scored_from: 1,
            };
            let scores = sequence_scores(model, &seq, plan)?.0;
            Some(UnitMask::with_split(&scores, *level, *split)?)
        }
        Sparsifier::Dense | Sparsifier::Channels { .. } => None,
    })
}

/// A sparse plan's quality, as `eval --plan` measures it.
pub fn sparse_quality(
    model: &Model,
    plan: &Plan,
    section: &SparsitySection,
    ids: &[u32],
    window: usize,
    run: RunOptions,
) -> Result<Quality> {
    let sp = section.sparsifier(model)?;
    let held = HeldOut::new(model, ids, window, usize::MAX)?;
    let q = sparse_eval::evaluate(model, plan, &sp, &held, run, false, &AtomicBool::new(false))?;
    let cfg = model.cfg();
    let total = 2 * model.n_layers();
    let kept = (total - plan.skip.len()) as f64;
    let executed = section.method.executed();
    let mut facts = vec![fact(
        "sparsity",
        format!(
            "{} at level {} ({}, {} split; {})",
            section.method,
            section.level,
            section.method.unit(),
            section.split,
            if executed {
                "executed: sliced weights"
            } else {
                "simulated: masked inputs"
            }
        ),
    )];
    let share = match (
        sparse_mask(model, plan, &sp, ids, window)?,
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
            if executed { "executed" } else { "simulated" }
        )),
        facts,
    })
}

/// How a sparse plan runs a pass.
enum SparseRun<'a> {
    Dense,
    Mask(MaskPolicy<'a>),
    Channels(&'a Sparsifier),
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
        SparseRun::Channels(Sparsifier::Channels { thresholds, norms }) => {
            let mut probe = ChannelProbe::new(model, thresholds, norms.as_deref())?;
            t.forward_hidden(input, &mut pass.with_probe(&mut probe))?
        }
        SparseRun::Channels(_) => unreachable!("only channel sparsifiers run a probe"),
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
    plans: &[(&Plan, &SparsitySection)],
    ids: &[u32],
    window: usize,
    prompt_tokens: usize,
    steps: usize,
    runs: usize,
) -> Result<Vec<Speed>> {
    let prompt = &ids[..prompt_tokens.min(ids.len()).max(1)];
    let cfg = model.cfg();
    let base = Plan::base();
    let sparsifiers: Vec<Sparsifier> = plans
        .iter()
        .map(|(_, s)| s.sparsifier(model))
        .collect::<Result<_>>()?;
    let masks: Vec<Option<UnitMask>> = plans
        .iter()
        .zip(&sparsifiers)
        .map(|((p, _), sp)| sparse_mask(model, p, sp, ids, window))
        .collect::<Result<_>>()?;
    let mut runners: Vec<(&Plan, SparseRun)> = vec![(&base, SparseRun::Dense)];
    for (((plan, _), sp), mask) in plans.iter().zip(&sparsifiers).zip(&masks) {
        let how = match (mask, sp) {
            (Some(m), _) => SparseRun::Mask(MaskPolicy::new(plan, m, cfg)?),
            (None, Sparsifier::Channels { .. }) => SparseRun::Channels(sp),
            (None, _) => SparseRun::Dense,
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
        .map(|((_, s), decode)| {
            let executed = s.method.executed();
            Speed {
                prefill: None,
                prefill_speedup: None,
                decode_speedup: ratio(&decode, &dense),
                decode,
                executed,
                reference: Some(if executed {
                    "decode only, on the f32 candle path (the sliced weights are f32) against \
                     the unmodified model on the same path, in the same rounds"
                        .to_string()
                } else {
                    "simulated: the zeroed channels are still multiplied (no sparse kernel), so \
                     this times the masking, not a saving; decode only, f32 candle path, \
                     against the unmodified model on that path"
                        .to_string()
                }),
                facts: vec![fact(
                    "dense decode (f32 path)",
                    format!(
                        "{:.1} tok/s (runs {:.1}–{:.1})",
                        dense.median, dense.min, dense.max
                    ),
                )],
            }
        })
        .collect())
}

/// A routed plan's quality and realised compute, as `eval --plan` measures it.
pub fn routed_quality(
    model: &Model,
    plan: &Plan,
    section: &RoutingSection,
    routers: &Routers,
    ids: &[u32],
    window: usize,
    run: RunOptions,
) -> Result<Quality> {
    let routed = Routed {
        plan,
        routers,
        kv: section.kv,
        threshold: section.threshold,
    };
    let r = evaluate_text(model, ids, window, &routed, run, false)?;
    let total = 2 * model.n_layers();
    Ok(Quality {
        perplexity: r.perplexity,
        reference_perplexity: None,
        kl_to_base: r.kl_to_base,
        top1_agreement: r.top1_agreement,
        blocks_removed: Some((1.0 - r.executed_fraction) * total as f64),
        summary: Some(format!(
            "Route tokens past blocks ({:.1}% of blocks executed)",
            r.executed_fraction * 100.0
        )),
        facts: vec![
            fact(
                "routing",
                format!(
                    "trained routers on {:?} blocks, capacity {}, threshold {:.4}, K/V of \
                     skipping tokens: {:?}",
                    section.on, section.capacity, section.threshold, section.kv
                ),
            ),
            fact(
                "realised compute",
                format!(
                    "{:.1}% of all blocks executed per token ({:.1}% of the routed ones), \
                     measured on the evaluation text ({} tokens)",
                    r.executed_fraction * 100.0,
                    r.routed_share * 100.0,
                    r.scored_tokens
                ),
            ),
        ],
    })
}

/// Routed plans timed against the unmodified model on the evaluation text
/// (routing depends on the tokens), as `bench --plan` times them.
pub fn routed_speeds(
    model: &Model,
    plans: &[(&Plan, &RoutingSection, &Routers)],
    ids: &[u32],
    opts: SpeedOptions,
) -> Result<Vec<Speed>> {
    let base = Plan::base();
    let mut entries = vec![SpeedEntry {
        name: "base".into(),
        plan: &base,
        routed: None,
    }];
    for (i, (plan, section, routers)) in plans.iter().enumerate() {
        entries.push(SpeedEntry {
            name: format!("routed {i}"),
            plan,
            routed: Some(Routed {
                plan,
                routers,
                kv: section.kv,
                threshold: section.threshold,
            }),
        });
    }
    let rows = speed_interleaved(model, &entries, ids, opts, |_, _| {})?;
    let (bp, bd) = (
        rows[0].prefill_tokens_per_sec.clone(),
        rows[0].decode_tokens_per_sec.clone(),
    );
    Ok(rows
        .into_iter()
        .skip(1)
        .map(|r| Speed {
            prefill_speedup: Some(ratio(&r.prefill_tokens_per_sec, &bp)),
            decode_speedup: ratio(&r.decode_tokens_per_sec, &bd),
            prefill: Some(r.prefill_tokens_per_sec),
            decode: r.decode_tokens_per_sec,
            executed: true,
            reference: Some(
                "against the unmodified model on the evaluation text (routing depends on the \
                 tokens), in the same rounds"
                    .into(),
            ),
            facts: vec![fact(
                "compute while timed",
                format!(
                    "{:.1}% of all blocks executed per token",
                    r.executed_fraction * 100.0
                ),
            )],
        })
        .collect())
}

/// The prompts a draft is measured on: the first of each kind of the
/// built-in set, through the chat template where the model has one.
fn draft_prompts(model: &Model) -> Result<Vec<Vec<u32>>> {
    prompt_sets::builtin("all", Some(1))?
        .iter()
        .map(|p| {
            crate::commands::generate::prompt_ids(model, &p.prompt, true)
                .or_else(|_| crate::commands::generate::prompt_ids(model, &p.prompt, false))
        })
        .collect()
}

/// Each plan as the draft of greedy self-speculative decoding, against
/// plain decoding: per run, every prompt decoded plainly and then with each
/// draft in turn (`speculate`'s protocol), so drift hits all alike.
pub fn draft_speeds(
    model: &Model,
    plans: &[&Plan],
    runs: usize,
    run: RunOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<DraftSpeed>> {
    let prompts = draft_prompts(model)?;
    let gen = GenOptions {
        max_new_tokens: DRAFT_TOKENS,
        temperature: 0.0,
        seed: 0,
        stop_at_eos: false,
        run,
    };
    let spec = SpecOptions::greedy(DRAFT_TOKENS, DRAFT_LEN, run);
    let base = Plan::base();
    // Per run: plain (steps, seconds), per plan (steps, seconds).
    let mut plain_runs = Vec::new();
    let mut spec_runs = vec![Vec::new(); plans.len()];
    // Per plan: drafted, accepted, verifies, differing prompts (last run).
    let mut counts = vec![(0usize, 0usize, 0usize, 0usize); plans.len()];
    for r in 0..runs {
        let mut plain = (0usize, 0.0f64);
        let mut per_plan = vec![(0usize, 0.0f64); plans.len()];
        counts.iter_mut().for_each(|c| *c = (0, 0, 0, 0));
        for prompt in &prompts {
            let p = generate::generate(model, prompt, &base, gen, |_| Ok(()))?;
            plain.0 += p.new_tokens.len().saturating_sub(1);
            plain.1 += p.decode_seconds;
            for (i, plan) in plans.iter().enumerate() {
                let s = speculative::speculate(model, prompt, Drafter::SelfPlan(plan), spec)?;
                per_plan[i].0 += s.new_tokens.len().saturating_sub(1);
                per_plan[i].1 += s.decode_seconds;
                let c = &mut counts[i];
                c.0 += s.drafted;
                c.1 += s.accepted;
                c.2 += s.verifies;
                c.3 += usize::from(s.new_tokens != p.new_tokens);
            }
        }
        let rate = |(steps, secs): (usize, f64)| steps as f64 / secs.max(1e-9);
        plain_runs.push(rate(plain));
        for (i, x) in per_plan.into_iter().enumerate() {
            spec_runs[i].push(rate(x));
        }
        progress(r + 1, runs);
    }
    let plain = Stat::from(plain_runs);
    Ok(spec_runs
        .into_iter()
        .zip(counts)
        .map(|(runs, (drafted, accepted, verifies, differ))| {
            let s = Stat::from(runs);
            DraftSpeed {
                acceptance_rate: accepted as f64 / drafted.max(1) as f64,
                mean_accepted: (accepted + verifies) as f64 / verifies.max(1) as f64,
                draft_len: DRAFT_LEN,
                speedup: ratio(&s, &plain),
                plain_tokens_per_sec: plain.clone(),
                speculative_tokens_per_sec: s,
                identical: differ == 0,
                prompts: prompts.len(),
                new_tokens: DRAFT_TOKENS,
            }
        })
        .collect())
}
