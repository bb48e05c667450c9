//! Long-context evaluation under KV budget policies: each window of
//! `context` tokens goes through the cache in prefill chunks, the policy
//! acting between chunks as it would in serving, beside the full-cache
//! model in lockstep. Reported per policy, on the positions past the
//! largest budget of the run: perplexity, KL(full ‖ policy), top-1
//! agreement, and attention recall (the share of the full model's
//! attention mass on the keys the policy let each query see, averaged over
//! layers, heads and queries). Decode speed is measured separately
//! (`decode_speed`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use rayon::prelude::*;
use serde::Serialize;

use super::perplexity::windows;
use super::score::{reference_logits, score_rows, Reference, Scores};
use crate::model::kv::{quest, KeptKeys, KvPolicy, KvSpec};
use crate::model::{Model, Pass, Probe, RunOptions, SeqState};
use crate::plan::Plan;

#[derive(Debug, Clone, Copy)]
pub struct KvEvalOptions<'a> {
    pub context: usize,
    /// Prefill chunk: the policy acts after every chunk.
    pub chunk: usize,
    /// Measure attention recall (the full model then runs the dense
    /// attention path, which reads its probabilities).
    pub recall: bool,
    pub run: RunOptions,
    pub parallel_windows: bool,
    /// Checked between prefill chunks: set, the evaluation stops with an
    /// error (a long context is one window of many chunks).
    pub cancel: Option<&'a AtomicBool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KvRow {
    pub policy: String,
    pub budget: Option<usize>,
    pub perplexity: f64,
    /// KL(full cache ‖ policy) per scored token, nats.
    pub kl_to_full: f64,
    pub top1_agreement: f64,
    /// `None` when not measured.
    pub attention_recall: Option<f64>,
    /// Live K/V bytes after the last chunk, summed over windows' layers and
    /// averaged over windows; Quest adds its page tables.
    pub kv_bytes: usize,
    /// The budget holds the whole context: this is the full cache.
    pub budget_covers_context: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct KvEvalReport {
    pub context: usize,
    pub chunk: usize,
    pub windows: usize,
    pub tokens: usize,
    /// Positions from here on (in each window) are scored.
    pub scored_from: usize,
    pub scored_tokens: usize,
    pub full_perplexity: f64,
    pub full_kv_bytes: usize,
    pub rows: Vec<KvRow>,
    pub seconds: f64,
}

/// Sums for one policy over a window.
#[derive(Debug, Clone, Default)]
struct PolicySums {
    scores: Scores,
    recall: f64,
    recall_count: f64,
    kv_bytes: usize,
}

pub fn evaluate_kv(
    model: &Model,
    ids: &[u32],
    specs: &[KvSpec],
    opts: KvEvalOptions<'_>,
    progress: impl FnMut(usize, usize),
) -> Result<KvEvalReport> {
    evaluate_kv_under(model, ids, &Plan::base(), specs, opts, progress)
}

