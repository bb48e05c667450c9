//! Speculative decoding on one sequence state: a drafter proposes up to k
//! tokens, the full model verifies them in one pass of k + 1 rows, and the
//! cache is rolled back to what was accepted.
//!
//! - Greedy (temperature 0): the longest drafted prefix that matches the
//!   full model's own greedy choices is kept, plus the full model's next
//!   token, so the output is the full model's greedy output (up to
//!   near-ties between the batched verify and single-token decode, which
//!   the caller can check against `generate`).
//! - Sampled (temperature > 0): standard speculative sampling (Leviathan
//!   et al., Chen et al. 2023): drafted token d, drafted with probability
//!   q(d), is accepted with probability min(1, p(d)/q(d)); the first
//!   rejected one is replaced by a draw from norm(max(0, p − q)); when all
//!   are accepted a bonus token is drawn from p. The output is distributed
//!   as the full model's samples (tested with a chi-square test).
//!
//! Drafters: the model itself under a plan (self-speculation: kept layers
//! read the full model's cache for the accepted prefix, skipped layers
//! write nothing while drafting; rollback removes the drafted keys before
//! the verify writes every layer), or prompt lookup (the tokens that
//! followed the last earlier occurrence of the sequence's trailing n-gram;
//! a point mass, q(d) = 1).
//!
//! Draft length: fixed, or adaptive ([`DraftLen::Auto`]): drafting stops
//! after a token whose draft probability is below a threshold γ, and γ
//! follows the verifier (Draft & Verify's confidence-based early stop).

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use serde::Serialize;

use super::generate::Sampler;
use crate::model::{LayerPolicy, Model, Pass, ProbeSource, RunOptions, SeqState};
use crate::plan::Plan;

/// Where draft tokens come from.
#[derive(Clone, Copy)]
pub enum Drafter<'a> {
    /// The same weights under a plan.
    SelfPlan(&'a Plan),
    /// The same weights under a plan with a layer policy deciding what
    /// runs: a routed plan's routers (per drafted token), a sparse plan's
    /// head/neuron mask (per prompt).
    Policy {
        plan: &'a Plan,
        policy: &'a dyn LayerPolicy,
    },
    /// The same weights under a plan with a fresh probe in every draft
    /// pass: TEAL/WINA's per-token channel thresholds, executed.
    Probed {
        plan: &'a Plan,
        probes: &'a dyn ProbeSource,
    },
    /// An n-gram match in the prompt and the output so far (longest n first).
    PromptLookup { max_ngram: usize },
}

impl<'a> Drafter<'a> {
    /// The same weights under `plan`, with `policy` (it wins) or a probe
    /// from `probes` in every draft pass, if given.
    pub fn under(
        plan: &'a Plan,
        policy: Option<&'a dyn LayerPolicy>,
        probes: Option<&'a dyn ProbeSource>,
    ) -> Self {
        match (policy, probes) {
            (Some(policy), _) => Drafter::Policy { plan, policy },
            (None, Some(probes)) => Drafter::Probed { plan, probes },
            (None, None) => Drafter::SelfPlan(plan),
        }
    }
}

/// The most tokens drafted per verify.
pub const MAX_DRAFT_LEN: usize = 16;

/// Tokens drafted per verify pass.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum DraftLen {
    Fixed(usize),
    /// Up to `max` tokens; the self-draft stops after a token it drafted
    /// with probability below γ. γ starts at [`AUTO_GAMMA_START`]; after a
    /// verify that rejected a drafted token it rises by [`AUTO_GAMMA_STEP`],
    /// after one that accepted them all it falls by the same (kept within
    /// [`AUTO_GAMMA_MIN`], [`AUTO_GAMMA_MAX`]). Prompt lookup has no
    /// probabilities and drafts `max`.
    Auto {
        max: usize,
    },
}

pub const AUTO_GAMMA_START: f64 = 0.5;
pub const AUTO_GAMMA_STEP: f64 = 0.1;
pub const AUTO_GAMMA_MIN: f64 = 0.1;
pub const AUTO_GAMMA_MAX: f64 = 0.9;
/// `--draft-len auto` drafts at most this many tokens.
pub const AUTO_MAX_DRAFT_LEN: usize = 8;

impl DraftLen {
    /// The most tokens one verify may check.
    pub fn max(self) -> usize {
        match self {
            DraftLen::Fixed(k) | DraftLen::Auto { max: k } => k,
        }
    }

    pub fn validate(self) -> Result<()> {
        let k = self.max();
        if k == 0 || k > MAX_DRAFT_LEN {
            bail!("the draft length must be between 1 and {MAX_DRAFT_LEN} (got {k})");
        }
        Ok(())
    }

