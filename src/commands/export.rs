//! `scalpel export`: writes the model under a plan as a Nemotron-NAS
//! folder, a llama.cpp `deci` GGUF or a mergekit recipe.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context, Result};

use crate::cli::{self, ExportArgs, ExportFormat};
use crate::eval::perplexity::{self, EvalOptions, EvalReport};
use crate::export::{self, decilm, gguf, mergekit};
use crate::model::{LocalModel, Model, RunOptions};
use crate::plan::{Plan, PlanFile};
use crate::progress;

pub fn run(margs: &cli::ModelArgs, pargs: &cli::PlanArgs, args: ExportArgs) -> Result<()> {
    if pargs.plan.is_none() && pargs.skip.is_none() {
        bail!("export needs a plan: pass --plan FILE (or --skip BLOCKS)");
    }
    // Refuse an existing output before the slow work.
    export::check_output(&args.out, args.force)?;
    let resolved = crate::model::source::resolve(margs.model.as_deref(), margs.offline)?;
    let model = cli::load_model(margs)?;
    if !model.implied_plan.skip.is_empty() {
        bail!(
            "this model is already a pruned export (it leaves out {}); export from the original model",
            model.implied_plan.describe()
        );
    }
    export::check_architecture(model.cfg(), expresses(args.format))?;
    if let Some(path) = &pargs.plan {
        refuse_replaced(&model.load_plan(path)?, path, args.format)?;
    }
    let (plan, plan_file) = cli::load_plan_honouring(pargs, &model, &[crate::plan::HEAL_SECTION])?;
    if let Some(pf) = &plan_file {
        export::check_expressible(pf, expresses(args.format))?;
    }
    // Fails early (before measuring) on scales that cannot fold.
    export::fold::fold_factors(&plan, model.n_layers())?;

    match args.format {
        ExportFormat::Mergekit => {
            let base = match (&args.base_model, &resolved.local) {
                (Some(b), _) => b.clone(),
                (None, LocalModel::HfDir(_)) => margs
                    .model
                    .clone()
                    .unwrap_or_else(|| crate::model::source::DEFAULT_HUB_ID.to_string()),
                (None, LocalModel::Gguf(_)) => bail!(
                    "mergekit reads Hugging Face checkpoints, not GGUF files; pass --base-model \
                     with the hub id or folder of this model's original weights"
                ),
            };
            let yaml = mergekit::recipe(&plan, model.n_layers(), &base)?;
            export::write_file_atomic(&args.out, args.force, |w| {
                use std::io::Write;
                w.write_all(yaml.as_bytes())?;
                Ok(())
            })?;
            println!(
                "wrote mergekit recipe {} ({})",
                args.out.display(),
                plan.describe()
            );
        }
        ExportFormat::Decilm => {
            let measured = measure(&model, &plan, &args)?;
            let card = model_card(&model, &plan, plan_file.as_ref(), measured.as_ref(), &args);
            // Check the format constraints before writing anything.
            decilm::config_json(&model, &plan)?;
            export::write_dir_atomic(&args.out, args.force, |dir| {
                decilm::write_folder(&model, &plan, &card, dir)
            })?;
            println!(
                "wrote Nemotron-NAS folder {} ({})",
                args.out.display(),
                plan.describe()
            );
        }
        ExportFormat::Gguf => {
            let LocalModel::Gguf(source) = &resolved.local else {
                bail!(
                    "GGUF export starts from a GGUF model (its tokenizer and quantization are \
                     copied); convert this folder with llama.cpp's converter first, or export \
                     --format decilm"
                );
            };
            let quant = args.quant.as_deref().map(gguf::parse_quant).transpose()?;
            let measured = measure(&model, &plan, &args)?;
            let mut extra = vec![
                ("scalpel.plan".to_string(), serde_json::to_string(&plan)?),
                ("scalpel.source".to_string(), model.identity.to_string()),
            ];
            if let Some(m) = &measured {
                extra.push(("scalpel.measured".to_string(), serde_json::to_string(m)?));
            }
            let pb = progress::spinner("writing GGUF");
            let summary = export::write_file_atomic(&args.out, args.force, |w| {
                gguf::write_deci_gguf(source, &plan, quant, &extra, w)
            });
            pb.finish_and_clear();
            let summary = summary?;
            println!(
                "wrote llama.cpp deci GGUF {} ({}; {} tensors, {} left out{}; types: {})",
                args.out.display(),
                plan.describe(),
                summary.tensors,
                summary.dropped_tensors,
                if summary.zero_ffn_layers.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; skipped MLPs of layers {:?} written as 256-wide all-zero FFNs",
                        summary.zero_ffn_layers
                    )
                },
                gguf::describe_types(&args.out)?
            );
        }
    }
    Ok(())
}

fn expresses(format: ExportFormat) -> &'static export::Expresses {
    match format {
        ExportFormat::Decilm => &export::DECILM,
        ExportFormat::Gguf => &export::GGUF,
        ExportFormat::Mergekit => &export::MERGEKIT,
    }
}

/// Perplexity of the plan and the base on the built-in text, for the card.
fn measure(model: &Model, plan: &Plan, args: &ExportArgs) -> Result<Option<EvalReport>> {
    if args.no_measure {
        return Ok(None);
    }
    let ids = model
        .codec()?
        .encode(crate::eval::data::DEFAULT_EVAL_TEXT)
        .context("tokenizing the evaluation text")?;
    let opts = EvalOptions {
        window: 512,
        compare_base: true,
        run: RunOptions::FAST,
        parallel_windows: false,
    };
    let pb = progress::bar(ids.len().div_ceil(512), "measuring the plan");
    let r = perplexity::evaluate(model, &ids, plan, opts, &AtomicBool::new(false), |d, _| {
        pb.set_position(d as u64)
    });
    pb.finish_and_clear();
    let r = r?;
    eprintln!(
        "scalpel: measured perplexity {:.4}, KL to base {:.5}, top-1 agreement {:.2}%",
        r.perplexity,
        r.kl_to_base,
        r.top1_agreement * 100.0
    );
    Ok(Some(r))
}

