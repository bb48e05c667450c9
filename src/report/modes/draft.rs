//! Plans as drafts of lossless (greedy) self-speculative decoding,
//! `speculate`'s loop against plain decoding, interleaved per run.

use anyhow::Result;

use crate::eval::bench::{ratio, Stat};
use crate::eval::generate::{self, GenOptions};
use crate::eval::prompt_sets;
use crate::eval::speculative::{self, Drafter, SpecOptions};
use crate::model::{Model, RunOptions};
use crate::plan::Plan;
use crate::report::DraftSpeed;

/// Tokens each draft run generates, and tokens drafted per verify
/// (`speculate`'s default).
pub const DRAFT_TOKENS: usize = 32;
pub const DRAFT_LEN: usize = 4;

/// The prompts a draft is measured on: the first of each kind of the
/// built-in set, through the chat template where the model has one.
fn draft_prompts(model: &Model) -> Result<Vec<Vec<u32>>> {
    prompt_sets::builtin("all", Some(1))?
        .iter()
        .map(|p| model.prompt_ids_preferring_chat(&p.prompt))
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
