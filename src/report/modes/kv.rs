//! KV budget plans: quality through `eval --kv`'s `evaluate_kv` at the
//! text's context, decode speed through its `decode_speed`.

use anyhow::Result;

use super::{fact, Quality, Speed};
use crate::eval::bench::{ratio, Stat};
use crate::eval::kv::{self, KvEvalOptions};
use crate::eval::perplexity::windows;
use crate::model::kv::KvSpec;
use crate::model::{Model, RunOptions};

/// `eval --kv`'s prefill chunk: the policy acts after every chunk.
pub const KV_CHUNK: usize = 256;
/// `eval --kv`'s longest default context.
pub const KV_MAX_CONTEXT: usize = 8192;

/// The context a KV plan is measured at: the text as one window, at most
/// `eval --kv`'s default (the model's positions, at most 8192).
pub fn kv_context(model: &Model, ids: &[u32]) -> usize {
    let max = model.transformer.max_positions().min(KV_MAX_CONTEXT);
    (ids.len() + usize::from(model.cfg().add_bos)).min(max)
}

/// A KV plan's quality with its policy applied, as `eval --kv` measures it.
pub fn kv_quality(
    model: &Model,
    ids: &[u32],
    spec: &KvSpec,
    context: usize,
    run: RunOptions,
) -> Result<Quality> {
    let opts = KvEvalOptions {
        context,
        chunk: KV_CHUNK,
        recall: false,
        run,
        parallel_windows: false,
        cancel: None,
    };
    let r = kv::evaluate_kv(model, ids, std::slice::from_ref(spec), opts, |_, _| {})?;
    let row = &r.rows[0];
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    let mut facts = vec![
        fact(
            "KV budget",
            match spec.budget() {
                Some(b) => format!("{spec}: {b} keys per layer and KV head"),
                None => format!("{spec}: every key"),
            },
        ),
        fact(
            "KV context",
            format!(
                "quality measured at a {}-token context ({} window{}, prefill chunks of {}, the \
                 policy acting between chunks), on the {} positions past the budget, against the \
                 full cache on the same positions (perplexity {:.3})",
                r.context,
                r.windows,
                if r.windows == 1 { "" } else { "s" },
                r.chunk,
                r.scored_tokens,
                r.full_perplexity
            ),
        ),
        fact(
            "KV cache",
            format!(
                "{:.2} MiB against {:.2} MiB for the full cache",
                mib(row.kv_bytes),
                mib(r.full_kv_bytes)
            ),
        ),
    ];
    if row.budget_covers_context {
        facts.push(fact(
            "note",
            "the budget holds the whole context, so this is the full cache: give a longer \
             --text or more --max-windows to measure the budget"
                .into(),
        ));
    }
    Ok(Quality {
        perplexity: row.perplexity,
        reference_perplexity: Some(r.full_perplexity),
        kl_to_base: row.kl_to_full,
        top1_agreement: row.top1_agreement,
        blocks_removed: Some(0.0),
        summary: Some(format!(
            "Keep a KV budget of {spec} at a {}-token context",
            r.context
        )),
        facts,
    })
}

/// Decode speed of each KV policy against the full cache, all interleaved
/// round by round after one prefill of the context (`eval --kv
/// --decode-speed`).
pub fn kv_speeds(
    model: &Model,
    ids: &[u32],
    specs: &[&KvSpec],
    context: usize,
    steps: usize,
    runs: usize,
    run: RunOptions,
) -> Result<Vec<Speed>> {
    let cfg = model.cfg();
    let bos = if cfg.add_bos { cfg.bos_token_id } else { None };
    let max = model.transformer.max_positions();
    let mut prompt = windows(ids, context, bos).swap_remove(0);
    prompt.truncate(max.saturating_sub(steps + 1));
    let mut unique: Vec<KvSpec> = Vec::new();
    for s in specs {
        if !unique.contains(s) {
            unique.push((*s).clone());
        }
    }
    let rows = kv::decode_speed(model, &prompt, &unique, steps, runs, run)?;
    let full = Stat::from(rows[0].all_tokens_per_sec.clone());
    specs
        .iter()
        .map(|s| {
            let name = s.to_string();
            let row = rows
                .iter()
                .find(|r| r.policy == name)
                .expect("decode_speed times every policy");
            let decode = Stat::from(row.all_tokens_per_sec.clone());
            Ok(Speed {
                prefill: None,
                prefill_speedup: None,
                decode_speedup: ratio(&decode, &full),
                decode,
                // Decode under every policy is executed (a smaller cache, or
                // gathered pages); the full cache has nothing to leave out.
                executed: row.executed || **s == KvSpec::Full,
                reference: Some(format!(
                    "vs the full cache, {}-token prefill, decode only",
                    prompt.len()
                )),
                facts: vec![fact(
                    "speed",
                    format!(
                        "{} decode steps after one {}-token prefill, against the full cache \
                         (decode {:.1} tok/s, runs {:.1}–{:.1}) in the same rounds",
                        steps,
                        prompt.len(),
                        full.median,
                        full.min,
                        full.max
                    ),
                )],
            })
        })
        .collect()
}
