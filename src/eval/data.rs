//! Calibration and held-out token sets, without the model's training data:
//! prompts kept in `assets/prompts/` answered greedily by the base model
//! through its chat template (loss on the answer tokens only), or a user's
//! text file (every token scored). Generated sets are cached on disk, keyed
//! by the model's identity, the prompt set and the size settings.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::eval::generate::{generate, GenOptions};
use crate::model::{Model, RunOptions};
use crate::plan::{write_atomic, Plan};

/// The held-out text used when `eval` gets no `--text` (Debian's GPL-3, as
/// in shared/peers); the workbench cuts its held-out and calibration sets from it.
pub const DEFAULT_EVAL_TEXT: &str = include_str!("../../assets/gpl-3.txt");
pub const CALIBRATION_PROMPTS: &str = include_str!("../../assets/prompts/calibration.txt");
pub const HELDOUT_PROMPTS: &str = include_str!("../../assets/prompts/heldout.txt");

/// Tokens per sequence when a text file is cut into sequences.
pub const TEXT_SEQUENCE_TOKENS: usize = 256;
/// Fewest tokens a user's text must give to be worth fitting on.
const MIN_TEXT_TOKENS: usize = 16;
/// Bump when the cached format or the generation procedure changes.
const CACHE_VERSION: u32 = 1;

/// One sequence: `ids[j]` for `j >= scored_from` is scored from the logits
/// at `j - 1` (the answer tokens of a chat sample; all but the first token of text).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub scored_from: usize,
}

impl Sequence {
    pub fn scored(&self) -> usize {
        self.ids.len().saturating_sub(self.scored_from)
    }
}

/// Sequences of token ids with the positions that are scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenSet {
    /// Where it came from, for reports: `calibration prompts (64)`, a file name.
    pub source: String,
    pub sequences: Vec<Sequence>,
}

impl TokenSet {
    pub fn scored_tokens(&self) -> usize {
        self.sequences.iter().map(Sequence::scored).sum()
    }

    pub fn total_tokens(&self) -> usize {
        self.sequences.iter().map(|s| s.ids.len()).sum()
    }

    /// A set made directly from id sequences with every token after the first
    /// scored (tests on tokenizer-less models).
    pub fn from_id_sequences(source: &str, seqs: Vec<Vec<u32>>) -> Result<Self> {
        let set = Self {
            source: source.into(),
            sequences: seqs
                .into_iter()
                .map(|ids| Sequence {
                    ids,
                    scored_from: 1,
                })
                .filter(|s| s.scored() > 0)
                .collect(),
        };
        if set.sequences.is_empty() {
            bail!("{source}: no sequence with at least two tokens");
        }
        Ok(set)
    }

    /// Every `every`-th sequence as a validation set (choosing a fit's best
    /// epoch without touching the held-out data), the rest for training. A
    /// set too small to split is used for both.
    pub fn split_validation(&self, every: usize) -> (Self, Self) {
        let every = every.max(2);
        if self.sequences.len() < every {
            return (self.clone(), self.clone());
        }
        let (mut train, mut validation) = (Vec::new(), Vec::new());
        for (i, seq) in self.sequences.iter().enumerate() {
            if i % every == every - 1 {
                validation.push(seq.clone());
            } else {
                train.push(seq.clone());
            }
        }
        let named = |part: &str, sequences| Self {
            source: format!("{} ({part})", self.source),
            sequences,
        };
        (
            named("training part", train),
            named("validation part", validation),
        )
    }

    /// The first `n` sequences (cheap subsets for tests and quick runs).
    pub fn take(&self, n: usize) -> Self {
        Self {
            source: self.source.clone(),
            sequences: self.sequences.iter().take(n).cloned().collect(),
        }
    }
}

/// Which built-in prompt set to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptSet {
    Calibration,
    HeldOut,
}

impl PromptSet {
    fn name(self) -> &'static str {
        match self {
            PromptSet::Calibration => "calibration",
            PromptSet::HeldOut => "heldout",
        }
    }

    fn text(self) -> &'static str {
        match self {
            PromptSet::Calibration => CALIBRATION_PROMPTS,
            PromptSet::HeldOut => HELDOUT_PROMPTS,
        }
    }
}

/// How to build a set.
#[derive(Debug, Clone)]
pub struct DataOptions {
    /// A user's text file instead of self-generated answers.
    pub text_file: Option<PathBuf>,
    /// Prompts answered (at most the set's size).
    pub samples: usize,
    pub max_answer_tokens: usize,
    /// Where generated sets are cached; `None` = scalpel's cache folder.
    pub cache_dir: Option<PathBuf>,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            text_file: None,
            samples: 32,
            max_answer_tokens: 96,
            cache_dir: None,
        }
    }
}

/// Calibration data (fitting and search): `--calib FILE` or the built-in prompts.
pub fn calibration_set(
    model: &Model,
    opts: &DataOptions,
    cancel: &AtomicBool,
    progress: impl FnMut(usize, usize),
) -> Result<TokenSet> {
    build(model, opts, PromptSet::Calibration, cancel, progress)
}

/// Held-out data (epoch selection and every reported number): `--eval-text FILE`
/// or the held-out prompts, which share nothing with the calibration prompts.
pub fn heldout_set(
    model: &Model,
    opts: &DataOptions,
    cancel: &AtomicBool,
    progress: impl FnMut(usize, usize),
) -> Result<TokenSet> {
    build(model, opts, PromptSet::HeldOut, cancel, progress)
}

