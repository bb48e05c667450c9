//! One prompt through a plan, streamed as the text so far.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, Result};

use super::Setup;
use crate::eval::generate::{generate, GenOptions, GenReport};
use crate::model::Model;
use crate::plan::Plan;

/// The prompt as the model expects it: chat-templated when it has a template.
pub fn prompt_ids(model: &Model, prompt: &str) -> Result<Vec<u32>> {
    let codec = model.codec()?;
    let text = codec
        .chat_prompt(prompt)
        .unwrap_or_else(|_| prompt.to_string());
    let mut ids = codec.encode_with_specials(&text)?;
    if model.cfg().add_bos && codec.chat_prompt(prompt).is_err() {
        if let Some(bos) = model.cfg().bos_token_id {
            ids.insert(0, bos);
        }
    }
    Ok(ids)
}

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
