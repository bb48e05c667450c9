//! `scalpel speculate`: plain decoding, self-speculative decoding with the
//! plan as the draft, and prompt lookup, interleaved on the same prompts,
//! with greedy output checked token for token against plain decoding, and
//! a table per prompt kind (Spec-Bench's protocol: batch 1, per-kind and
//! overall speed-up, mean accepted tokens).

use anyhow::{bail, Result};
use serde::Serialize;

use crate::cli::{self, SpeculateArgs};
use crate::eval::bench::Stat;
use crate::eval::generate::{self, GenOptions};
use crate::eval::prompt_sets::{self, Prompt};
use crate::eval::speculative::{self, AcceptRule, Drafter, SpecOptions, SpecReport};
use crate::model::routing::{load_from_given, ROUTING_SECTION};
use crate::model::{LayerPolicy, Model, ProbeSource};
use crate::plan::Plan;
use crate::progress;
use crate::surgery::routing::measure::Routed;
use crate::surgery::sparsity::activation::ExecutedChannels;
use crate::surgery::sparsity::{self, MaskPolicy, SPARSITY_SECTION};

/// What one prompt measured (medians over the runs).
#[derive(Debug, Serialize)]
struct PromptResult {
    kind: String,
    prompt_tokens: usize,
    /// Greedy: the output equals plain decoding's (sampled: null, the
    /// draws differ by design; the distribution is the same).
    identical: Option<bool>,
    prompt_lookup_identical: Option<bool>,
    /// Index of the first token that differs from plain decoding.
    first_mismatch: Option<usize>,
    acceptance_rate: f64,
    mean_accepted: f64,
    /// Tokens drafted per verify (k, or its mean with `--draft-len auto`).
    mean_draft_len: f64,
    /// Time of one draft step over one plain decode step.
    draft_cost_ratio: f64,
    /// Time of one verify pass (mean_draft_len + 1 rows) over one plain decode step.
    verify_cost_ratio: f64,
    plain_tokens_per_sec: Stat,
    speculative_tokens_per_sec: Stat,
    prompt_lookup_tokens_per_sec: Stat,
    prompt_lookup_mean_accepted: f64,
}

fn read_prompts(args: &SpeculateArgs) -> Result<Vec<Prompt>> {
    Ok(match (&args.prompt, &args.prompts, &args.prompt_set) {
        (Some(p), None, None) => vec![Prompt {
            kind: "prompt".into(),
            prompt: p.clone(),
        }],
        (None, Some(path), None) => prompt_sets::from_file(path)?,
        (None, None, Some(name)) => prompt_sets::builtin(name, args.per_kind)?,
        (None, None, None) => {
            bail!("give --prompt TEXT, --prompts FILE or --prompt-set NAME (e.g. all)")
        }
        _ => bail!("give only one of --prompt, --prompts and --prompt-set"),
    })
}

