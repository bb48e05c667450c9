//! The Hopscotch greedy search: at each step every remaining attention block
//! (and MLP block with `include_mlp`) is tried with the scales refitted, the
//! one with the lowest calibration loss is skipped; then a final fit.
//!
//! Two modes:
//! - exact: the reference literally — each candidate refitted from scales 1
//!   for one epoch of Adam at lr 1e-2, scored by the mean of that epoch's
//!   per-batch training losses; every candidate, every step.
//! - default: the residual stream entering every layer is cached per step,
//!   so trying a candidate at layer i reruns only layers i.. with the
//!   current scales (a cheap screen, on the first `screen_samples`
//!   calibration sequences); only the `shortlist` best screened
//!   candidates are refitted, warm-started from the previous step's scales,
//!   and only the scales of layers i.. (the earlier ones cannot see the
//!   skip except through attention to it, and holding them keeps the cached
//!   inputs valid). A candidate's score is the lower of its calibration loss
//!   before and after the refit, with the scales that gave it: a refit that
//!   overshoots (few Adam steps can) never makes a candidate look worse.
//!
//! Each finished step is written to the checkpoint file, so an interrupted
//! search resumes where it stopped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::fit::{fit_with_states, EpochOutcome, FitEpoch, FitOptions, FitResult, Trainer};
use super::objective::{mean_loss_from, score_sequence, BaseStates, LayerInputs, LossKind, Start};
use super::unless_cancelled;
use crate::eval::data::TokenSet;
use crate::eval::score::{reference_logits, Reference, Scores};
use crate::model::{Model, RunOptions};
use crate::plan::{BlockId, BlockKind, LayerScales, Plan, PlanFile};
use crate::progress::eta_secs;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchOptions {
    /// Blocks to skip in total.
    pub blocks: usize,
    pub include_mlp: bool,
    pub exact: bool,
    pub loss: LossKind,
    /// Default mode: candidates refitted per step after the screen.
    pub shortlist: usize,
    /// Default mode: calibration sequences the screen uses (0: all). The
    /// shortlist is then re-measured on all of them before its refit.
    pub screen_samples: usize,
    /// The per-candidate refit (exact mode uses the reference's settings).
    pub refit: FitOptions,
    pub final_fit: FitOptions,
    /// Where each finished step is written (a plan file).
    #[serde(skip)]
    pub checkpoint: Option<PathBuf>,
    /// Steps already done (from `load_checkpoint`), continued from.
    #[serde(skip)]
    pub resume_from: Resume,
}

/// A checkpoint's finished steps and the data they were searched on.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    pub steps: Vec<SearchStep>,
    /// The checkpoint's [`data_fingerprint`]; a resume must use the same data.
    pub data: Option<serde_json::Value>,
}

impl SearchOptions {
    /// The default mode's settings for `blocks` with the given loss.
    pub fn new(blocks: usize, loss: LossKind) -> Self {
        Self {
            blocks,
            include_mlp: false,
            exact: false,
            loss,
            shortlist: 3,
            screen_samples: 8,
            refit: FitOptions {
                epochs: 1,
                lr: 3e-3,
                loss,
                batch_size: 4,
                init: None,
            },
            final_fit: FitOptions {
                loss,
                ..FitOptions::default()
            },
            checkpoint: None,
            resume_from: Resume::default(),
        }
    }

    /// The reference's settings: every candidate refitted from 1 for one
    /// epoch at lr 1e-2; final fit from 1 at lr 3e-3.
    pub fn exact(blocks: usize, loss: LossKind, batch_size: usize) -> Self {
        let mut o = Self::new(blocks, loss);
        o.exact = true;
        o.refit.lr = 1e-2;
        o.refit.batch_size = batch_size;
        o.final_fit = FitOptions {
            epochs: 10,
            lr: 3e-3,
            loss,
            batch_size,
            init: None,
        };
        o
    }

