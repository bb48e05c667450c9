//! One prompt through a plan, streamed as the text so far.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, Result};

use super::Setup;
use crate::eval::generate::{generate, GenOptions, GenReport};
use crate::eval::speculative::{
    speculate_with, AcceptRule, DraftLen, Drafter, SpecOptions, SpecReport, TokenOrigin,
};
use crate::model::Model;
use crate::plan::Plan;

/// Greedy generation; `on_text` gets the whole decoded continuation after each token.
pub fn stream(
    model: &Model,
    setup: &Setup,
    prompt: &[u32],
    plan: &Plan,
    cancel: &AtomicBool,
    mut on_text: impl FnMut(String),
) -> Result<GenReport> {
    let codec = model.codec()?;
    let opts = GenOptions {
        max_new_tokens: setup.max_new_tokens,
        temperature: 0.0,
        seed: 0,
        stop_at_eos: true,
        run: setup.gen_run,
    };
    let mut ids = Vec::new();
    generate(model, prompt, plan, opts, |tok| {
        if cancel.load(Ordering::Relaxed) {
            return Err(anyhow!("cancelled"));
        }
        ids.push(tok);
        on_text(codec.decode(&ids)?);
        Ok(())
    })
}

/// Greedy self-speculative generation with `plan` as the draft; `on_pieces`
/// gets the continuation so far as text pieces, one per token, each marked
/// `true` when the draft proposed it (and the full model accepted it).
pub fn stream_draft(
    model: &Model,
    setup: &Setup,
    prompt: &[u32],
    plan: &Plan,
    cancel: &AtomicBool,
    mut on_pieces: impl FnMut(Vec<(String, bool)>),
) -> Result<SpecReport> {
    let codec = model.codec()?;
    let opts = SpecOptions {
        max_new_tokens: setup.max_new_tokens,
        draft_len: DraftLen::Fixed(DRAFT_LEN),
        stop_at_eos: true,
        run: setup.gen_run,
        temperature: 0.0,
        seed: 0,
        accept: AcceptRule::SpeculativeSampling,
    };
    let mut ids = Vec::new();
    let mut pieces: Vec<(String, bool)> = Vec::new();
    let mut shown = String::new();
    speculate_with(
        model,
        prompt,
        Drafter::SelfPlan(plan),
        opts,
        |tok, origin| {
            if cancel.load(Ordering::Relaxed) {
                return Err(anyhow!("cancelled"));
            }
            ids.push(tok);
            let text = codec.decode(&ids)?;
            // A token that completes a multi-byte character changes the text
            // before it; its piece is then what differs from the shown text.
            let common = shown
                .char_indices()
                .zip(text.chars())
                .find(|((_, a), b)| a != b)
                .map_or(shown.len().min(text.len()), |((i, _), _)| i);
            while pieces.iter().map(|(p, _)| p.len()).sum::<usize>() > common {
                pieces.pop();
            }
            let kept: usize = pieces.iter().map(|(p, _)| p.len()).sum();
            pieces.push((text[kept..].to_string(), origin == TokenOrigin::Draft));
            shown = text;
            on_pieces(pieces.clone());
            Ok(())
        },
    )
}

/// Tokens drafted per verify in the workbench (`speculate`'s default).
pub const DRAFT_LEN: usize = 4;