/// `evaluate_kv` on top of a skip plan: the policies and the full cache
/// both run under `plan`, so the numbers are the policy's own cost on the
/// pruned model (KL to the plan with the full cache).
pub fn evaluate_kv_under(
    model: &Model,
    ids: &[u32],
    plan: &Plan,
    specs: &[KvSpec],
    opts: KvEvalOptions<'_>,
    mut progress: impl FnMut(usize, usize),
) -> Result<KvEvalReport> {
    model.check_plan(plan)?;
    if specs.is_empty() {
        bail!("no KV policy given");
    }
    let max = model.transformer.max_positions();
    if opts.context > max {
        bail!(
            "--context {} exceeds the model's {max} positions; give at most {max}",
            opts.context
        );
    }
    if opts.context < 2 || opts.chunk == 0 {
        bail!("--context must be at least 2 tokens and --chunk at least 1");
    }
    if ids.len() < 2 {
        bail!("the evaluation text is too short (fewer than 2 tokens)");
    }
    // Checks each policy against the model before any work.
    for s in specs {
        KvPolicy::new(s.clone(), model.cfg())?;
    }
    let cfg = model.cfg();
    let bos = if cfg.add_bos { cfg.bos_token_id } else { None };
    let wins = windows(ids, opts.context, bos);
    // Past the largest budget that is smaller than a window (a budget
    // holding the whole window is the full cache).
    let longest = wins.iter().map(Vec::len).max().unwrap_or(0);
    let scored_from = specs
        .iter()
        .filter_map(KvSpec::budget)
        .filter(|&b| b < longest)
        .max()
        .unwrap_or(0);
    if wins.iter().all(|w| w.len() <= scored_from + 1) {
        bail!(
            "no position lies past the budget of {scored_from} tokens in windows of {}: \
             give a longer text or --context, or a smaller budget",
            wins.iter().map(Vec::len).max().unwrap_or(0)
        );
    }
    let start = Instant::now();
    let one = |w: &Vec<u32>| window_sums(model, w, plan, specs, opts, scored_from);
    let results: Vec<Result<(Scores, usize, Vec<PolicySums>)>> = if opts.parallel_windows {
        wins.par_iter().map(one).collect()
    } else {
        wins.iter()
            .enumerate()
            .map(|(i, w)| {
                let r = one(w);
                progress(i + 1, wins.len());
                r
            })
            .collect()
    };
    let mut full = Scores::default();
    let mut full_bytes = 0;
    let mut sums = vec![PolicySums::default(); specs.len()];
    for r in results {
        let (f, fb, per) = r?;
        full.add(&f);
        full_bytes += fb;
        for (s, p) in sums.iter_mut().zip(per) {
            s.scores.add(&p.scores);
            s.recall += p.recall;
            s.recall_count += p.recall_count;
            s.kv_bytes += p.kv_bytes;
        }
    }
    let n_win = wins.len();
    let rows = specs
        .iter()
        .zip(&sums)
        .map(|(spec, s)| KvRow {
            policy: spec.to_string(),
            budget: spec.budget(),
            perplexity: s.scores.mean_nll().exp(),
            kl_to_full: s.scores.mean_kl(),
            top1_agreement: s.scores.agreement(),
            attention_recall: (opts.recall && s.recall_count > 0.0)
                .then(|| s.recall / s.recall_count),
            kv_bytes: s.kv_bytes / n_win,
            budget_covers_context: spec.budget().is_none_or(|b| b >= longest),
        })
        .collect();
    Ok(KvEvalReport {
        context: opts.context,
        chunk: opts.chunk,
        windows: n_win,
        tokens: wins.iter().map(Vec::len).sum(),
        scored_from,
        scored_tokens: full.scored,
        full_perplexity: full.mean_nll().exp(),
        full_kv_bytes: full_bytes / n_win,
        rows,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Room a policy's state needs: its budget plus a chunk (or the window).
fn capacity(spec: &KvSpec, window: usize, chunk: usize) -> usize {
    match spec {
        s if s.evicts() => s.budget().map_or(window, |b| (b + chunk).min(window)),
        _ => window,
    }
}

fn window_sums(
    model: &Model,
    window: &[u32],
    plan: &Plan,
    specs: &[KvSpec],
    opts: KvEvalOptions<'_>,
    scored_from: usize,
) -> Result<(Scores, usize, Vec<PolicySums>)> {
    let t = &model.transformer;
    let run = opts.run;
    let mut full_state = t.new_state(window.len());
    let mut states: Vec<SeqState> = specs
        .iter()
        .map(|s| t.new_state(capacity(s, window.len(), opts.chunk)))
        .collect();
    let mut policies = specs
        .iter()
        .map(|s| KvPolicy::new(s.clone(), model.cfg()))
        .collect::<Result<Vec<_>>>()?;
    let mut sums = vec![PolicySums::default(); specs.len()];
    let mut full = Scores::default();
    for (ci, chunk) in window.chunks(opts.chunk).enumerate() {
        if opts.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            bail!("cancelled");
        }
        let start = ci * opts.chunk;
        let len = chunk.len();
        // Rows scored: positions ≥ scored_from that have a next token.
        let first = scored_from.saturating_sub(start).min(len);
        let last = (window.len() - 1).saturating_sub(start).min(len);
        let input = Tensor::new(chunk, model.device())?.unsqueeze(0)?;
        let mut rows = Vec::with_capacity(specs.len());
        let mut kept = Vec::with_capacity(specs.len());
        for ((policy, state), sum) in policies.iter_mut().zip(&mut states).zip(&mut sums) {
            policy.begin_pass(len);
            let mut pass = Pass::plan(plan, run).with_state(state).with_probe(policy);
            let h = t.forward_hidden(&input, &mut pass)?.squeeze(0)?;
            kept.push(
                (0..t.n_layers())
                    .map(|l| policy.kept(l, state))
                    .collect::<Vec<_>>(),
            );
            policy.end_pass(state)?;
            sum.kv_bytes = state.bytes() + policy.metadata_bytes();
            rows.push(h);
        }
        let mut recall = RecallProbe {
            kept: &kept,
            start,
            rows: first..last,
            sums: vec![(0.0, 0.0); specs.len()],
            wanted: opts.recall && kept.iter().flatten().any(|k| !matches!(k, KeptKeys::All)),
        };
        let h_full = {
            let mut pass = Pass::plan(plan, run).with_state(&mut full_state);
            if recall.wanted {
                pass = pass.with_probe(&mut recall);
            }
            t.forward_hidden(&input, &mut pass)?.squeeze(0)?
        };
        for (sum, (s, c)) in sums.iter_mut().zip(&recall.sums) {
            sum.recall += s;
            sum.recall_count += c;
        }
        if last <= first {
            continue;
        }
        let targets = &window[start + first + 1..start + last + 1];
        let full_rows = h_full.narrow(0, first, last - first)?;
        let reference = reference_logits(model, &full_rows, run)?;
        full.add(&score_rows(model, &full_rows, None, targets, run)?);
        for (h, sum) in rows.iter().zip(&mut sums) {
            let r = h.narrow(0, first, last - first)?;
            sum.scores.add(&score_rows(
                model,
                &r,
                Some(Reference::Logits(&reference)),
                targets,
                run,
            )?);
        }
    }
    Ok((full, full_state.bytes(), sums))
}

/// Reads the full model's attention probabilities and sums, per policy,
/// the mass on the keys that policy let each query see.
struct RecallProbe<'a> {
    /// Per policy, per layer.
    kept: &'a [Vec<KeptKeys>],
    /// Position of the pass's first query (the full state holds 0..).
    start: usize,
    /// Query rows scored.
    rows: std::ops::Range<usize>,
    /// Per policy: (Σ mass, count of (layer, head, query)).
    sums: Vec<(f64, f64)>,
    wanted: bool,
}

impl Probe for RecallProbe<'_> {
    fn wants_attention(&self, _layer: usize) -> bool {
        self.wanted && !self.rows.is_empty()
    }

    fn attention(
        &mut self,
        layer: usize,
        probs: &Tensor,
        key_positions: &[u32],
    ) -> candle_core::Result<()> {
        let contiguous = key_positions
            .iter()
            .enumerate()
            .all(|(i, &p)| p as usize == i);
        if !contiguous {
            candle_core::bail!("attention recall: the full cache must hold positions 0..n");
        }
        let probs = probs
            .to_dtype(candle_core::DType::F32)?
            .squeeze(0)?
            .to_vec3::<f32>()?;
        let nh = probs.len();
        for (kept, sum) in self.kept.iter().zip(&mut self.sums) {
            let kept = &kept[layer];
            let kv_heads = match kept {
                KeptKeys::All => continue,
                KeptKeys::Positions(p) => p.len(),
                KeptKeys::Pages { picks, .. } => picks.len(),
            };
            let group = nh / kv_heads;
            for (hq, head) in probs.iter().enumerate() {
                let kv = hq / group;
                for i in self.rows.clone() {
                    let row = &head[i];
                    let q = self.start + i;
                    let mass: f64 = match kept {
                        KeptKeys::All => 1.0,
                        KeptKeys::Positions(p) => p[kv]
                            .iter()
                            .take_while(|&&k| k as usize <= q)
                            .map(|&k| f64::from(row[k as usize]))
                            .sum(),
                        KeptKeys::Pages { page, picks } => match &picks[kv][i] {
                            None => 1.0,
                            Some(pages) => quest::slots(pages, *page, q + 1)
                                .map(|s| f64::from(row[s]))
                                .sum(),
                        },
                    };
                    sum.0 += mass;
                    sum.1 += 1.0;
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SpeedRow {
    pub policy: String,
    /// Median decode tokens per second over the rounds.
    pub decode_tokens_per_sec: f64,
    pub all_tokens_per_sec: Vec<f64>,
    /// Live K/V bytes at the first decode step (plus Quest's page tables).
    pub kv_bytes: usize,
    /// Whether the saving is executed (a smaller cache, or gathered keys)
    /// or only simulated.
    pub executed: bool,
}

/// Decode tokens per second after a `prompt` prefill, per policy, the full
/// cache first and all interleaved round by round. The prompt is prefilled
/// once with the full cache; each policy then compresses a copy of it to
/// its budget in one step (which keys it keeps does not change the speed)
/// and decodes `steps` greedy tokens, one warm-up step untimed.
pub fn decode_speed(
    model: &Model,
    prompt: &[u32],
    specs: &[KvSpec],
    steps: usize,
    rounds: usize,
    run: RunOptions,
) -> Result<Vec<SpeedRow>> {
    decode_speed_under(model, prompt, &Plan::base(), specs, steps, rounds, run)
}

/// `decode_speed` on top of a skip plan (skipped blocks compute nothing,
/// and skipped attention layers hold no K/V).
pub fn decode_speed_under(
    model: &Model,
    prompt: &[u32],
    base: &Plan,
    specs: &[KvSpec],
    steps: usize,
    rounds: usize,
    run: RunOptions,
) -> Result<Vec<SpeedRow>> {
    model.check_plan(base)?;
    let t = &model.transformer;
    if prompt.len() + steps + 1 > t.max_positions() {
        bail!(
            "a prompt of {} tokens plus {} decode steps exceeds the model's {} positions",
            prompt.len(),
            steps + 1,
            t.max_positions()
        );
    }
    let mut prefilled = t.new_state(prompt.len() + steps + 1);
    let input = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
    let h = t.forward_hidden(
        &input,
        &mut Pass::plan(base, run.for_prefill(prompt.len())).with_state(&mut prefilled),
    )?;
    let last = h.narrow(1, prompt.len() - 1, 1)?.squeeze(1)?;
    let first: u32 = t
        .logits(&last, run)?
        .argmax(D::Minus1)?
        .squeeze(0)?
        .to_scalar()?;
    let mut all: Vec<KvSpec> = vec![KvSpec::Full];
    all.extend(specs.iter().filter(|s| **s != KvSpec::Full).cloned());
    let mut speeds = vec![Vec::new(); all.len()];
    let mut bytes = vec![0; all.len()];
    for _ in 0..rounds {
        for (i, spec) in all.iter().enumerate() {
            let mut state = prefilled.deep_clone()?;
            let mut policy = KvPolicy::new(spec.clone(), model.cfg())?;
            policy.begin_pass(prompt.len());
            policy.end_pass(&mut state)?;
            let mut next = first;
            let mut timed = 0.0;
            for step in 0..=steps {
                let t0 = Instant::now();
                policy.begin_pass(1);
                let input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
                let mut pass = Pass::plan(base, run)
                    .with_state(&mut state)
                    .with_probe(&mut policy);
                let h = t.forward_hidden(&input, &mut pass)?;
                next = t
                    .logits(&h.squeeze(1)?, run)?
                    .argmax(D::Minus1)?
                    .squeeze(0)?
                    .to_scalar()?;
                policy.end_pass(&mut state)?;
                if step == 0 {
                    bytes[i] = state.bytes() + policy.metadata_bytes();
                } else {
                    timed += t0.elapsed().as_secs_f64();
                }
            }
            speeds[i].push(steps as f64 / timed);
        }
    }
    Ok(all
        .iter()
        .zip(speeds)
        .zip(bytes)
        .map(|((spec, mut s), kv_bytes)| {
            let all_tokens_per_sec = s.clone();
            s.sort_by(f64::total_cmp);
            SpeedRow {
                policy: spec.to_string(),
                decode_tokens_per_sec: s[s.len() / 2],
                all_tokens_per_sec,
                kv_bytes,
                executed: *spec != KvSpec::Full,
            }
        })
        .collect())
}
