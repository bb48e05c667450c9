//! Speculative greedy decoding on one sequence state: a drafter proposes up
//! to k tokens, the full model verifies them in one pass of k + 1 rows, and
//! the longest prefix that matches the full model's own greedy choices is
//! kept, plus the full model's next token. The output is the full model's
//! greedy output (up to near-ties between the batched verify and
//! single-token decode, which the caller can check against `generate`).
//!
//! Drafters: the model itself under a plan (self-speculation: kept layers
//! read the full model's cache for the accepted prefix, skipped layers
//! write nothing while drafting; rollback removes the drafted keys before
//! the verify writes every layer), or prompt lookup (the tokens that
//! followed the last earlier occurrence of the sequence's trailing n-gram).

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use serde::Serialize;

use crate::model::{Model, Pass, RunOptions, SeqState};
use crate::plan::Plan;

/// Where draft tokens come from.
#[derive(Debug, Clone, Copy)]
pub enum Drafter<'a> {
    /// The same weights under a plan.
    SelfPlan(&'a Plan),
    /// An n-gram match in the prompt and the output so far (longest n first).
    PromptLookup { max_ngram: usize },
}

#[derive(Debug, Clone, Copy)]
pub struct SpecOptions {
    pub max_new_tokens: usize,
    /// Tokens drafted per verify (at most).
    pub draft_len: usize,
    pub stop_at_eos: bool,
    pub run: RunOptions,
}

#[derive(Debug, Clone, Serialize)]
pub struct SpecReport {
    pub prompt_tokens: usize,
    pub new_tokens: Vec<u32>,
    /// Verify passes (each also yields one token of the full model's own).
    pub verifies: usize,
    pub drafted: usize,
    pub accepted: usize,
    /// accepted / drafted.
    pub acceptance_rate: f64,
    /// New tokens per verify pass (τ: accepted draft tokens plus one).
    pub mean_accepted: f64,
    pub prefill_seconds: f64,
    /// Drafting and verifying, after the prefill.
    pub decode_seconds: f64,
    pub draft_seconds: f64,
    pub verify_seconds: f64,
    /// New tokens after the first (which the prefill gives) per second.
    pub decode_tokens_per_sec: f64,
}

/// Greedy speculative generation after `prompt`.
pub fn speculate(
    model: &Model,
    prompt: &[u32],
    drafter: Drafter,
    opts: SpecOptions,
) -> Result<SpecReport> {
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    if opts.draft_len == 0 {
        bail!("the draft length must be at least 1");
    }
    if let Drafter::SelfPlan(plan) = drafter {
        model.check_plan(plan)?;
    }
    let max = model.transformer.max_positions();
    let needed = prompt.len() + opts.max_new_tokens + opts.draft_len + 1;
    if needed > max {
        bail!(
            "prompt ({}) plus {} new tokens and a draft of {} exceeds the model's {max} positions",
            prompt.len(),
            opts.max_new_tokens,
            opts.draft_len
        );
    }
    let full = Plan::base();
    let eos = &model.cfg().eos_token_ids;
    let mut state = model.transformer.new_state(needed);

    let t0 = Instant::now();
    let mut next = greedy_rows(
        model,
        prompt,
        &full,
        opts.run.for_prefill(prompt.len()),
        &mut state,
        true,
    )?
    .pop()
    .unwrap_or_default();
    let prefill_seconds = t0.elapsed().as_secs_f64();

    let mut history: Vec<u32> = prompt.to_vec();
    let mut out = Vec::new();
    let (mut verifies, mut drafted, mut accepted) = (0, 0, 0);
    let (mut draft_seconds, mut verify_seconds) = (0.0, 0.0);
    let t1 = Instant::now();
    loop {
        // `next` is the full model's token, not yet in the cache.
        out.push(next);
        history.push(next);
        if out.len() >= opts.max_new_tokens || (opts.stop_at_eos && eos.contains(&next)) {
            break;
        }
        let pos = state.next_position();
        let budget = opts.draft_len.min(opts.max_new_tokens - out.len());
        let td = Instant::now();
        let draft = match drafter {
            Drafter::SelfPlan(plan) => {
                let d = draft_with_plan(model, next, plan, budget, opts.run, &mut state)?;
                state.truncate(pos);
                d
            }
            Drafter::PromptLookup { max_ngram } => prompt_lookup(&history, max_ngram, budget),
        };
        draft_seconds += td.elapsed().as_secs_f64();
        let tv = Instant::now();
        let mut rows = vec![next];
        rows.extend_from_slice(&draft);
        let verdict = greedy_rows(model, &rows, &full, opts.run, &mut state, false)?;
        verify_seconds += tv.elapsed().as_secs_f64();
        verifies += 1;
        drafted += draft.len();
        let n = draft
            .iter()
            .zip(&verdict)
            .take_while(|(d, v)| d == v)
            .count();
        accepted += n;
        // Keep `next` and the accepted draft tokens; drop the rest.
        state.truncate(pos + 1 + n as u32);
        let mut stop = false;
        for &tok in &draft[..n] {
            out.push(tok);
            history.push(tok);
            if out.len() >= opts.max_new_tokens || (opts.stop_at_eos && eos.contains(&tok)) {
                stop = true;
                break;
            }
        }
        if stop {
            break;
        }
        next = verdict[n];
    }
    let decode_seconds = t1.elapsed().as_secs_f64();
    let steps = out.len().saturating_sub(1);
    Ok(SpecReport {
        prompt_tokens: prompt.len(),
        new_tokens: out,
        verifies,
        drafted,
        accepted,
        acceptance_rate: if drafted > 0 {
            accepted as f64 / drafted as f64
        } else {
            0.0
        },
        mean_accepted: if verifies > 0 {
            (accepted + verifies) as f64 / verifies as f64
        } else {
            0.0
        },
        prefill_seconds,
        decode_seconds,
        draft_seconds,
        verify_seconds,
        decode_tokens_per_sec: if decode_seconds > 0.0 {
            steps as f64 / decode_seconds
        } else {
            0.0
        },
    })
}