    pub fn describe(self) -> String {
        match self {
            DraftLen::Fixed(k) => k.to_string(),
            DraftLen::Auto { max } => format!("auto (≤ {max})"),
        }
    }
}

impl std::str::FromStr for DraftLen {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "auto" {
            return Ok(DraftLen::Auto {
                max: AUTO_MAX_DRAFT_LEN,
            });
        }
        match s.parse::<usize>() {
            Ok(k) if (1..=MAX_DRAFT_LEN).contains(&k) => Ok(DraftLen::Fixed(k)),
            _ => Err(format!(
                "expected `auto` or a number of tokens from 1 to {MAX_DRAFT_LEN}, got `{s}`"
            )),
        }
    }
}

/// How a sampled draft token is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptRule {
    /// min(1, p/q), residual resampling: the full model's distribution.
    SpeculativeSampling,
    /// Every drafted token kept. Wrong on purpose: the output follows the
    /// draft. It exists so the distribution test shows it can fail.
    AcceptAll,
}

#[derive(Debug, Clone, Copy)]
pub struct SpecOptions {
    pub max_new_tokens: usize,
    pub draft_len: DraftLen,
    pub stop_at_eos: bool,
    pub run: RunOptions,
    /// 0 = greedy.
    pub temperature: f64,
    pub seed: u64,
    pub accept: AcceptRule,
}

impl SpecOptions {
    /// Greedy, a fixed draft of `k`, not stopping at EOS.
    pub fn greedy(max_new_tokens: usize, k: usize, run: RunOptions) -> Self {
        Self {
            max_new_tokens,
            draft_len: DraftLen::Fixed(k),
            stop_at_eos: false,
            run,
            temperature: 0.0,
            seed: 0,
            accept: AcceptRule::SpeculativeSampling,
        }
    }
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
    /// Tokens drafted per verify (k, or its mean with `--draft-len auto`).
    pub mean_draft_len: f64,
    pub prefill_seconds: f64,
    /// Drafting and verifying, after the prefill.
    pub decode_seconds: f64,
    pub draft_seconds: f64,
    pub verify_seconds: f64,
    /// New tokens after the first (which the prefill gives) per second.
    pub decode_tokens_per_sec: f64,
}

/// Speculative generation after `prompt`.
pub fn speculate(
    model: &Model,
    prompt: &[u32],
    drafter: Drafter,
    opts: SpecOptions,
) -> Result<SpecReport> {
    speculate_with(model, prompt, drafter, opts, |_, _| Ok(()))
}

/// A draft: its tokens and, for a sampled self-draft, the distribution
/// each was drawn from (`None`: a point mass, q(d) = 1).
struct Draft {
    tokens: Vec<u32>,
    q: Option<Vec<Vec<f32>>>,
}

/// Where a token of a speculative run came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenOrigin {
    /// Drafted and accepted by the verifier.
    Draft,
    /// The full model's own token (after the prefill, or after a verify).
    Verifier,
}

