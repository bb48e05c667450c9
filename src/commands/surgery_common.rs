//! Setup shared by importance, fit, search and compare: the data sets (with
//! progress bars), Ctrl-C as a cancel flag, and fit settings.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;

use crate::cli::{DataArgs, FitSettings};
use crate::eval::data::{self, DataOptions, PromptSet, TokenSet};
use crate::model::Model;
use crate::progress;
use crate::surgery::fit::FitOptions;

/// A flag set by the first Ctrl-C, so long jobs stop cleanly and keep what
/// they have; a second Ctrl-C exits at once.
pub fn cancel_on_ctrl_c() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let _ = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nscalpel: stopping after the current sequence (Ctrl-C again to quit now)");
    });
    flag
}

pub fn fit_options(s: &FitSettings) -> FitOptions {
    FitOptions {
        epochs: s.epochs,
        lr: s.lr,
        loss: s.loss.into(),
        batch_size: s.batch_size,
        init: None,
    }
}

fn options(args: &DataArgs, text: Option<&std::path::Path>, samples: usize) -> DataOptions {
    DataOptions {
        text_file: text.map(Into::into),
        samples,
        max_answer_tokens: args.max_answer_tokens,
        cache_dir: None,
    }
}

/// Calibration data, generating (and caching) it with a progress bar if needed.
pub fn calibration(model: &Model, args: &DataArgs, cancel: &AtomicBool) -> Result<TokenSet> {
    let opts = options(args, args.calib.as_deref(), args.calib_samples);
    load_set(model, &opts, PromptSet::Calibration, cancel)
}

/// Calibration sequences in each validation set: every fourth.
const VALIDATION_EVERY: usize = 4;

/// The calibration data split into the part fits train on and the part
/// that picks their best epoch; the held-out data stays untouched.
pub fn fit_sets(calib: &TokenSet) -> (TokenSet, TokenSet) {
    let (train, validation) = calib.split_validation(VALIDATION_EVERY);
    eprintln!(
        "scalpel: fits train on {} calibration sequences and pick their best epoch on the other {}",
        train.sequences.len(),
        validation.sequences.len()
    );
    (train, validation)
}

/// Held-out data, likewise.
pub fn heldout(model: &Model, args: &DataArgs, cancel: &AtomicBool) -> Result<TokenSet> {
    let opts = options(args, args.eval_text.as_deref(), args.heldout_samples);
    load_set(model, &opts, PromptSet::HeldOut, cancel)
}

fn load_set(
    model: &Model,
    opts: &DataOptions,
    which: PromptSet,
    cancel: &AtomicBool,
) -> Result<TokenSet> {
    let label = match which {
        PromptSet::Calibration => "calibration",
        PromptSet::HeldOut => "held-out",
    };
    let pb = progress::bar(opts.samples, label);
    let progress = |d: usize, t: usize| {
        pb.set_length(t as u64);
        pb.set_position(d as u64)
    };
    let set = match which {
        PromptSet::Calibration => data::calibration_set(model, opts, cancel, progress),
        PromptSet::HeldOut => data::heldout_set(model, opts, cancel, progress),
    };
    pb.finish_and_clear();
    let set = set?;
    eprintln!(
        "scalpel: {label} data: {} — {} sequences, {} scored tokens",
        set.source,
        set.sequences.len(),
        set.scored_tokens()
    );
    Ok(set)
}
