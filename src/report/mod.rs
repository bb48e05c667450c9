//! Trade-off reports: each plan measured on one model (quality, speed),
//! drawn as SVG charts and laid out in one self-contained HTML file for
//! people who will never open a terminal.

pub mod charts;
pub mod frontier;
pub mod headline;
pub mod html;

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
    pub has_scales: bool,
    pub perplexity: f64,
    pub kl_to_base: f64,
    pub top1_agreement: f64,
    pub prefill_tokens_per_sec: Stat,
    pub decode_tokens_per_sec: Stat,
    /// Against the base model timed in the same interleaved runs: the ratio
    /// of medians, with the min–max of the per-run ratios. Exactly 1 for the base.
    pub prefill_speedup: Stat,
    pub decode_speedup: Stat,
    pub speed_kind: SpeedKind,
    /// Mode-specific facts (a draft's acceptance, a budget), label and value.
    pub details: Vec<(String, String)>,
    /// Commands that reproduce this row's numbers.
    pub commands: Vec<String>,
}

impl Row {
    pub fn is_base(&self) -> bool {
        self.method == "base"
    }

    /// Perplexity change against the base, in percent.
    pub fn perplexity_change_pct(&self, base_perplexity: f64) -> f64 {
        (self.perplexity / base_perplexity - 1.0) * 100.0
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
            has_scales: false,
            perplexity: ppl,
            kl_to_base: 0.01 * skipped as f64,
            top1_agreement: 1.0 - 0.05 * skipped as f64,
            prefill_tokens_per_sec: stat(500.0 * speed.0, 500.0 * speed.1, 500.0 * speed.2),
            decode_tokens_per_sec: stat(60.0 * speed.0, 60.0 * speed.1, 60.0 * speed.2),
            prefill_speedup: stat(speed.0, speed.1, speed.2),
            decode_speedup: stat(speed.0, speed.1, speed.2),
            speed_kind: SpeedKind::Executed,
            details: Vec::new(),
            commands: vec![format!("scalpel eval --plan {name}.json")],
        }
    }
}
