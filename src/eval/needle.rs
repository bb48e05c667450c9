//! Retrieval under a KV budget: a passkey (a random 5-digit number) hidden
//! at a chosen depth of filler text (the built-in evaluation text,
//! repeated), then the question; the model answers greedily with the
//! policy acting between prefill chunks and on every decode step, as in
//! serving. A trial passes when the answer contains the key. The full
//! cache runs every trial first: it is what each policy is compared with.
//! Under a plan (skips, scales, replaced or healed layers) the unpruned
//! model runs first too, so the grid shows what the plan costs in
//! retrieval as well as what each policy costs on top of it.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, D};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::model::kv::{KvPolicy, KvSpec};
use crate::model::{Model, Pass, RunOptions};
use crate::plan::Plan;

const INTRO: &str = "There is a pass key hidden inside a lot of irrelevant text. Find it and \
                     memorize it. I will quiz you about the pass key.\n\n";
const QUESTION: &str = "\n\nWhat is the pass key?";
/// Put after the chat template's assistant turn, so the answer starts with
/// the digits (a small model otherwise often restates the question).
const ANSWER_PREFIX: &str = "The pass key is";
/// Digits of the key plus room for spaces and punctuation.
const ANSWER_TOKENS: usize = 12;

#[derive(Debug, Clone)]
pub struct NeedleOptions {
    pub contexts: Vec<usize>,
    /// Where the key sits in the filler, 0 = start, 1 = end.
    pub depths: Vec<f64>,
    pub trials: usize,
    pub chunk: usize,
    pub seed: u64,
    pub run: RunOptions,
}

#[derive(Debug, Clone, Serialize)]
pub struct NeedleCell {
    pub policy: String,
    pub context: usize,
    pub depth: f64,
    pub found: usize,
    pub trials: usize,
    /// The first wrong answer (what a failure looks like), or the first
    /// answer when every trial found the key.
    pub example_answer: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct NeedleReport {
    /// `full` first, then the policies in the order given; under a plan
    /// `base` (the unpruned model), `plan` (its full cache), then
    /// `plan+POLICY` for each policy.
    pub policies: Vec<String>,
    pub cells: Vec<NeedleCell>,
    pub seconds: f64,
}

impl NeedleReport {
    /// Trials found by `policy` over every context and depth.
    pub fn found(&self, policy: &str) -> (usize, usize) {
        self.cells
            .iter()
            .filter(|c| c.policy == policy)
            .fold((0, 0), |(f, n), c| (f + c.found, n + c.trials))
    }
}

/// The pieces of a passkey prompt around the filler, as token ids.
struct PromptParts {
    head: Vec<u32>,
    needle: Vec<u32>,
    tail: Vec<u32>,
}

fn prompt_parts(model: &Model, key: u32) -> Result<PromptParts> {
    let codec = model.codec()?;
    let needle = format!("\nThe pass key is {key}. Remember it. {key} is the pass key.\n");
    const FILL: &str = "\u{1}FILLER\u{1}";
    let user = format!("{INTRO}{FILL}{QUESTION}");
    let rendered = match codec.chat_prompt(&user) {
        Ok(r) => r,
        Err(_) => user.clone(), // a base model: the plain text
    };
    let (before, after) = rendered
        .split_once(FILL)
        .context("the chat template dropped the prompt's text")?;
    let mut head = Vec::new();
    let cfg = model.cfg();
    if let (true, Some(bos)) = (cfg.add_bos, cfg.bos_token_id) {
        head.push(bos);
    }
    head.extend(codec.encode_with_specials(before)?);
    let mut tail = codec.encode_with_specials(after)?;
    tail.extend(codec.encode(ANSWER_PREFIX)?);
    Ok(PromptParts {
        head,
        needle: codec.encode(&needle)?,
        tail,
    })
}

/// A prompt of exactly `context` tokens with the key's sentence at `depth`
/// of the filler.
fn build_prompt(
    parts: &PromptParts,
    filler: &[u32],
    context: usize,
    depth: f64,
) -> Result<Vec<u32>> {
    let fixed = parts.head.len() + parts.needle.len() + parts.tail.len();
    if context <= fixed + 16 {
        bail!("--context {context} leaves no room for filler: the question alone takes {fixed} tokens");
    }
    let fill = context - fixed;
    let before = ((fill as f64) * depth).round() as usize;
    let take = |from: usize, n: usize| filler.iter().cycle().skip(from).take(n).copied();
    let mut ids = parts.head.clone();
    ids.extend(take(0, before));
    ids.extend(&parts.needle);
    ids.extend(take(before, fill - before));
    ids.extend(&parts.tail);
    debug_assert_eq!(ids.len(), context);
    Ok(ids)
}

/// One column of the grid: a plan and a KV policy, and its label.
struct Column<'a> {
    label: String,
    plan: &'a Plan,
    spec: KvSpec,
}

/// The grid's columns: the full cache, then each policy; under a plan that
/// is not the base model's, the unpruned model first and the plan's labels
/// prefixed (`plan`, `plan+quest:64`).
fn columns<'a>(plan: &'a Plan, base: &'a Plan, specs: &[KvSpec]) -> Vec<Column<'a>> {
    let mut all = vec![KvSpec::Full];
    all.extend(specs.iter().filter(|s| **s != KvSpec::Full).cloned());
    let pruned = plan != base;
    let mut cols = Vec::new();
    if pruned {
        cols.push(Column {
            label: "base".into(),
            plan: base,
            spec: KvSpec::Full,
        });
    }
    for spec in all {
        let label = match (pruned, &spec) {
            (false, s) => s.to_string(),
            (true, KvSpec::Full) => "plan".into(),
            (true, s) => format!("plan+{s}"),
        };
        cols.push(Column { label, plan, spec });
    }
    cols
}

