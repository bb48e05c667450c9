//! `scalpel speculate`: plain greedy decoding, self-speculative decoding
//! with the plan as the draft, and prompt lookup, interleaved on the same
//! prompts, with the output checked token for token against plain decoding.

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::cli::{self, SpeculateArgs};
use crate::eval::bench::Stat;
use crate::eval::generate::{self, GenOptions};
use crate::eval::speculative::{self, Drafter, SpecOptions, SpecReport};
use crate::model::Model;
use crate::plan::Plan;
use crate::progress;

/// What one prompt measured (medians over the runs).
#[derive(Debug, Serialize)]
struct PromptResult {
    prompt_tokens: usize,
    identical: bool,
    prompt_lookup_identical: bool,
    /// Index of the first token that differs from plain decoding.
    first_mismatch: Option<usize>,
    acceptance_rate: f64,
    mean_accepted: f64,
    /// Time of one draft step over one plain decode step.
    draft_cost_ratio: f64,
    /// Time of one verify pass (draft_len + 1 rows) over one plain decode step.
    verify_cost_ratio: f64,
    plain_tokens_per_sec: Stat,
    speculative_tokens_per_sec: Stat,
    prompt_lookup_tokens_per_sec: Stat,
    prompt_lookup_mean_accepted: f64,
}