    fn kinds(&self) -> &'static [BlockKind] {
        if self.include_mlp {
            &[BlockKind::Attn, BlockKind::Mlp]
        } else {
            &[BlockKind::Attn]
        }
    }

    /// Refuses settings that cannot run on a model of `n_layers` (call it
    /// before generating data, so a typo fails at once).
    pub fn validate(&self, n_layers: usize) -> Result<()> {
        let available = n_layers * self.kinds().len();
        if self.blocks == 0 {
            bail!("--blocks must be at least 1");
        }
        if self.blocks > available {
            bail!(
                "--blocks {} is more than the model's {available} candidate blocks ({n_layers} layers{})",
                self.blocks,
                if self.include_mlp { ", attention and MLP" } else { ", attention only" }
            );
        }
        if self.shortlist == 0 {
            bail!("--shortlist must be at least 1");
        }
        Ok(())
    }

    /// What must match for a checkpoint to be resumed.
    fn fingerprint(&self) -> serde_json::Value {
        serde_json::json!({
            "include_mlp": self.include_mlp,
            "exact": self.exact,
            "loss": self.loss,
            "shortlist": self.shortlist,
            "screen_samples": self.screen_samples,
            "refit": {"epochs": self.refit.epochs, "lr": self.refit.lr, "batch_size": self.refit.batch_size},
        })
    }
}

/// What identifies the data a search runs on: per set, its source, size and
/// a hash of every token and scored position. It covers every data setting
/// (text file, sample count, answer length, generation seed, validation
/// split), since each of them changes the sequences.
pub fn data_fingerprint(train: &TokenSet, validation: &TokenSet) -> serde_json::Value {
    let describe = |set: &TokenSet| {
        let mut hasher = Sha256::new();
        for seq in &set.sequences {
            hasher.update((seq.ids.len() as u64).to_le_bytes());
            hasher.update((seq.scored_from as u64).to_le_bytes());
            for id in &seq.ids {
                hasher.update(id.to_le_bytes());
            }
        }
        serde_json::json!({
            "source": set.source,
            "sequences": set.sequences.len(),
            "tokens": set.total_tokens(),
            "scored_tokens": set.scored_tokens(),
            "sha256": format!("{:x}", hasher.finalize()),
        })
    };
    serde_json::json!({"calibration": describe(train), "validation": describe(validation)})
}

