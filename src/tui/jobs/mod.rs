//! What each background job computes, on the engine alone, and the job
//! types that run it behind one interface (`interface`: a job is one type
//! with its name, lane, run and results). The worker decides when they run.

pub mod activity;
pub mod eval;
pub mod fit;
pub mod generate;
pub mod importance;
pub mod interface;
pub mod kv;
pub mod prompt_run;
pub mod routing;
pub mod search;

pub use interface::{Apply, Job, JobCx, JobLane};

use anyhow::{bail, Result};

use crate::eval::bench::BenchOptions;
use crate::eval::data::{TokenSet, DEFAULT_EVAL_TEXT};
use crate::model::{Model, RunOptions};

/// Tokens per evaluation window in the workbench (the CLI default is 512).
pub const WINDOW: usize = 256;
/// Held-out windows: short, so a re-evaluation takes seconds on a laptop CPU.
pub const HELDOUT_WINDOWS: usize = 2;
/// Calibration for importance, search and fitting: short sequences, so the
/// per-block passes and the backward passes stay quick on a CPU.
pub const CALIBRATION_SEQUENCES: usize = 4;
pub const CALIBRATION_LEN: usize = 64;

/// The token sets and settings every job shares.
pub struct Setup {
    /// The first `HELDOUT_WINDOWS` windows of the built-in held-out text.
    pub heldout: Vec<u32>,
    /// The end of the same text, disjoint from `heldout`: scores and chooses
    /// blocks and fits scales, never reports quality.
    pub calibration: TokenSet,
    /// A slice from the middle, disjoint from both: picks the fit's best epoch.
    pub validation: TokenSet,
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
        let calib = CALIBRATION_SEQUENCES * CALIBRATION_LEN;
        if ids.len() < held + calib + 2 * CALIBRATION_LEN {
            bail!("the built-in evaluation text is too short for this tokenizer");
        }
        let chunks = |from: usize, n: usize| {
            (0..n)
                .map(|i| ids[from + i * CALIBRATION_LEN..from + (i + 1) * CALIBRATION_LEN].to_vec())
                .collect::<Vec<_>>()
        };
        let calibration = TokenSet::from_id_sequences(
            &format!("GPL-3 text, last {CALIBRATION_SEQUENCES}×{CALIBRATION_LEN} tokens"),
            chunks(ids.len() - calib, CALIBRATION_SEQUENCES),
        )?;
        let validation = TokenSet::from_id_sequences(
            &format!("GPL-3 text, 2×{CALIBRATION_LEN} tokens from the middle"),
            chunks(ids.len() / 2, 2),
        )?;
        let quantized = model.has_quantized && model.device().is_cpu();
        let run = RunOptions {
            quantized,
            ..RunOptions::FAST
        };
        Ok(Self {
            heldout: ids[..held].to_vec(),
            calibration,
            validation,
            window: WINDOW,
            bench: BenchOptions {
                prefill_tokens: 32,
                decode_tokens: 8,
                context_tokens: 16,
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
        format!("calibration: {} (disjoint)", self.calibration.source)
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