/// Runs `ids` after what `state` holds under `plan`; the greedy next token
/// after each row (`last_only`: after the last row only).
fn greedy_rows(
    model: &Model,
    ids: &[u32],
    plan: &Plan,
    run: RunOptions,
    state: &mut SeqState,
    last_only: bool,
) -> Result<Vec<u32>> {
    let t = &model.transformer;
    let input = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    let mut pass = Pass::plan(plan, run).with_state(state);
    let mut h = t.forward_hidden(&input, &mut pass)?.squeeze(0)?;
    if last_only {
        h = h.narrow(0, ids.len() - 1, 1)?;
    }
    Ok(t.logits(&h, run)?.argmax(D::Minus1)?.to_vec1()?)
}

/// Up to `k` greedy tokens of the model under `plan`, starting by feeding
/// `first`; writes the draft's keys into `state` (the caller rolls back).
fn draft_with_plan(
    model: &Model,
    first: u32,
    plan: &Plan,
    k: usize,
    run: RunOptions,
    state: &mut SeqState,
) -> Result<Vec<u32>> {
    let mut draft = Vec::with_capacity(k);
    let mut cur = first;
    for _ in 0..k {
        let tok = greedy_rows(model, &[cur], plan, run, state, true)?[0];
        draft.push(tok);
        cur = tok;
    }
    Ok(draft)
}

/// The `k` tokens that followed the last earlier occurrence of the
/// sequence's trailing n-gram, trying n = `max_ngram` down to 1.
pub fn prompt_lookup(history: &[u32], max_ngram: usize, k: usize) -> Vec<u32> {
    let len = history.len();
    for n in (1..=max_ngram.min(len.saturating_sub(1))).rev() {
        let tail = &history[len - n..];
        // Search backwards, excluding the tail itself.
        for start in (0..len - n).rev() {
            if &history[start..start + n] == tail {
                let from = start + n;
                let to = (from + k).min(len);
                if from < to {
                    return history[from..to].to_vec();
                }
            }
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_lookup_continues_the_last_match_of_the_longest_ngram() {
        let h = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3];
        assert_eq!(prompt_lookup(&h, 3, 2), vec![7, 8]);
        assert_eq!(prompt_lookup(&h, 3, 10), vec![7, 8, 5, 1, 2, 3]);
        assert_eq!(prompt_lookup(&[4, 5, 6], 3, 2), Vec::<u32>::new());
        // Falls back to shorter n-grams.
        assert_eq!(prompt_lookup(&[5, 1, 9, 8, 1], 3, 1), vec![9]);
    }
}