pub fn run(margs: &cli::ModelArgs, pargs: &cli::PlanArgs, args: SpeculateArgs) -> Result<()> {
    if !(args.temp >= 0.0 && args.temp.is_finite()) {
        bail!("--temp must be 0 (greedy) or positive (got {})", args.temp);
    }
    if args.runs == 0 || args.max_tokens == 0 {
        bail!("--runs and -n must be at least 1");
    }
    if args.per_kind == Some(0) {
        bail!("--per-kind must be at least 1");
    }
    let texts = read_prompts(&args)?;
    // The built-in sets are measured through the chat template (Spec-Bench).
    let chat = args.chat || args.prompt_set.is_some();
    let longest = texts.iter().map(|p| p.prompt.len()).max().unwrap_or(0);
    // Bytes bound tokens; the draft and the verifier each hold a sequence.
    let context = longest + args.max_tokens + args.draft_len.max() + 64;
    let model = cli::load_model_for(margs, args.weights.load_options(context, 2))?;
    let (plan, file) =
        cli::load_plan_honouring(pargs, &model, &[ROUTING_SECTION, SPARSITY_SECTION])?;
    // A routed plan drafts with its routers deciding per token which blocks run.
    let routing = load_from_given(file.as_ref(), &model)?;
    let routed = routing.as_ref().map(|r| Routed::of(&plan, r));
    let policy = routed.as_ref().map(|r| r.policy(&model));
    // A sparse plan drafts with its head/neuron mask for each prompt.
    let sparse = sparsity::load_from_given(file.as_ref(), &model)?;
    if plan.skip.is_empty() && policy.is_none() && sparse.is_none() {
        eprintln!("scalpel: note: the plan skips nothing, so the draft is the full model");
    }
    let n_blocks = 2 * model.n_layers();
    if plan.skip.len() == n_blocks {
        eprintln!("scalpel: note: the plan skips every block; the draft is the embeddings alone");
    }
    let run = args.weights.run_options(&model, true)?;
    let prompts = texts
        .iter()
        .map(|t| model.prompt_ids(&t.prompt, chat))
        .collect::<Result<Vec<_>>>()?;

    let pb = progress::bar(prompts.len() * args.runs, "runs");
    let mut results = Vec::new();
    let mut last_tokens = Vec::new();
    // A TEAL/WINA draft: its channel probe, executed, in every draft pass.
    let channels = match &sparse {
        Some((_, sp)) => ExecutedChannels::of(&model, sp)?,
        None => None,
    };
    let mut sparse_notes = Vec::new();
    for (prompt, text) in prompts.iter().zip(&texts) {
        let mask = match &sparse {
            Some((section, sp)) => {
                let mask = sp.mask_for(&model, &plan, prompt)?;
                sparse_notes.push(sparsity::decode_note(section, mask.as_ref(), model.cfg()));
                mask
            }
            None => None,
        };
        let mask_policy = mask
            .as_ref()
            .map(|m| MaskPolicy::new(&plan, m, model.cfg()))
            .transpose()?;
        let drafter = Drafter::under(
            &plan,
            (policy.as_ref().map(|p| p as &dyn LayerPolicy))
                .or(mask_policy.as_ref().map(|p| p as &dyn LayerPolicy)),
            channels.as_ref().map(|c| c as &dyn ProbeSource),
        );
        let (r, tokens) = measure_prompt(&model, prompt, drafter, run, &args, || pb.inc(1))?;
        last_tokens = tokens;
        results.push(PromptResult {
            kind: text.kind.clone(),
            ..r
        });
    }
    pb.finish_and_clear();
    let last_text = model.codec()?.decode(&last_tokens)?;
    let summary = summarize(&results.iter().collect::<Vec<_>>());
    let kinds = per_kind(&results);
    let weights = generate::weights_used(run, 1, "f32");
    // Blocks the routed draft ran per drafted token, over all 2·layers blocks.
    let draft_executed = policy.as_ref().map(|p| p.counts.executed_fraction());
    let draft_name = match (&routing, draft_executed) {
        (Some((section, _)), Some(f)) => format!(
            "{} + routers on {:?} blocks (capacity {}; the draft ran {:.1}% of the blocks per drafted token)",
            plan.describe(),
            section.on,
            section.capacity,
            100.0 * f
        ),
        _ => match sparse_notes.first() {
            // Shadow/oracle masks differ per prompt: the first one's.
            Some(note) if sparse_notes.iter().all(|n| n == note) => {
                format!("{} + {note}", plan.describe())
            }
            Some(note) => format!("{} + {note} (first prompt's mask)", plan.describe()),
            None => plan.describe(),
        },
    };
    if args.json {
        let mut v = serde_json::to_value(&summary)?;
        let mut by_kind = serde_json::Map::new();
        for (kind, s) in &kinds {
            by_kind.insert(kind.clone(), serde_json::to_value(s)?);
        }
        v["kinds"] = by_kind.into();
        v["prompts"] = serde_json::to_value(&results)?;
        v["plan"] = plan.describe().into();
        if !sparse_notes.is_empty() {
            v["draft_sparsity"] = serde_json::to_value(&sparse_notes)?;
        }
        if let (Some(f), Some((section, _))) = (draft_executed, &routing) {
            v["draft_executed_fraction"] = f.into();
            v["routing"] = serde_json::to_value(section)?;
        }
        v["draft_len"] = args.draft_len.describe().into();
        v["temperature"] = args.temp.into();
        v["weights"] = weights.into();
        if results.len() == 1 {
            v["new_tokens"] = serde_json::to_value(&last_tokens)?;
            v["text"] = last_text.into();
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "model {} | plan {} | draft {} | {} prompts × {} runs, {}, weights {weights} (executed)",
        model.identity.name,
        draft_name,
        args.draft_len.describe(),
        results.len(),
        args.runs,
        if args.temp > 0.0 {
            format!("sampled at temperature {}", args.temp)
        } else {
            "greedy".into()
        },
    );
    println!(
        "| kind | prompts | plain tok/s | self-speculative tok/s | prompt lookup tok/s | α | τ | k | c | verify/step | identical |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rows: Vec<(&str, &Summary)> = kinds.iter().map(|(k, s)| (k.as_str(), s)).collect();
    if kinds.len() > 1 {
        rows.push(("overall", &summary));
    }
    for (kind, s) in rows {
        println!(
            "| {kind} | {} | {:.1} | {:.1} ({:.3}×) | {:.1} ({:.3}×) | {:.3} | {:.2} | {:.2} | {:.3} | {:.3} | {} |",
            s.prompts,
            s.plain_tokens_per_sec,
            s.speculative_tokens_per_sec,
            s.speedup,
            s.prompt_lookup_tokens_per_sec,
            s.prompt_lookup_speedup,
            s.acceptance_rate,
            s.mean_accepted,
            s.mean_draft_len,
            s.draft_cost_ratio,
            s.verify_cost_ratio,
            match s.mismatches {
                Some(m) => format!("{}/{}", s.prompts - m, s.prompts),
                None => "sampled".into(),
            }
        );
    }
    println!(
        "tok/s: decode, median of {} runs per prompt, then median over prompts; speed-up: median of \
         per-prompt ratios; c: draft step / plain decode step; verify/step: a verify of k + 1 rows / \
         plain decode step",
        args.runs
    );
    if summary.mismatches.is_some_and(|m| m > 0) {
        println!(
            "{} prompt(s) differ from plain greedy decoding: with quantized weights the k + 1-row \
             verify does not compute a row exactly as a one-row decode step does (see --json \
             `first_mismatch`; --weights f32 gives identical output)",
            summary.mismatches.unwrap_or(0)
        );
    }
    Ok(())
}

fn measure_prompt(
    model: &Model,
    prompt: &[u32],
    drafter: Drafter,
    run: crate::model::RunOptions,
    args: &SpeculateArgs,
    mut tick: impl FnMut(),
) -> Result<(PromptResult, Vec<u32>)> {
    let gen = GenOptions {
        max_new_tokens: args.max_tokens,
        temperature: args.temp,
        seed: args.seed,
        stop_at_eos: !args.ignore_eos,
        run,
    };
    let spec = SpecOptions {
        max_new_tokens: args.max_tokens,
        draft_len: args.draft_len,
        stop_at_eos: !args.ignore_eos,
        run,
        temperature: args.temp,
        seed: args.seed,
        accept: AcceptRule::SpeculativeSampling,
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
        let s = speculative::speculate(model, prompt, drafter, spec)?;
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
    let greedy = args.temp <= 0.0;
    let first_mismatch = if greedy {
        first_difference(&reference, &s.new_tokens)
    } else {
        None
    };
    let draft_steps = s.drafted.max(1) as f64;
    let result = PromptResult {
        kind: String::new(),
        prompt_tokens: prompt.len(),
        identical: greedy.then_some(first_mismatch.is_none()),
        prompt_lookup_identical: greedy.then_some(l.new_tokens == reference),
        first_mismatch,
        acceptance_rate: s.acceptance_rate,
        mean_accepted: s.mean_accepted,
        mean_draft_len: s.mean_draft_len,
        draft_cost_ratio: s.draft_seconds / draft_steps / step,
        verify_cost_ratio: s.verify_seconds / s.verifies.max(1) as f64 / step,
        plain_tokens_per_sec: Stat::from(plain),
        speculative_tokens_per_sec: Stat::from(selfspec),
        prompt_lookup_tokens_per_sec: Stat::from(lookup),
        prompt_lookup_mean_accepted: l.mean_accepted,
    };
    Ok((result, s.new_tokens))
}

fn first_difference(a: &[u32], b: &[u32]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Over a set of prompts: medians of the per-prompt medians and ratios.
#[derive(Debug, Serialize)]
struct Summary {
    prompts: usize,
    /// Greedy only (null when sampled).
    identical: Option<bool>,
    mismatches: Option<usize>,
    acceptance_rate: f64,
    mean_accepted: f64,
    mean_draft_len: f64,
    draft_cost_ratio: f64,
    verify_cost_ratio: f64,
    plain_tokens_per_sec: f64,
    speculative_tokens_per_sec: f64,
    speedup: f64,
    prompt_lookup_tokens_per_sec: f64,
    prompt_lookup_speedup: f64,
    prompt_lookup_mean_accepted: f64,
}

fn summarize(results: &[&PromptResult]) -> Summary {
    let median = |f: &dyn Fn(&PromptResult) -> f64| {
        Stat::from(results.iter().map(|r| f(r)).collect()).median
    };
    let mismatches = results
        .iter()
        .map(|r| r.identical.map(|same| usize::from(!same)))
        .sum::<Option<usize>>();
    Summary {
        prompts: results.len(),
        identical: mismatches.map(|m| m == 0),
        mismatches,
        acceptance_rate: median(&|r| r.acceptance_rate),
        mean_accepted: median(&|r| r.mean_accepted),
        mean_draft_len: median(&|r| r.mean_draft_len),
        draft_cost_ratio: median(&|r| r.draft_cost_ratio),
        verify_cost_ratio: median(&|r| r.verify_cost_ratio),
        plain_tokens_per_sec: median(&|r| r.plain_tokens_per_sec.median),
        speculative_tokens_per_sec: median(&|r| r.speculative_tokens_per_sec.median),
        speedup: median(&|r| r.speculative_tokens_per_sec.median / r.plain_tokens_per_sec.median),
        prompt_lookup_tokens_per_sec: median(&|r| r.prompt_lookup_tokens_per_sec.median),
        prompt_lookup_speedup: median(&|r| {
            r.prompt_lookup_tokens_per_sec.median / r.plain_tokens_per_sec.median
        }),
        prompt_lookup_mean_accepted: median(&|r| r.prompt_lookup_mean_accepted),
    }
}

/// One summary per kind, in the order the kinds first appear.
fn per_kind(results: &[PromptResult]) -> Vec<(String, Summary)> {
    let mut kinds: Vec<&str> = Vec::new();
    for r in results {
        if !kinds.contains(&r.kind.as_str()) {
            kinds.push(&r.kind);
        }
    }
    kinds
        .into_iter()
        .map(|k| {
            let rs: Vec<&PromptResult> = results.iter().filter(|r| r.kind == k).collect();
            (k.to_string(), summarize(&rs))
        })
        .collect()
}
