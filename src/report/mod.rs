//! Trade-off reports: each plan measured on one model (quality, speed),
//! drawn as SVG charts and laid out in one self-contained HTML file for
//! people who will never open a terminal.

pub mod charts;
pub mod html;

use serde::Serialize;

/// One plan's measured numbers (the base model is a row too).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    pub skipped: Vec<String>,
    pub has_scales: bool,
    pub perplexity: f64,
    pub kl_to_base: f64,
    pub top1_agreement: f64,
    pub prefill_tokens_per_sec: f64,
    pub decode_tokens_per_sec: f64,
    /// Measured against the base model in the same benchmark run.
    pub prefill_speedup: f64,
    pub decode_speedup: f64,
}

/// How the numbers were measured, printed with them.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub model: String,
    pub text: String,
    pub tokens: usize,
    pub windows: usize,
    pub window: usize,
    pub threads: usize,
    pub device: String,
    pub weights: String,
    pub bench: String,
    pub generated_by: String,
}

/// Everything a report shows.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub title: String,
    pub rows: Vec<Row>,
    pub settings: Settings,
}