/// Speculative generation after `prompt`, calling `on_token` with each new
/// id, and where it came from, as it is accepted.
pub fn speculate_with(
    model: &Model,
    prompt: &[u32],
    drafter: Drafter,
    opts: SpecOptions,
    mut on_token: impl FnMut(u32, TokenOrigin) -> Result<()>,
) -> Result<SpecReport> {
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    opts.draft_len.validate()?;
    if let Drafter::SelfPlan(plan) | Drafter::Policy { plan, .. } | Drafter::Probed { plan, .. } =
        drafter
    {
        model.check_plan(plan)?;
    }
    let k_max = opts.draft_len.max();
    let max = model.transformer.max_positions();
    let needed = prompt.len() + opts.max_new_tokens + k_max + 1;
    if needed > max {
        bail!(
            "prompt ({}) plus {} new tokens and a draft of {k_max} exceeds the model's {max} positions",
            prompt.len(),
            opts.max_new_tokens,
        );
    }
    let full = Plan::base();
    let eos = &model.cfg().eos_token_ids;
    let mut sampler = Sampler::new(opts.seed, opts.temperature);
    let mut state = model.transformer.new_state(needed);

    let t0 = Instant::now();
    let logits = rows_logits(
        model,
        prompt,
        (&full, None, None),
        opts.run.for_prefill(prompt.len()),
        &mut state,
        true,
    )?;
    let mut next = sampler.sample(&logits.squeeze(0)?)?;
    let prefill_seconds = t0.elapsed().as_secs_f64();

    let mut history: Vec<u32> = prompt.to_vec();
    let mut out = Vec::new();
    let (mut verifies, mut drafted, mut accepted) = (0, 0, 0);
    let (mut draft_seconds, mut verify_seconds) = (0.0, 0.0);
    let mut gamma = AUTO_GAMMA_START;
    let t1 = Instant::now();
    loop {
        // `next` is the full model's token, not yet in the cache.
        out.push(next);
        history.push(next);
        on_token(next, TokenOrigin::Verifier)?;
        if out.len() >= opts.max_new_tokens || (opts.stop_at_eos && eos.contains(&next)) {
            break;
        }
        let pos = state.next_position();
        let budget = k_max.min(opts.max_new_tokens - out.len());
        let td = Instant::now();
        let draft = match drafter {
            Drafter::SelfPlan(plan)
            | Drafter::Policy { plan, .. }
            | Drafter::Probed { plan, .. } => {
                let stop_below = matches!(opts.draft_len, DraftLen::Auto { .. }).then_some(gamma);
                let (policy, probes) = match drafter {
                    Drafter::Policy { policy, .. } => (Some(policy), None),
                    Drafter::Probed { probes, .. } => (None, Some(probes)),
                    _ => (None, None),
                };
                let d = draft_with_plan(
                    model,
                    next,
                    (plan, policy, probes),
                    budget,
                    stop_below,
                    opts.run,
                    &mut sampler,
                    &mut state,
                )?;
                state.truncate(pos);
                d
            }
            Drafter::PromptLookup { max_ngram } => Draft {
                tokens: prompt_lookup(&history, max_ngram, budget),
                q: None,
            },
        };
        draft_seconds += td.elapsed().as_secs_f64();
        let tv = Instant::now();
        let mut rows = vec![next];
        rows.extend_from_slice(&draft.tokens);
        let logits = rows_logits(
            model,
            &rows,
            (&full, None, None),
            opts.run,
            &mut state,
            false,
        )?;
        let (n, following) = if sampler.is_greedy() {
            accept_greedy(&draft.tokens, &logits)?
        } else {
            let p = sampler.probs(&logits)?;
            accept_sampled(&draft, &p, opts.accept, &mut sampler)?
        };
        verify_seconds += tv.elapsed().as_secs_f64();
        verifies += 1;
        drafted += draft.tokens.len();
        accepted += n;
        if !draft.tokens.is_empty() {
            gamma = if n < draft.tokens.len() {
                (gamma + AUTO_GAMMA_STEP).min(AUTO_GAMMA_MAX)
            } else {
                (gamma - AUTO_GAMMA_STEP).max(AUTO_GAMMA_MIN)
            };
        }
        // Keep `next` and the accepted draft tokens; drop the rest.
        state.truncate(pos + 1 + n as u32);
        let mut stop = false;
        for &tok in &draft.tokens[..n] {
            out.push(tok);
            history.push(tok);
            on_token(tok, TokenOrigin::Draft)?;
            if out.len() >= opts.max_new_tokens || (opts.stop_at_eos && eos.contains(&tok)) {
                stop = true;
                break;
            }
        }
        if stop {
            break;
        }
        next = following;
    }
    let decode_seconds = t1.elapsed().as_secs_f64();
    let steps = out.len().saturating_sub(1);
    let per_verify = |x: usize| {
        if verifies > 0 {
            x as f64 / verifies as f64
        } else {
            0.0
        }
    };
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
        mean_accepted: per_verify(accepted + verifies),
        mean_draft_len: per_verify(drafted),
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

/// Greedy acceptance: the drafted prefix equal to the verifier's argmax
/// choices, and the verifier's token after it.
fn accept_greedy(draft: &[u32], logits: &Tensor) -> Result<(usize, u32)> {
    let verdict: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
    let n = draft
        .iter()
        .zip(&verdict)
        .take_while(|(d, v)| d == v)
        .count();
    Ok((n, verdict[n]))
}

/// Speculative sampling over the verifier's distributions `p` (one row per
/// drafted token, plus one): how many drafted tokens are kept, and the
/// token that follows them (the residual draw or the bonus token).
fn accept_sampled(
    draft: &Draft,
    p: &[Vec<f32>],
    rule: AcceptRule,
    sampler: &mut Sampler,
) -> Result<(usize, u32)> {
    for (i, &d) in draft.tokens.iter().enumerate() {
        let pd = p[i][d as usize] as f64;
        let qd = draft.q.as_ref().map_or(1.0, |q| q[i][d as usize] as f64);
        let keep = match rule {
            AcceptRule::AcceptAll => true,
            // u < p/q, written without dividing (q(d) > 0: d was drawn from q).
            AcceptRule::SpeculativeSampling => sampler.uniform() * qd < pd,
        };
        if !keep {
            let residual: Vec<f32> = match &draft.q {
                Some(q) => p[i]
                    .iter()
                    .zip(&q[i])
                    .map(|(a, b)| (a - b).max(0.0))
                    .collect(),
                None => {
                    let mut r = p[i].clone();
                    r[d as usize] = 0.0;
                    r
                }
            };
            // All zero only when p ≤ q everywhere, i.e. p = q up to rounding.
            let tok = if residual.iter().any(|&x| x > 0.0) {
                sampler.sample_from(&residual)?
            } else {
                sampler.sample_from(&p[i])?
            };
            return Ok((i, tok));
        }
    }
    let n = draft.tokens.len();
    Ok((n, sampler.sample_from(&p[n])?))
}

/// What a pass runs under: a plan, a routed plan's router policy (or a
/// sparse plan's mask) and a source of probes (TEAL/WINA).
type DraftPass<'a> = (
    &'a Plan,
    Option<&'a dyn LayerPolicy>,
    Option<&'a dyn ProbeSource>,
);

