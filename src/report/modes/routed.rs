//! Routed plans: quality and realised compute through `eval`'s routed
//! evaluation, speed through `bench --plan`'s routed timing on the text.

use anyhow::Result;

use super::{fact, Quality, Speed};
use crate::eval::bench::ratio;
use crate::model::routing::{Routers, RoutingSection};
use crate::model::{Model, RunOptions};
use crate::plan::Plan;
use crate::surgery::routing::measure::{evaluate_text, Routed};
use crate::surgery::routing::speed::{speed_interleaved, SpeedEntry, SpeedOptions};

/// A routed plan's quality and realised compute, as `eval --plan` measures it.
pub fn routed_quality(
    model: &Model,
    plan: &Plan,
    section: &RoutingSection,
    routers: &Routers,
    ids: &[u32],
    window: usize,
    run: RunOptions,
) -> Result<Quality> {
    let routed = Routed {
        plan,
        routers,
        kv: section.kv,
        threshold: section.threshold,
    };
    let r = evaluate_text(model, ids, window, &routed, run, false)?;
    let total = 2 * model.n_layers();
    Ok(Quality {
        perplexity: r.perplexity,
        reference_perplexity: None,
        kl_to_base: r.kl_to_base,
        top1_agreement: r.top1_agreement,
        blocks_removed: Some((1.0 - r.executed_fraction) * total as f64),
        summary: Some(format!(
            "Route tokens past blocks ({:.1}% of blocks executed)",
            r.executed_fraction * 100.0
        )),
        facts: vec![
            fact(
                "routing",
                format!(
                    "trained routers on {:?} blocks, capacity {}, threshold {:.4}, K/V of \
                     skipping tokens: {:?}",
                    section.on, section.capacity, section.threshold, section.kv
                ),
            ),
            fact(
                "realised compute",
                format!(
                    "{:.1}% of all blocks executed per token ({:.1}% of the routed ones), \
                     measured on the evaluation text ({} tokens)",
                    r.executed_fraction * 100.0,
                    r.routed_share * 100.0,
                    r.scored_tokens
                ),
            ),
        ],
    })
}

/// Routed plans timed against the unmodified model on the evaluation text
/// (routing depends on the tokens), as `bench --plan` times them.
pub fn routed_speeds(
    model: &Model,
    plans: &[(&Plan, &RoutingSection, &Routers)],
    ids: &[u32],
    opts: SpeedOptions,
) -> Result<Vec<Speed>> {
    let base = Plan::base();
    let mut entries = vec![SpeedEntry {
        name: "base".into(),
        plan: &base,
        routed: None,
    }];
    for (i, (plan, section, routers)) in plans.iter().enumerate() {
        entries.push(SpeedEntry {
            name: format!("routed {i}"),
            plan,
            routed: Some(Routed {
                plan,
                routers,
                kv: section.kv,
                threshold: section.threshold,
            }),
        });
    }
    let rows = speed_interleaved(model, &entries, ids, opts, |_, _| {})?;
    let (bp, bd) = (
        rows[0].prefill_tokens_per_sec.clone(),
        rows[0].decode_tokens_per_sec.clone(),
    );
    Ok(rows
        .into_iter()
        .skip(1)
        .map(|r| Speed {
            prefill_speedup: Some(ratio(&r.prefill_tokens_per_sec, &bp)),
            decode_speedup: ratio(&r.decode_tokens_per_sec, &bd),
            prefill: Some(r.prefill_tokens_per_sec),
            decode: r.decode_tokens_per_sec,
            executed: true,
            reference: Some("vs the base, on the text".into()),
            facts: vec![fact(
                "speed",
                format!(
                    "timed against the unmodified model on the evaluation text (routing \
                     depends on the tokens), in the same rounds; {:.1}% of all blocks executed \
                     per token while timed",
                    r.executed_fraction * 100.0
                ),
            )],
        })
        .collect())
}
