//! `scalpel generate`: stream text under a plan, then report tokens/sec.

use std::io::Write;

use anyhow::{bail, Context, Result};

use crate::cli::{self, GenerateArgs};
use crate::eval::generate;
use crate::eval::speculative::{self, AcceptRule, Drafter, SpecOptions};
use crate::model::routing::{load_from_given, ROUTING_SECTION};
use crate::model::{LayerPolicy, Probe, ProbeSource};
use crate::plan::Plan;
use crate::setup::{self, PlanSource};
use crate::surgery::routing::measure::Routed;
use crate::surgery::sparsity::activation::{ChannelProbe, ExecutedChannels};
use crate::surgery::sparsity::{self, MaskPolicy, SPARSITY_SECTION};

pub fn run(margs: &cli::ModelArgs, pargs: &cli::PlanArgs, args: GenerateArgs) -> Result<()> {
    if args.speculative.is_some() && (pargs.plan.is_some() || pargs.skip.is_some()) {
        bail!(
            "--speculative generates the full model's output with its plan as the draft; \
             it cannot be combined with --plan or --skip (put the draft's skips in the \
             --speculative plan file)"
        );
    }
    // The prompt's length in bytes bounds its tokens (before the tokenizer is loaded).
    let context = args.prompt.len() + args.max_tokens + 64;
    let model = cli::load_model_for(margs, args.weights.load_options(context, 1))?;
    let (plan, file) = cli::load_plan_honouring(
        pargs,
        &model,
        &[
            crate::surgery::replace::REPLACE_SECTION,
            crate::plan::HEAL_SECTION,
            ROUTING_SECTION,
            SPARSITY_SECTION,
        ],
    )?;
    // A routed plan: its routers decide per token which blocks run.
    let routing = load_from_given(file.as_ref(), &model)?;
    let routed = routing.as_ref().map(|r| Routed::of(&plan, r));
    let policy = routed.as_ref().map(|r| r.policy(&model));
    // A sparse plan: a head/neuron mask for this prompt, or channel thresholds.
    let sparse = sparsity::load_from_given(file.as_ref(), &model)?;
    // The draft: a plan, routed or not.
    let draft = match &args.speculative {
        Some(path) => {
            let source = PlanSource {
                plan: Some(path.clone()),
                skip: None,
            };
            let (plan, file) =
                setup::load_plan_honouring(&source, &model, &[ROUTING_SECTION, SPARSITY_SECTION])
                    .context("--speculative")?;
            let routing = load_from_given(file.as_ref(), &model)?;
            let sparse = sparsity::load_from_given(file.as_ref(), &model)?;
            Some((plan, routing, sparse))
        }
        None => None,
    };
    let codec = model.codec()?;
    let prompt = model.prompt_ids(&args.prompt, args.chat)?;
    let draft_routed = draft
        .as_ref()
        .and_then(|(plan, routing, _)| routing.as_ref().map(|r| Routed::of(plan, r)));
    let draft_policy = draft_routed.as_ref().map(|r| r.policy(&model));
    let draft_mask = match &draft {
        Some((plan, _, Some((_, sp)))) => sp.mask_for(&model, plan, &prompt)?,
        _ => None,
    };
    // A TEAL/WINA draft: its channel probe, executed, in every draft pass.
    let draft_channels = match &draft {
        Some((_, _, Some((_, sp)))) => ExecutedChannels::of(&model, sp)?,
        _ => None,
    };
    let draft_mask_policy = match (&draft, &draft_mask) {
        (Some((plan, _, _)), Some(m)) => Some(MaskPolicy::new(plan, m, model.cfg())?),
        _ => None,
    };
    let mask = match &sparse {
        Some((_, sp)) => sp.mask_for(&model, &plan, &prompt)?,
        None => None,
    };
    let mask_policy = mask
        .as_ref()
        .map(|m| MaskPolicy::new(&plan, m, model.cfg()))
        .transpose()?;
    // TEAL/WINA executed at each decode step (a column-major copy).
    let executed_channels = match &sparse {
        Some((_, sp)) => ExecutedChannels::of(&model, sp)?,
        None => None,
    };
    let mut channels = executed_channels
        .as_ref()
        .map(ExecutedChannels::probe)
        .transpose()?;
    let sparse_note = sparse
        .as_ref()
        .map(|(s, _)| sparsity::decode_note(s, mask.as_ref(), model.cfg()));
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
    let mut on_token = |tok| {
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
    };
    if let Some((draft, _, draft_sparse)) = &draft {
        let spec = SpecOptions {
            max_new_tokens: opts.max_new_tokens,
            draft_len: args.draft_len,
            stop_at_eos: opts.stop_at_eos,
            run,
            temperature: opts.temperature,
            seed: opts.seed,
            accept: AcceptRule::SpeculativeSampling,
        };
        let policy = draft_policy.as_ref().map(|p| p as &dyn LayerPolicy);
        let drafter = Drafter::under(
            draft,
            policy.or(draft_mask_policy.as_ref().map(|p| p as &dyn LayerPolicy)),
            draft_channels.as_ref().map(|c| c as &dyn ProbeSource),
        );
        let draft_note = draft_sparse
            .as_ref()
            .map(|(s, _)| sparsity::decode_note(s, draft_mask.as_ref(), model.cfg()));
        let report =
            speculative::speculate_with(&model, &prompt, drafter, spec, |tok, _| on_token(tok))?;
        let draft_executed = draft_policy.as_ref().map(|p| p.counts.executed_fraction());
        if args.json {
            let mut v = serde_json::to_value(&report)?;
            v["text"] = codec.decode(&report.new_tokens)?.into();
            v["plan"] = Plan::base().describe().into();
            v["draft_plan"] = draft.describe().into();
            if let Some(note) = &draft_note {
                v["draft_sparsity"] = note.clone().into();
            }
            if let Some(f) = draft_executed {
                v["draft_executed_fraction"] = f.into();
            }
            v["draft_len"] = args.draft_len.describe().into();
            v["weights"] = generate::weights_used(run, report.prompt_tokens, "f32").into();
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!();
            eprintln!(
                "decode {:.1} tok/s ({} tokens), self-speculative with draft {}{}: α {:.3}, \
                 τ {:.2} tokens per verify, mean draft {:.2}, weights {}",
                report.decode_tokens_per_sec,
                report.new_tokens.len(),
                draft.describe(),
                draft_note.map_or(String::new(), |n| format!(" + {n}")),
                report.acceptance_rate,
                report.mean_accepted,
                report.mean_draft_len,
                generate::weights_used(run, report.prompt_tokens, "f32"),
            );
        }
        return Ok(());
    }
    let hooks = generate::Hooks {
        policy: (policy.as_ref().map(|p| p as &dyn LayerPolicy))
            .or(mask_policy.as_ref().map(|p| p as &dyn LayerPolicy)),
        probe: channels.as_mut().map(|p| p as &mut dyn Probe),
    };
    let report = generate::generate_with(&model, &prompt, &plan, hooks, opts, on_token)?;
    let zeroed = channels.as_ref().map(ChannelProbe::zeroed_fraction);
    // Blocks executed per token over all blocks, prompt and new tokens.
    let executed = policy.as_ref().map(|p| p.counts.executed_fraction());
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["text"] = codec.decode(&report.new_tokens)?.into();
        v["plan"] = plan.describe().into();
        if let (Some(f), Some((section, _))) = (executed, &routing) {
            v["executed_fraction"] = f.into();
            v["routing"] = serde_json::to_value(section)?;
        }
        if let Some(note) = &sparse_note {
            v["sparsity"] = note.clone().into();
        }
        if let Some(z) = zeroed {
            v["channels_zeroed"] = z.into();
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!();
        let routed_note = match (executed, &sparse_note) {
            (Some(f), _) => {
                format!(" + routing (executed {f:.4} of the blocks per token, measured)")
            }
            (None, Some(n)) => match zeroed {
                Some(z) => format!(" + {n}: {:.1}% of projection inputs zeroed", 100.0 * z),
                None => format!(" + {n}"),
            },
            (None, None) => String::new(),
        };
        eprintln!(
            "prefill {:.1} tok/s ({} tokens), decode {:.1} tok/s ({} tokens), weights {}, plan {}{routed_note}",
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