/// Refuses a resume whose data differ from the checkpoint's, naming what differs.
fn check_resume_data(recorded: &serde_json::Value, now: &serde_json::Value) -> Result<()> {
    let mut diffs = Vec::new();
    for set in ["calibration", "validation"] {
        for field in ["source", "sequences", "tokens", "scored_tokens", "sha256"] {
            let (was, is) = (&recorded[set][field], &now[set][field]);
            if was != is {
                diffs.push(format!("{set} {field}: checkpoint {was}, now {is}"));
            }
        }
    }
    if !diffs.is_empty() {
        bail!(
            "the checkpoint was searched on other data ({}); resume with the same data options \
             (--calib, --calib-samples, --max-answer-tokens) or start anew without --resume",
            diffs.join("; ")
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CandidateScore {
    pub block: BlockId,
    /// Default mode: loss with the current scales and no refit, on the
    /// screen's sequences.
    pub screen_loss: Option<f64>,
    /// Default mode, shortlisted candidates: the same on all the
    /// calibration sequences (what the refit is compared with).
    #[serde(default)]
    pub full_loss: Option<f64>,
    /// Loss after the refit (exact mode: mean training loss of the epoch).
    pub refit_loss: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchStep {
    /// 1-based.
    pub step: usize,
    pub chosen: BlockId,
    pub loss: f64,
    /// The refitted scales of the chosen candidate (the next step starts here).
    pub scales: Vec<LayerScales>,
    pub candidates: Vec<CandidateScore>,
    pub seconds: f64,
    pub screen_seconds: f64,
    pub refit_seconds: f64,
}

#[derive(Debug, Clone)]
pub enum SearchEvent {
    /// The calibration and held-out base states are being computed.
    Preparing,
    /// Steps taken from the checkpoint.
    Resumed {
        steps: usize,
    },
    /// Default mode: `done` of `total` sequences screened.
    Screening {
        step: usize,
        done: usize,
        total: usize,
    },
    /// A candidate's refit finished.
    Candidate {
        step: usize,
        block: BlockId,
        loss: f64,
        done: usize,
        total: usize,
        eta_secs: f64,
    },
    StepDone {
        step: usize,
        chosen: BlockId,
        loss: f64,
        seconds: f64,
    },
    Fitting(FitEpoch),
}

#[derive(Debug, Clone, Serialize)]
pub struct SearchTimings {
    pub base_states: f64,
    pub screen: f64,
    pub refit: f64,
    pub final_fit: f64,
    pub total: f64,
}

#[derive(Debug, Clone)]
pub struct SearchResult {
    /// The skips and the final fit's scales.
    pub plan: Plan,
    pub steps: Vec<SearchStep>,
    /// `None` when cancelled before the final fit began.
    pub fit: Option<FitResult>,
    pub cancelled: bool,
    pub timings: SearchTimings,
}

/// Runs (or continues) the search.
pub fn search(
    model: &Model,
    data: &TokenSet,
    validation: &TokenSet,
    opts: &SearchOptions,
    cancel: &AtomicBool,
    mut on_event: impl FnMut(&SearchEvent),
) -> Result<SearchResult> {
    let t_all = Instant::now();
    let n = model.n_layers();
    opts.validate(n)?;
    let kinds = opts.kinds();
    let available = n * kinds.len();
    let data_fp = data_fingerprint(data, validation);
    let mut steps = opts.resume_from.steps.clone();
    if !steps.is_empty() {
        let recorded = opts
            .resume_from
            .data
            .as_ref()
            .context("the checkpoint does not record its data; start the search anew")?;
        check_resume_data(recorded, &data_fp)?;
    }
    if steps.len() > opts.blocks {
        steps.truncate(opts.blocks);
    }
    if !steps.is_empty() {
        on_event(&SearchEvent::Resumed { steps: steps.len() });
    }
    on_event(&SearchEvent::Preparing);
    let t = Instant::now();
    let base = BaseStates::for_loss(model, opts.loss, data, cancel)?;
    let held_base = BaseStates::for_loss(model, opts.loss, validation, cancel)?;
    let mut timings = SearchTimings {
        base_states: t.elapsed().as_secs_f64(),
        screen: 0.0,
        refit: 0.0,
        final_fit: 0.0,
        total: 0.0,
    };
    // ETA: seconds per refitted candidate so far, times those left.
    let per_step = |k: usize| {
        if opts.exact {
            available - k
        } else {
            opts.shortlist.min(available - k)
        }
    };
    let total_candidates: usize = (0..opts.blocks).map(per_step).sum();
    let mut done_candidates: usize = (0..steps.len()).map(per_step).sum();
    let first_done = done_candidates;
    let t_search = Instant::now();

    while steps.len() < opts.blocks {
        let k = steps.len();
        let mut plan = Plan::with_skips(steps.iter().map(|s| s.chosen));
        let scales = steps
            .last()
            .map(|s| s.scales.clone())
            .unwrap_or_else(|| vec![LayerScales::IDENTITY; n]);
        plan.scales = Some(scales.clone());
        let candidates: Vec<BlockId> = (0..n)
            .flat_map(|l| kinds.iter().map(move |&kind| BlockId { layer: l, kind }))
            .filter(|b| !plan.is_skipped(*b))
            .collect();
        let t_step = Instant::now();

        // Which candidates get a refit, with their screen losses.
        let inputs = if opts.exact {
            None
        } else {
            let Some(i) =
                unless_cancelled(LayerInputs::compute(model, data, &plan, cancel), cancel)?
            else {
                return finish_cancelled(steps, timings, t_all);
            };
            Some(i)
        };
        let (shortlist, mut scores) = match &inputs {
            None => {
                let scores: Vec<CandidateScore> = candidates
                    .iter()
                    .map(|&block| CandidateScore {
                        block,
                        screen_loss: None,
                        full_loss: None,
                        refit_loss: None,
                    })
                    .collect();
                (candidates.clone(), scores)
            }
            Some(inputs) => {
                let screened = screen(
                    model,
                    data,
                    base.as_ref(),
                    &plan,
                    &candidates,
                    opts.loss,
                    inputs,
                    opts.screen_samples,
                    cancel,
                    |d, t| {
                        on_event(&SearchEvent::Screening {
                            step: k + 1,
                            done: d,
                            total: t,
                        })
                    },
                );
                let Some(screened) = unless_cancelled(screened, cancel)? else {
                    return finish_cancelled(steps, timings, t_all);
                };
                let mut order: Vec<usize> = (0..candidates.len()).collect();
                order.sort_by(|&a, &b| screened[a].total_cmp(&screened[b]));
                let short: Vec<BlockId> = order
                    .iter()
                    .take(opts.shortlist)
                    .map(|&i| candidates[i])
                    .collect();
                let scores = candidates
                    .iter()
                    .zip(&screened)
                    .map(|(&block, &l)| CandidateScore {
                        block,
                        screen_loss: Some(l),
                        full_loss: None,
                        refit_loss: None,
                    })
                    .collect();
                (short, scores)
            }
        };
        let screen_seconds = t_step.elapsed().as_secs_f64();
        timings.screen += screen_seconds;

        let t_refit = Instant::now();
        let mut best: Option<(BlockId, f64, Vec<LayerScales>)> = None;
        for &block in &shortlist {
            let mut cand = plan.clone();
            cand.skip.insert(block);
            cand.scales = None;
            let mut fo = opts.refit.clone();
            fo.loss = opts.loss;
            fo.init = if opts.exact {
                None
            } else {
                Some(scales.clone())
            };
            let start = match &inputs {
                Some(i) => Start::Layer(block.layer, i),
                None => Start::Embeddings,
            };
            // The loss before the refit, on the data the refit is scored on:
            // the screen's when it saw every sequence, else measured now.
            let entry = scores
                .iter()
                .position(|s| s.block == block)
                .context("a shortlisted block has no score")?;
            let before = if opts.exact {
                None
            } else {
                let screened_all =
                    opts.screen_samples == 0 || opts.screen_samples >= data.sequences.len();
                let full = match scores[entry].screen_loss {
                    Some(l) if screened_all => l,
                    _ => {
                        let mut p = plan.clone();
                        p.skip.insert(block);
                        let measured = mean_loss_from(
                            model,
                            data,
                            base.as_ref(),
                            &p,
                            opts.loss,
                            start,
                            cancel,
                        );
                        let Some(l) = unless_cancelled(measured, cancel)? else {
                            return finish_cancelled(steps, timings, t_all);
                        };
                        l
                    }
                };
                scores[entry].full_loss = Some(full);
                Some(full)
            };
            let refit = refit_candidate(
                model,
                &cand,
                data,
                base.as_ref(),
                &fo,
                opts.exact,
                start,
                cancel,
            )?;
            let Some((refit_loss, fitted)) = refit else {
                return finish_cancelled(steps, timings, t_all);
            };
            scores[entry].refit_loss = Some(refit_loss);
            // The better of before and after the refit, with its scales.
            let (loss, fitted) = match before {
                Some(before) if before <= refit_loss => (before, scales.clone()),
                _ => (refit_loss, fitted),
            };
            if best.as_ref().is_none_or(|b| loss < b.1) {
                best = Some((block, loss, fitted));
            }
            done_candidates += 1;
            on_event(&SearchEvent::Candidate {
                step: k + 1,
                block,
                loss,
                done: done_candidates,
                total: total_candidates,
                eta_secs: eta_secs(
                    t_search.elapsed().as_secs_f64(),
                    done_candidates - first_done,
                    total_candidates - first_done,
                ),
            });
        }
        let refit_seconds = t_refit.elapsed().as_secs_f64();
        timings.refit += refit_seconds;
        let (chosen, loss, fitted) = best.context("no candidate could be refitted")?;
        let step = SearchStep {
            step: k + 1,
            chosen,
            loss,
            scales: fitted,
            candidates: scores,
            seconds: t_step.elapsed().as_secs_f64(),
            screen_seconds,
            refit_seconds,
        };
        on_event(&SearchEvent::StepDone {
            step: k + 1,
            chosen,
            loss,
            seconds: step.seconds,
        });
        steps.push(step);
        if let Some(path) = &opts.checkpoint {
            save_checkpoint(model, &steps, None, opts, &data_fp, path)?;
        }
    }

    // Final fit, keeping the best held-out epoch.
    let t_fit = Instant::now();
    let plan = Plan::with_skips(steps.iter().map(|s| s.chosen));
    let mut fo = opts.final_fit.clone();
    fo.loss = opts.loss;
    if !opts.exact {
        fo.init = steps.last().map(|s| s.scales.clone());
    }
    let fit = fit_with_states(
        model,
        &plan,
        data,
        base.as_ref(),
        validation,
        held_base.as_ref(),
        &fo,
        cancel,
        &mut |e| on_event(&SearchEvent::Fitting(e.clone())),
    )?;
    timings.final_fit = t_fit.elapsed().as_secs_f64();
    timings.total = t_all.elapsed().as_secs_f64();
    if let Some(path) = &opts.checkpoint {
        save_checkpoint(model, &steps, Some(&fit), opts, &data_fp, path)?;
    }
    Ok(SearchResult {
        plan: fit.plan.clone(),
        cancelled: fit.cancelled,
        fit: Some(fit),
        steps,
        timings,
    })
}

fn finish_cancelled(
    steps: Vec<SearchStep>,
    mut timings: SearchTimings,
    t_all: Instant,
) -> Result<SearchResult> {
    timings.total = t_all.elapsed().as_secs_f64();
    let mut plan = Plan::with_skips(steps.iter().map(|s| s.chosen));
    plan.scales = steps.last().map(|s| s.scales.clone());
    Ok(SearchResult {
        plan,
        steps,
        fit: None,
        cancelled: true,
        timings,
    })
}

/// Loss of every candidate skipped on top of `plan` (its scales held), from
/// the cached residual stream entering the candidate's layer.
#[allow(clippy::too_many_arguments)]
fn screen(
    model: &Model,
    data: &TokenSet,
    base: Option<&BaseStates>,
    plan: &Plan,
    candidates: &[BlockId],
    kind: LossKind,
    inputs: &LayerInputs,
    samples: usize,
    cancel: &AtomicBool,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<f64>> {
    let run = RunOptions::FAST;
    if kind == LossKind::Kl && base.is_none() {
        bail!("the KL loss needs the base model's states");
    }
    let mut scores = vec![Scores::default(); candidates.len()];
    let n_seq = match samples {
        0 => data.sequences.len(),
        n => n.min(data.sequences.len()),
    };
    let sequences = &data.sequences[..n_seq];
    for (si, seq) in sequences.iter().enumerate() {
        // The base logits are the same for every candidate: compute them once.
        let base_logits = match base {
            Some(b) if kind == LossKind::Kl => Some(reference_logits(model, &b.hidden[si], run)?),
            _ => None,
        };
        for (ci, &c) in candidates.iter().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                bail!("cancelled");
            }
            let mut p = plan.clone();
            p.skip.insert(c);
            let h = Start::Layer(c.layer, inputs).forward(model, seq, si, &p, &p, run)?;
            let b = base_logits.as_deref().map(Reference::Logits);
            scores[ci].add(&score_sequence(model, seq, &h, b, run)?);
        }
        progress(si + 1, n_seq);
    }
    Ok(scores.iter().map(|s| kind.mean(s)).collect())
}

/// Refits one candidate plan; returns its score and scales, or `None` if cancelled.
/// Exact: the mean of the epoch's per-batch training losses (the reference's
/// score). Default: the calibration loss after the refit. A non-finite loss
/// lowers the learning rate and retries.
#[allow(clippy::too_many_arguments)]
pub fn refit_candidate(
    model: &Model,
    plan: &Plan,
    data: &TokenSet,
    base: Option<&BaseStates>,
    opts: &FitOptions,
    exact: bool,
    start: Start,
    cancel: &AtomicBool,
) -> Result<Option<(f64, Vec<LayerScales>)>> {
    let mut trainer = Trainer::new(model, plan, data, base, opts)?;
    if let Start::Layer(layer, inputs) = start {
        trainer = trainer.starting_at(layer, inputs);
    }
    let initial = trainer.params().values()?;
    let mut last = Vec::new();
    let mut epoch = 0;
    let mut cuts = 0;
    while epoch < opts.epochs {
        match trainer.epoch(cancel)? {
            EpochOutcome::Cancelled => return Ok(None),
            EpochOutcome::NonFinite => {
                cuts += 1;
                if cuts > 3 {
                    bail!(
                        "refitting {} kept giving a non-finite loss",
                        plan.describe()
                    );
                }
                trainer.params().restore(&initial)?;
                let lr = trainer.lr / 10.0;
                trainer.reset_optimizer(lr)?;
                epoch = 0;
            }
            EpochOutcome::Done(l) => {
                last = l;
                epoch += 1;
            }
        }
    }
    let scales = trainer.scales()?;
    let score = if exact {
        last.iter().sum::<f64>() / last.len().max(1) as f64
    } else {
        let p = trainer.plan_with_scales()?;
        mean_loss_from(model, data, base, &p, opts.loss, start, cancel)?
    };
    Ok(Some((score, scales)))
}

/// Writes the search so far as a valid plan file: the skips of the finished
/// steps with the last step's scales (or the final fit's).
pub fn save_checkpoint(
    model: &Model,
    steps: &[SearchStep],
    fit: Option<&FitResult>,
    opts: &SearchOptions,
    data: &serde_json::Value,
    path: &Path,
) -> Result<()> {
    let mut plan = Plan::with_skips(steps.iter().map(|s| s.chosen));
    plan.scales = match fit {
        Some(f) => f.plan.scales.clone(),
        None => steps.last().map(|s| s.scales.clone()),
    };
    let mut pf = PlanFile::new(model.identity.clone(), plan);
    pf.metrics
        .insert("search_steps".into(), serde_json::to_value(steps)?);
    if let Some(f) = fit {
        pf.metrics
            .insert("fit_history".into(), serde_json::to_value(&f.history)?);
        pf.metrics
            .insert("fit_best_epoch".into(), f.best_epoch.into());
    }
    pf.provenance.insert("command".into(), "search".into());
    pf.provenance.insert(
        "search".into(),
        serde_json::json!({
            "blocks": opts.blocks,
            "complete": fit.is_some_and(|f| !f.cancelled) && steps.len() >= opts.blocks,
            "settings": opts.fingerprint(),
            "data": data,
        }),
    );
    pf.save(path)
}

/// The finished steps in a checkpoint, checked against the model and
/// settings (its data are checked when the search starts).
pub fn load_checkpoint(model: &Model, opts: &SearchOptions, path: &Path) -> Result<Resume> {
    let pf = model.load_plan(path)?;
    let settings = pf
        .provenance
        .get("search")
        .and_then(|s| s.get("settings"))
        .with_context(|| {
            format!(
                "{} is not a search checkpoint (no search settings)",
                path.display()
            )
        })?;
    if *settings != opts.fingerprint() {
        bail!(
            "{} was made with different search settings ({settings}); resume with the same options or start anew",
            path.display()
        );
    }
    let steps = pf
        .metrics
        .get("search_steps")
        .with_context(|| format!("{} has no search steps", path.display()))?;
    let steps = serde_json::from_value(steps.clone())
        .with_context(|| format!("{}: malformed search steps", path.display()))?;
    let data = pf.provenance["search"].get("data").cloned();
    Ok(Resume { steps, data })
}