/// Runs `ids` after what `state` holds under `plan`: the logits after each
/// row, (rows, vocab) (`last_only`: after the last row only, (1, vocab)).
fn rows_logits(
    model: &Model,
    ids: &[u32],
    (plan, policy, probes): DraftPass,
    run: RunOptions,
    state: &mut SeqState,
    last_only: bool,
) -> Result<Tensor> {
    let t = &model.transformer;
    let input = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    let mut probe = probes.map(|p| p.fresh()).transpose()?;
    let mut pass = Pass::plan(plan, run).with_state(state);
    if let Some(policy) = policy {
        pass = pass.with_policy(policy);
    }
    if let Some(p) = probe.as_mut() {
        pass = pass.with_probe(&mut **p);
    }
    let mut h = t.forward_hidden(&input, &mut pass)?.squeeze(0)?;
    if last_only {
        h = h.narrow(0, ids.len() - 1, 1)?;
    }
    Ok(t.logits(&h, run)?)
}

/// Up to `k` tokens of the model under `plan`, starting by feeding
/// `first`: greedy, or drawn from the sampler's distribution. With
/// `stop_below`, drafting stops after a token drafted with probability
/// below it. Writes the draft's keys into `state` (the caller rolls back).
#[allow(clippy::too_many_arguments)]
fn draft_with_plan(
    model: &Model,
    first: u32,
    draft: DraftPass,
    k: usize,
    stop_below: Option<f64>,
    run: RunOptions,
    sampler: &mut Sampler,
    state: &mut SeqState,
) -> Result<Draft> {
    let mut tokens = Vec::with_capacity(k);
    let mut qs = Vec::new();
    let mut cur = first;
    for _ in 0..k {
        let logits = rows_logits(model, &[cur], draft, run, state, true)?;
        let (tok, prob) = if sampler.is_greedy() {
            let tok = logits.squeeze(0)?.argmax(D::Minus1)?.to_scalar::<u32>()?;
            let prob = match stop_below {
                Some(_) => sampler.probs(&logits)?[0][tok as usize] as f64,
                None => 1.0,
            };
            (tok, prob)
        } else {
            let q = sampler.probs(&logits)?.remove(0);
            let tok = sampler.sample_from(&q)?;
            let prob = q[tok as usize] as f64;
            qs.push(q);
            (tok, prob)
        };
        tokens.push(tok);
        cur = tok;
        if stop_below.is_some_and(|g| prob < g) {
            break;
        }
    }
    let q = (!sampler.is_greedy()).then_some(qs);
    Ok(Draft { tokens, q })
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
    fn draft_lengths_parse_and_bad_ones_are_named() {
        assert_eq!("4".parse::<DraftLen>(), Ok(DraftLen::Fixed(4)));
        assert_eq!(
            "auto".parse::<DraftLen>(),
            Ok(DraftLen::Auto {
                max: AUTO_MAX_DRAFT_LEN
            })
        );
        for bad in ["0", "17", "-1", "four"] {
            let err = bad.parse::<DraftLen>().unwrap_err();
            assert!(err.contains("from 1 to 16"), "{bad}: {err}");
        }
        assert!(DraftLen::Fixed(0).validate().is_err());
        assert!(DraftLen::Auto { max: 16 }.validate().is_ok());
    }

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
