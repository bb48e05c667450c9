//! Trade-off reports: each plan measured on one model (quality, speed),
//! drawn as SVG charts and laid out in one self-contained HTML file for
//! people who will never open a terminal.

pub mod charts;
pub mod frontier;
pub mod headline;
pub mod html;
pub mod modes;

use serde::Serialize;

use crate::eval::bench::Stat;

/// Whether a speed was timed with the work really left out, or estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpeedKind {
    Executed,
    Simulated,
}

impl SpeedKind {
    pub fn label(self) -> &'static str {
        match self {
            SpeedKind::Executed => "executed",
            SpeedKind::Simulated => "simulated",
        }
    }
}

/// One plan's measured numbers (the base model is a row too).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    /// How the plan was made (base, Hopscotch search, fitted, by hand, a mode).
    pub method: String,
    pub skipped: Vec<String>,
    /// Attention + MLP blocks of the model.
    pub blocks_total: usize,
    /// Blocks removed: the skips, or for routed and sparse plans the compute
    /// they leave out counted in blocks (measured share × blocks).
    pub blocks_removed: f64,
    pub has_scales: bool,
    /// What the plan's mode does besides skips, in a few words (e.g.
    /// "KV budget quest:64 at a 512-token context"); `None` for skip plans.
    pub mode_summary: Option<String>,
    pub perplexity: f64,
    /// The unmodified model's perplexity on the same positions, when this
    /// plan was measured on others than the base row (a KV plan at its own
    /// context, past its budget); `None`: the base row's.
    pub reference_perplexity: Option<f64>,
    pub kl_to_base: f64,
    pub top1_agreement: f64,
    /// `None` where prefill is not timed (KV and sparse plans: decode only).
    pub prefill_tokens_per_sec: Option<Stat>,
    pub decode_tokens_per_sec: Stat,
    /// Against the base model timed in the same interleaved runs on the same
    /// path: the ratio of medians, with the min–max of the per-run ratios.
    /// Exactly 1 for the base.
    pub prefill_speedup: Option<Stat>,
    pub decode_speedup: Stat,
    pub speed_kind: SpeedKind,
    /// What the speed-up is against when that is not the base row's timing
    /// (another path, context or text); `None`: the base row.
    pub speed_reference: Option<String>,
    /// The plan used as a draft for the full model (`report --speculative`).
    pub draft: Option<DraftSpeed>,
    /// Mode-specific facts (a draft's acceptance, a budget), label and value.
    pub details: Vec<(String, String)>,
    /// Commands that reproduce this row's numbers.
    pub commands: Vec<String>,
}

/// A plan as the draft of lossless self-speculative decoding (greedy: the
/// output is the full model's), timed against plain decoding in the same
/// interleaved runs.
#[derive(Debug, Clone, Serialize)]
pub struct DraftSpeed {
    /// α: accepted over drafted tokens.
    pub acceptance_rate: f64,
    /// τ: new tokens per verify pass (accepted draft tokens plus one).
    pub mean_accepted: f64,
    /// Tokens drafted per verify.
    pub draft_len: usize,
    pub plain_tokens_per_sec: Stat,
    pub speculative_tokens_per_sec: Stat,
    /// Speculative over plain decoding: ratio of medians, min–max of the
    /// per-run ratios.
    pub speedup: Stat,
    /// Every prompt's output equals plain greedy decoding's.
    pub identical: bool,
    pub prompts: usize,
    pub new_tokens: usize,
}

impl Row {
    pub fn is_base(&self) -> bool {
        self.method == "base"
    }

    /// Perplexity change against the unmodified model on the same positions
    /// (`base_perplexity` unless the row was measured on others), in percent.
    pub fn perplexity_change_pct(&self, base_perplexity: f64) -> f64 {
        let reference = self.reference_perplexity.unwrap_or(base_perplexity);
        (self.perplexity / reference - 1.0) * 100.0
    }

    /// Whether the decode speed-up's spread includes 1 (no measurable change).
    pub fn decode_within_noise(&self) -> bool {
        self.decode_speedup.min <= 1.0 && self.decode_speedup.max >= 1.0
    }

    pub fn attention_skipped(&self) -> usize {
        self.skipped
            .iter()
            .filter(|b| b.starts_with("attn"))
            .count()
    }

    pub fn mlp_skipped(&self) -> usize {
        self.skipped.iter().filter(|b| b.starts_with("mlp")).count()
    }
}

/// How the numbers were measured, printed with them.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// The model as the user named it (hub id, file or folder name).
    pub model: String,
    pub architecture: String,
    /// Where its files came from.
    pub origin: String,
    pub text: String,
    pub tokens: usize,
    pub windows: usize,
    pub window: usize,
    pub threads: usize,
    pub device: String,
    pub machine: String,
    pub weights: String,
    pub bench: String,
    /// Largest perplexity increase (percent) the recommendation accepts.
    pub quality_budget_pct: f64,
    pub generated_by: String,
    pub date: String,
}

/// Everything a report shows.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub title: String,
    pub rows: Vec<Row>,
    pub settings: Settings,
}

impl Report {
    pub fn base_perplexity(&self) -> f64 {
        self.rows
            .iter()
            .find(|r| r.is_base())
            .map_or(f64::NAN, |r| r.perplexity)
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A row with the given skips, perplexity and decode speed-up spread.
    pub fn row(name: &str, method: &str, skipped: usize, ppl: f64, speed: (f64, f64, f64)) -> Row {
        let stat = |m: f64, lo: f64, hi: f64| Stat {
            median: m,
            min: lo,
            max: hi,
            runs: vec![m],
        };
        Row {
            name: name.into(),
            method: method.into(),
            skipped: (0..skipped).map(|i| format!("attn.{i}")).collect(),
            blocks_total: 60,
            blocks_removed: skipped as f64,
            has_scales: false,
            mode_summary: None,
            perplexity: ppl,
            reference_perplexity: None,
            kl_to_base: 0.01 * skipped as f64,
            top1_agreement: 1.0 - 0.05 * skipped as f64,
            prefill_tokens_per_sec: Some(stat(500.0 * speed.0, 500.0 * speed.1, 500.0 * speed.2)),
            decode_tokens_per_sec: stat(60.0 * speed.0, 60.0 * speed.1, 60.0 * speed.2),
            prefill_speedup: Some(stat(speed.0, speed.1, speed.2)),
            decode_speedup: stat(speed.0, speed.1, speed.2),
            speed_kind: SpeedKind::Executed,
            speed_reference: None,
            draft: None,
            details: Vec::new(),
            commands: vec![format!("scalpel eval --plan {name}.json")],
        }
    }
}