pub fn run(margs: &cli::ModelArgs, pargs: &cli::PlanArgs, args: SpeculateArgs) -> Result<()> {
    if args.draft_len == 0 || args.draft_len > 16 {
        bail!(
            "--draft-len must be between 1 and 16 (got {})",
            args.draft_len
        );
    }
    if args.runs == 0 || args.max_tokens == 0 {
        bail!("--runs and -n must be at least 1");
    }
    let texts: Vec<String> = match (&args.prompt, &args.prompts) {
        (Some(p), None) => vec![p.clone()],
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        _ => bail!("give --prompt TEXT or --prompts FILE"),
    };
    if texts.is_empty() {
        bail!("the prompt file has no prompts");
    }
    let longest = texts.iter().map(String::len).max().unwrap_or(0);
    // Bytes bound tokens; the draft and the verifier each hold a sequence.
    let context = longest + args.max_tokens + args.draft_len + 64;
    let model = cli::load_model_for(margs, args.weights.load_options(context, 2))?;
    let (plan, _) = cli::load_plan(pargs, &model)?;
    if plan.skip.is_empty() {
        eprintln!("scalpel: note: the plan skips nothing, so the draft is the full model");
    }
    let n_blocks = 2 * model.n_layers();
    if plan.skip.len() == n_blocks {
        eprintln!("scalpel: note: the plan skips every block; the draft is the embeddings alone");
    }
    let run = args.weights.run_options(&model, true)?;
    let prompts = texts
        .iter()
        .map(|t| super::generate::prompt_ids(&model, t, args.chat))
        .collect::<Result<Vec<_>>>()?;

    let pb = progress::bar(prompts.len() * args.runs, "runs");
    let mut results = Vec::new();
    let mut last_tokens = Vec::new();
    for prompt in &prompts {
        let r = measure_prompt(&model, prompt, &plan, run, &args, || pb.inc(1))?;
        last_tokens = r.1;
        results.push(r.0);
    }
    pb.finish_and_clear();
    let last_text = model.codec()?.decode(&last_tokens)?;
    let summary = summarize(&results);
    if args.json {
        let mut v = serde_json::to_value(&summary)?;
        v["prompts"] = serde_json::to_value(&results)?;
        v["plan"] = plan.describe().into();
        v["draft_len"] = args.draft_len.into();
        v["weights"] = generate::weights_used(run, 1, "f32").into();
        if results.len() == 1 {
            v["new_tokens"] = serde_json::to_value(&last_tokens)?;
            v["text"] = last_text.into();
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "model {} | plan {} | draft {} | {} prompts × {} runs, greedy, weights {} (executed)",
        model.identity.name,
        plan.describe(),
        args.draft_len,
        results.len(),
        args.runs,
        generate::weights_used(run, 1, "f32")
    );
    println!("| method | decode tok/s (median of prompts) | speed-up | α | τ | identical |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| plain | {:.1} | 1.000× | | | |",
        summary.plain_tokens_per_sec
    );
    println!(
        "| self-speculative | {:.1} | {:.3}× | {:.3} | {:.2} | {}/{} |",
        summary.speculative_tokens_per_sec,
        summary.speedup,
        summary.acceptance_rate,
        summary.mean_accepted,
        results.iter().filter(|r| r.identical).count(),
        results.len()
    );
    println!(
        "| prompt lookup | {:.1} | {:.3}× | | {:.2} | {}/{} |",
        summary.prompt_lookup_tokens_per_sec,
        summary.prompt_lookup_tokens_per_sec / summary.plain_tokens_per_sec,
        summary.prompt_lookup_mean_accepted,
        results.iter().filter(|r| r.prompt_lookup_identical).count(),
        results.len()
    );
    println!(
        "draft step / decode step c = {:.3}; verify of {} rows / decode step = {:.3}",
        summary.draft_cost_ratio,
        args.draft_len + 1,
        summary.verify_cost_ratio
    );
    if summary.mismatches > 0 {
        println!(
            "{} prompt(s) differ from plain greedy decoding: with quantized weights the k + 1-row \
             verify does not compute a row exactly as a one-row decode step does (see --json \
             `first_mismatch`; --weights f32 gives identical output)",
            summary.mismatches
        );
    }
    Ok(())
}

fn measure_prompt(
    model: &Model,
    prompt: &[u32],
    plan: &Plan,
    run: crate::model::RunOptions,
    args: &SpeculateArgs,
    mut tick: impl FnMut(),
) -> Result<(PromptResult, Vec<u32>)> {
    let gen = GenOptions {
        max_new_tokens: args.max_tokens,
        temperature: 0.0,
        seed: 0,
        stop_at_eos: !args.ignore_eos,
        run,
    };
    let spec = SpecOptions {
        max_new_tokens: args.max_tokens,
        draft_len: args.draft_len,
        stop_at_eos: !args.ignore_eos,
        run,
    };
    let (mut plain, mut selfspec, mut lookup) = (vec![], vec![], vec![]);
    let mut reference = Vec::new();
    let (mut s_last, mut l_last): (Option<SpecReport>, Option<SpecReport>) = (None, None);
    let mut plain_step = vec![];
    for _ in 0..args.runs {
        let p = generate::generate(model, prompt, &Plan::base(), gen, |_| Ok(()))?;
        plain.push(p.decode_tokens_per_sec);
        plain_step.push(1.0 / p.decode_tokens_per_sec.max(1e-9));
        reference = p.new_tokens;
        let s = speculative::speculate(model, prompt, Drafter::SelfPlan(plan), spec)?;
        selfspec.push(s.decode_tokens_per_sec);
        s_last = Some(s);
        let l = speculative::speculate(
            model,
            prompt,
            Drafter::PromptLookup {
                max_ngram: args.ngram,
            },
            spec,
        )?;
        lookup.push(l.decode_tokens_per_sec);
        l_last = Some(l);
        tick();
    }
    let (s, l) = (s_last.unwrap(), l_last.unwrap());
    let step = Stat::from(plain_step).median;
    let first_mismatch = reference
        .iter()
        .zip(&s.new_tokens)
        .position(|(a, b)| a != b)
        .or((reference.len() != s.new_tokens.len())
            .then(|| reference.len().min(s.new_tokens.len())));
    let draft_steps = s.drafted.max(1) as f64;
    let result = PromptResult {
        prompt_tokens: prompt.len(),
        identical: first_mismatch.is_none(),
        prompt_lookup_identical: l.new_tokens == reference,
        first_mismatch,
        acceptance_rate: s.acceptance_rate,
        mean_accepted: s.mean_accepted,
        draft_cost_ratio: s.draft_seconds / draft_steps / step,
        verify_cost_ratio: s.verify_seconds / s.verifies.max(1) as f64 / step,
        plain_tokens_per_sec: Stat::from(plain),
        speculative_tokens_per_sec: Stat::from(selfspec),
        prompt_lookup_tokens_per_sec: Stat::from(lookup),
        prompt_lookup_mean_accepted: l.mean_accepted,
    };
    Ok((result, s.new_tokens))
}

/// Over all prompts: medians of the per-prompt medians and ratios.
#[derive(Debug, Serialize)]
struct Summary {
    identical: bool,
    mismatches: usize,
    acceptance_rate: f64,
    mean_accepted: f64,
    draft_cost_ratio: f64,
    verify_cost_ratio: f64,
    plain_tokens_per_sec: f64,
    speculative_tokens_per_sec: f64,
    speedup: f64,
    prompt_lookup_tokens_per_sec: f64,
    prompt_lookup_mean_accepted: f64,
}

fn summarize(results: &[PromptResult]) -> Summary {
    let median =
        |f: &dyn Fn(&PromptResult) -> f64| Stat::from(results.iter().map(f).collect()).median;
    let plain = median(&|r| r.plain_tokens_per_sec.median);
    let spec = median(&|r| r.speculative_tokens_per_sec.median);
    let mismatches = results.iter().filter(|r| !r.identical).count();
    Summary {
        identical: mismatches == 0,
        mismatches,
        acceptance_rate: median(&|r| r.acceptance_rate),
        mean_accepted: median(&|r| r.mean_accepted),
        draft_cost_ratio: median(&|r| r.draft_cost_ratio),
        verify_cost_ratio: median(&|r| r.verify_cost_ratio),
        plain_tokens_per_sec: plain,
        speculative_tokens_per_sec: spec,
        speedup: median(&|r| r.speculative_tokens_per_sec.median / r.plain_tokens_per_sec.median),
        prompt_lookup_tokens_per_sec: median(&|r| r.prompt_lookup_tokens_per_sec.median),
        prompt_lookup_mean_accepted: median(&|r| r.prompt_lookup_mean_accepted),
    }
}
