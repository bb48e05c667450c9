//! `scalpel generate`: stream text under a plan, then report tokens/sec.

use std::io::Write;

use anyhow::Result;

use crate::cli::{self, GenerateArgs};
use crate::eval::generate;

/// A prompt's ids: the chat template around it, or BOS first where the
/// model's metadata says so.
pub fn prompt_ids(model: &crate::model::Model, text: &str, chat: bool) -> Result<Vec<u32>> {
    let codec = model.codec()?;
    let text = if chat {
        codec.chat_prompt(text)?
    } else {
        text.to_string()
    };
    let mut ids = codec.encode_with_specials(&text)?;
    if model.cfg().add_bos && !chat {
        if let Some(bos) = model.cfg().bos_token_id {
            ids.insert(0, bos);
        }
    }
    Ok(ids)
}

pub fn run(margs: &cli::ModelArgs, pargs: &cli::PlanArgs, args: GenerateArgs) -> Result<()> {
    // The prompt's length in bytes bounds its tokens (before the tokenizer is loaded).
    let context = args.prompt.len() + args.max_tokens + 64;
    let model = cli::load_model_for(margs, args.weights.load_options(context, 1))?;
    let (plan, _) = cli::load_plan(pargs, &model)?;
    let codec = model.codec()?;
    let prompt = prompt_ids(&model, &args.prompt, args.chat)?;
    let run = args.weights.run_options(&model, true)?;
    let opts = generate::GenOptions {
        max_new_tokens: args.max_tokens,
        temperature: args.temp,
        seed: args.seed,
        stop_at_eos: !args.ignore_eos,
        run,
    };
    // Stream: decode the growing sequence and print what is new, so
    // multi-byte characters split across tokens come out whole.
    let mut ids = Vec::new();
    let mut printed = 0;
    let mut out = std::io::stdout();
    if !args.json {
        print!("{}", args.prompt);
        out.flush()?;
    }
    let report = generate::generate(&model, &prompt, &plan, opts, |tok| {
        ids.push(tok);
        if !args.json {
            let text = codec.decode(&ids)?;
            if text.len() > printed && text.is_char_boundary(printed) {
                print!("{}", &text[printed..]);
                out.flush()?;
                printed = text.len();
            }
        }
        Ok(())
    })?;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["text"] = codec.decode(&report.new_tokens)?.into();
        v["plan"] = plan.describe().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!();
        eprintln!(
            "prefill {:.1} tok/s ({} tokens), decode {:.1} tok/s ({} tokens), weights {}, plan {}",
            report.prefill_tokens_per_sec,
            report.prompt_tokens,
            report.decode_tokens_per_sec,
            report.new_tokens.len(),
            generate::weights_used(run, report.prompt_tokens, "f32"),
            plan.describe()
        );
    }
    Ok(())
}
