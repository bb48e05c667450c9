//! What each background job computes, on the engine alone. The worker
//! decides when they run; these functions only measure.

pub mod eval;
pub mod generate;
pub mod importance;
pub mod search;

use anyhow::{bail, Result};

use crate::commands::eval::DEFAULT_EVAL_TEXT;
use crate::eval::bench::BenchOptions;
use crate::model::{Model, RunOptions};

/// Tokens per evaluation window in the workbench (the CLI default is 512).
pub const WINDOW: usize = 256;
/// Held-out windows: short, so a re-evaluation takes seconds on a laptop CPU.
pub const HELDOUT_WINDOWS: usize = 2;
/// Calibration tokens for importance and search: one pass per candidate block.
pub const CALIBRATION_TOKENS: usize = 128;

/// The token sets and settings every job shares.
pub struct Setup {
    /// The first `HELDOUT_WINDOWS` windows of the built-in held-out text.
    pub heldout: Vec<u32>,
    /// The last window of the same text: disjoint from `heldout`, used to
    /// score and choose blocks, never to report quality.
    pub calibration: Vec<u32>,
    pub window: usize,
    pub bench: BenchOptions,
    /// Weights for generation (quantized when the file has them, as `generate` does).
    pub gen_run: RunOptions,
    pub max_new_tokens: usize,
}

impl Setup {
    pub fn for_model(model: &Model) -> Result<Self> {
        let ids = model.codec()?.encode(DEFAULT_EVAL_TEXT)?;
        let held = WINDOW * HELDOUT_WINDOWS;
        if ids.len() < held + CALIBRATION_TOKENS {
            bail!("the built-in evaluation text is too short for this tokenizer");
        }
        let quantized = model.has_quantized && model.device().is_cpu();
        let run = RunOptions {
            quantized,
            ..RunOptions::FAST
        };
        Ok(Self {
            heldout: ids[..held].to_vec(),
            calibration: ids[ids.len() - CALIBRATION_TOKENS..].to_vec(),
            window: WINDOW,
            bench: BenchOptions {
                prefill_tokens: 32,
                decode_tokens: 8,
                runs: 3,
                run,
            },
            gen_run: run,
            max_new_tokens: 48,
        })
    }

    /// One-line descriptions of what the numbers are measured on.
    pub fn describe_heldout(&self) -> String {
        format!(
            "held-out: GPL-3 text, {}×{} tokens",
            self.heldout.len() / self.window,
            self.window
        )
    }

    pub fn describe_calibration(&self) -> String {
        format!(
            "calibration: last {} tokens of the GPL-3 text (disjoint)",
            self.calibration.len()
        )
    }

    pub fn describe_speed(&self) -> String {
        format!(
            "speed: {}-tok prefill, {} decode, median of {}, {} weights, {} threads",
            self.bench.prefill_tokens,
            self.bench.decode_tokens,
            self.bench.runs,
            if self.bench.run.quantized {
                "quantized"
            } else {
                "f32"
            },
            candle_core::utils::get_num_threads()
        )
    }
}