/// The greedy answer under `plan` and `spec`: chunked prefill, then decode
/// steps, the policy acting after every pass.
fn answer(
    model: &Model,
    plan: &Plan,
    spec: &KvSpec,
    prompt: &[u32],
    chunk: usize,
    run: RunOptions,
) -> Result<Vec<u32>> {
    let t = &model.transformer;
    let mut state = t.new_state(prompt.len() + ANSWER_TOKENS + chunk);
    let mut policy = KvPolicy::new(spec.clone(), model.cfg())?;
    let mut last = None;
    let step =
        |ids: &[u32], state: &mut crate::model::SeqState, policy: &mut KvPolicy| -> Result<u32> {
            policy.begin_pass(ids.len());
            let input = Tensor::new(ids, model.device())?.unsqueeze(0)?;
            let mut pass = Pass::plan(plan, run.for_prefill(ids.len()))
                .with_state(state)
                .with_probe(policy);
            let h = t.forward_hidden(&input, &mut pass)?;
            policy.end_pass(state)?;
            let h = h.narrow(1, ids.len() - 1, 1)?.squeeze(1)?;
            Ok(t.logits(&h, run)?
                .argmax(D::Minus1)?
                .squeeze(0)?
                .to_scalar()?)
        };
    for c in prompt.chunks(chunk) {
        last = Some(step(c, &mut state, &mut policy)?);
    }
    let mut next = last.context("empty prompt")?;
    let eos = model.cfg().eos_token_ids.clone();
    let mut out = vec![next];
    while out.len() < ANSWER_TOKENS && !eos.contains(&next) {
        next = step(&[next], &mut state, &mut policy)?;
        out.push(next);
    }
    Ok(out)
}

/// Runs the grid: for every context, depth and trial, the full cache and
/// each policy answer the same prompt (the same key), under `plan` (and,
/// when it prunes anything, the unpruned model first).
pub fn needle_grid(
    model: &Model,
    plan: &Plan,
    specs: &[KvSpec],
    opts: &NeedleOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<NeedleReport> {
    if opts.trials == 0 || opts.contexts.is_empty() || opts.depths.is_empty() || opts.chunk == 0 {
        bail!("give at least one context, one depth, one trial and a chunk of at least 1 token");
    }
    if let Some(d) = opts.depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
        bail!("depth {d} is outside [0, 1] (0 = the start of the text, 1 = its end)");
    }
    let max = model.transformer.max_positions();
    if let Some(c) = opts.contexts.iter().find(|&&c| c + ANSWER_TOKENS > max) {
        bail!("--context {c} plus the answer exceeds the model's {max} positions");
    }
    model.check_plan(plan)?;
    let base = Plan::base();
    let all = columns(plan, &base, specs);
    for c in &all {
        KvPolicy::new(c.spec.clone(), model.cfg())?;
    }
    let codec = model.codec()?;
    let filler = codec.encode(super::data::DEFAULT_EVAL_TEXT)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let start = Instant::now();
    let total = opts.contexts.len() * opts.depths.len() * opts.trials * all.len();
    let mut done = 0;
    let mut cells = Vec::new();
    for &context in &opts.contexts {
        for &depth in &opts.depths {
            let mut row: Vec<NeedleCell> = all
                .iter()
                .map(|c| NeedleCell {
                    policy: c.label.clone(),
                    context,
                    depth,
                    found: 0,
                    trials: opts.trials,
                    example_answer: String::new(),
                })
                .collect();
            for trial in 0..opts.trials {
                let key: u32 = rng.random_range(10_000..100_000);
                let parts = prompt_parts(model, key)?;
                let prompt = build_prompt(&parts, &filler, context, depth)?;
                for (col, cell) in all.iter().zip(&mut row) {
                    let ids = answer(model, col.plan, &col.spec, &prompt, opts.chunk, opts.run)?;
                    let text = codec.decode(&ids)?;
                    let found = text.contains(&key.to_string());
                    let first_miss = !found && cell.found == trial;
                    if trial == 0 || first_miss {
                        cell.example_answer = text.trim().to_string();
                    }
                    cell.found += usize::from(found);
                    done += 1;
                    progress(done, total);
                }
            }
            cells.extend(row);
        }
    }
    Ok(NeedleReport {
        policies: all.into_iter().map(|c| c.label).collect(),
        cells,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts() -> PromptParts {
        PromptParts {
            head: vec![1, 2],
            needle: vec![7, 7, 7],
            tail: vec![9],
        }
    }

    #[test]
    fn the_prompt_has_the_context_length_and_the_key_at_its_depth() {
        let filler: Vec<u32> = (100..150).collect();
        for (depth, before) in [(0.0, 0), (0.5, 37), (1.0, 74)] {
            let ids = build_prompt(&parts(), &filler, 80, depth).unwrap();
            assert_eq!(ids.len(), 80);
            assert_eq!(&ids[..2], &[1, 2]);
            assert_eq!(&ids[2 + before..5 + before], &[7, 7, 7], "depth {depth}");
            assert_eq!(ids[79], 9);
            // Before the key the filler from its start; after it, the filler
            // from where it was cut, wrapping round past its end.
            if before > 0 {
                assert_eq!(ids[2], 100);
            }
            if before < 74 {
                assert_eq!(ids[5 + before], 100 + (before % 50) as u32);
                assert_eq!(ids[78], 100 + (73 % 50) as u32);
            }
        }
    }

    #[test]
    fn a_context_with_no_room_for_filler_is_refused() {
        let err = build_prompt(&parts(), &[5], 20, 0.5)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no room for filler"), "{err}");
    }
}