fn model_card(
    model: &Model,
    plan: &Plan,
    plan_file: Option<&PlanFile>,
    measured: Option<&EvalReport>,
    args: &ExportArgs,
) -> String {
    let mut s = String::new();
    let name = out_name(&args.out);
    s.push_str(&format!(
        "---\nlibrary_name: transformers\ntags:\n- nemotron-nas\n- pruned\n- scalpel\n---\n\n# {name}\n\n"
    ));
    s.push_str(&format!(
        "{} with {} of its {} attention/MLP blocks removed by \
         scalpel block surgery, in Nemotron-NAS (`DeciLMForCausalLM`) form.\n\n",
        model.identity.name,
        plan.skip.len(),
        2 * model.n_layers()
    ));
    s.push_str("## What was skipped\n\n");
    if plan.skip.is_empty() {
        s.push_str("Nothing: this is the unpruned model.\n\n");
    } else {
        s.push_str("| block | `block_configs` entry |\n|---|---|\n");
        for b in &plan.skip {
            let what = match b.kind {
                crate::plan::BlockKind::Attn => "attention `no_op: true`",
                crate::plan::BlockKind::Mlp => "ffn `no_op: true`",
            };
            s.push_str(&format!("| `{b}` | layer {} {what} |\n", b.layer));
        }
        s.push('\n');
    }
    s.push_str(if plan.has_scales() {
        "The plan's per-layer residual scales are folded into `o_proj` and `down_proj` (exact up to \
         RMSNorm's epsilon), so the model runs with no extra parameters.\n\n"
    } else {
        "The plan has no scales; the remaining weights are the source's, dequantized to float32.\n\n"
    });
    if let Some(h) = plan_file.and_then(|pf| {
        pf.sections
            .get::<crate::surgery::heal::HealSection>(crate::plan::HEAL_SECTION)
            .ok()
            .flatten()
    }) {
        s.push_str(&format!(
            "The plan is healed: its low-rank corrections (rank {} on {} of {} layers, {}              parameters, trained by `scalpel heal`) are merged into those weights, `W + B·A`.\n\n",
            h.rank,
            h.targets.join(", "),
            h.layers.len(),
            h.parameters
        ));
    }
    s.push_str("## Measured quality\n\n");
    match measured {
        Some(m) => s.push_str(&format!(
            "Measured by scalpel on the source model with this plan, Debian's GPL-3 text, {} windows \
             of 512 tokens ({} scored tokens):\n\n| metric | value |\n|---|---|\n\
             | perplexity | {:.4} |\n| KL to the unpruned model | {:.5} nats/token |\n\
             | top-1 agreement with the unpruned model | {:.2}% |\n\n",
            m.windows,
            m.scored_tokens,
            m.perplexity,
            m.kl_to_base,
            m.top1_agreement * 100.0
        )),
        None => s.push_str("Not measured at export (`--no-measure`).\n\n"),
    }
    if let Some(pf) = plan_file {
        if !pf.metrics.is_empty() {
            s.push_str("Metrics recorded in the plan file:\n\n```json\n");
            s.push_str(&serde_json::to_string_pretty(&pf.metrics).unwrap_or_default());
            s.push_str("\n```\n\n");
        }
    }
    s.push_str(&format!(
        "## Source\n\n- model: {}\n- origin: {}\n\n",
        model.identity, model.origin
    ));
    s.push_str(&format!(
        "## Loading\n\nThe Nemotron-NAS modelling code is NVIDIA's; `config.json`'s `auto_map` points to \
         `{}`, so loaders need `trust_remote_code`.\n\n\
         - vLLM: `vllm serve ./{name} --trust-remote-code`\n\
         - SGLang, TensorRT-LLM and MLX load `DeciLMForCausalLM` too.\n\
         - llama.cpp: `scalpel export --format gguf` writes the `deci` GGUF directly.\n\
         - scalpel: `scalpel eval --model ./{name}`\n",
        decilm::REMOTE_CODE_REPO
    ));
    s
}

fn out_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pruned-model".into())
}

/// A plan whose attention layers run as mixers has no form in these
/// formats: they know attention, no-op and plain linear blocks only.
fn refuse_replaced(
    pf: &crate::plan::PlanFile,
    path: &std::path::Path,
    format: ExportFormat,
) -> Result<()> {
    use crate::surgery::replace::{ReplaceSection, REPLACE_SECTION};
    if let Some(r) = pf.sections.get::<ReplaceSection>(REPLACE_SECTION)? {
        let name = match format {
            ExportFormat::Gguf => "gguf (llama.cpp `deci`)",
            ExportFormat::Decilm => "decilm (Nemotron-NAS)",
            ExportFormat::Mergekit => "mergekit",
        };
        bail!(
            "plan {} replaces attention layers {:?} with gated linear mixers, which the {name} \
             format cannot express (it has no recurrent mixer layer); measure it with `scalpel eval \
             --plan {}`, or export a plan that skips those layers instead",
            path.display(),
            r.layers,
            path.display()
        );
    }
    Ok(())
}