fn build(
    model: &Model,
    opts: &DataOptions,
    set: PromptSet,
    cancel: &AtomicBool,
    progress: impl FnMut(usize, usize),
) -> Result<TokenSet> {
    match &opts.text_file {
        Some(path) => text_file_set(model, path),
        None => generated_set(model, opts, set, cancel, progress),
    }
}

/// Cuts a text file into sequences of `TEXT_SEQUENCE_TOKENS`, all scored.
pub fn text_file_set(model: &Model, path: &Path) -> Result<TokenSet> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let ids = model.codec()?.encode(text.trim())?;
    if ids.len() < MIN_TEXT_TOKENS {
        bail!(
            "{} has no usable text ({} tokens; at least {MIN_TEXT_TOKENS} are needed)",
            path.display(),
            ids.len()
        );
    }
    let bos = model
        .cfg()
        .add_bos
        .then_some(model.cfg().bos_token_id)
        .flatten();
    let seqs = ids
        .chunks(TEXT_SEQUENCE_TOKENS)
        .map(|c| bos.into_iter().chain(c.iter().copied()).collect())
        .collect();
    TokenSet::from_id_sequences(&path.display().to_string(), seqs)
}

/// The prompts of a set file: one per line, `#` comments and blanks dropped.
pub fn prompts(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

fn cache_path(model: &Model, opts: &DataOptions, set: PromptSet) -> PathBuf {
    let mut h = Sha256::new();
    h.update(CACHE_VERSION.to_le_bytes());
    h.update(set.text().as_bytes());
    h.update((opts.samples as u64).to_le_bytes());
    h.update((opts.max_answer_tokens as u64).to_le_bytes());
    let key = format!("{:x}", h.finalize());
    let dir = opts
        .cache_dir
        .clone()
        .unwrap_or_else(|| crate::model::source::cache_dir().join("data"));
    let model_key: String = model.identity.content_hash.chars().take(16).collect();
    dir.join(format!("{model_key}-{}-{}.json", set.name(), &key[..16]))
}

/// Answers the set's prompts greedily with the base model (f32 weights),
/// or reads them from the cache.
fn generated_set(
    model: &Model,
    opts: &DataOptions,
    set: PromptSet,
    cancel: &AtomicBool,
    mut progress: impl FnMut(usize, usize),
) -> Result<TokenSet> {
    if opts.samples == 0 {
        bail!("--calib-samples must be at least 1");
    }
    if opts.max_answer_tokens == 0 {
        bail!("--max-answer-tokens must be at least 1");
    }
    let path = cache_path(model, opts, set);
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(ts) = serde_json::from_str::<TokenSet>(&text) {
            return Ok(ts);
        }
    }
    let codec = model.codec()?;
    let all = prompts(set.text());
    let chosen = &all[..opts.samples.min(all.len())];
    let gen = GenOptions {
        max_new_tokens: opts.max_answer_tokens,
        temperature: 0.0,
        seed: 0,
        stop_at_eos: true,
        run: RunOptions::FAST,
    };
    let mut sequences = Vec::with_capacity(chosen.len());
    for (i, prompt) in chosen.iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            bail!("cancelled while generating the {} set", set.name());
        }
        let mut ids = codec.encode_with_specials(&codec.chat_prompt(prompt)?)?;
        let scored_from = ids.len();
        let report = generate(model, &ids, &Plan::base(), gen, |_| Ok(()))?;
        ids.extend(report.new_tokens);
        if ids.len() > scored_from {
            sequences.push(Sequence { ids, scored_from });
        }
        progress(i + 1, chosen.len());
    }
    let ts = TokenSet {
        source: format!("{} prompts ({})", set.name(), sequences.len()),
        sequences,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    write_atomic(&path, serde_json::to_string(&ts)?.as_bytes())?;
    Ok(ts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_files_parse_and_do_not_overlap() {
        let cal = prompts(CALIBRATION_PROMPTS);
        let held = prompts(HELDOUT_PROMPTS);
        assert!(cal.len() >= 32 && held.len() >= 16);
        assert!(held.iter().all(|p| !cal.contains(p)));
    }

    #[test]
    fn sets_count_scored_tokens() {
        let ts =
            TokenSet::from_id_sequences("t", vec![vec![1, 2, 3], vec![4], vec![5, 6]]).unwrap();
        assert_eq!(ts.sequences.len(), 2);
        assert_eq!(ts.scored_tokens(), 3);
        assert!(TokenSet::from_id_sequences("t", vec![vec![1]]).is_err());
    }

    #[test]
    fn every_fourth_sequence_validates_and_the_rest_train() {
        let seqs: Vec<Vec<u32>> = (0..9).map(|i| vec![i, i + 100]).collect();
        let ts = TokenSet::from_id_sequences("t", seqs).unwrap();
        let (train, val) = ts.split_validation(4);
        let firsts = |s: &TokenSet| s.sequences.iter().map(|q| q.ids[0]).collect::<Vec<_>>();
        assert_eq!(firsts(&val), vec![3, 7]);
        assert_eq!(firsts(&train), vec![0, 1, 2, 4, 5, 6, 8]);
        // Too small to split: both parts are the whole set.
        let (a, b) = ts.take(3).split_validation(4);
        assert_eq!((a.sequences.len(), b.sequences.len()), (3, 3));
    }
}
