//! The Hopscotch search (the `surgery` engine), reported as progress the
//! workbench can show: candidates refitted of all, live loss, each chosen
//! block; the job that runs it (`SearchJob`) and its result (`Step`).

use std::sync::atomic::AtomicBool;

use anyhow::Result;

use super::activity::Busy;
use super::interface::{Apply, Job, JobCx, JobLane};
use super::Setup;
use crate::model::Model;
use crate::plan::Plan;
use crate::surgery::hopscotch::{search, SearchEvent, SearchOptions, SearchResult};
use crate::surgery::objective::LossKind;
use crate::tui::app::{App, JobKind, Origin, Request, Update};

pub const NAME: &str = "Hopscotch search (attention blocks, KL, scales refitted)";

pub enum Event {
    Progress {
        done: usize,
        total: usize,
        loss: Option<f64>,
        detail: String,
    },
    /// A block was chosen: the skips so far (their refitted scales come with the final plan).
    Chosen(Plan),
}

/// Skips `k` attention blocks from the base model, then fits the final scales.
pub fn hopscotch(
    model: &Model,
    setup: &Setup,
    k: usize,
    cancel: &AtomicBool,
    mut on: impl FnMut(Event),
) -> Result<SearchResult> {
    let opts = SearchOptions::new(k, LossKind::Kl);
    let (mut done, mut total) = (0, 0);
    let mut chosen = Vec::new();
    search(
        model,
        &setup.calibration,
        &setup.validation,
        &opts,
        cancel,
        |e| match e {
            SearchEvent::Preparing => on(Event::Progress {
                done,
                total,
                loss: None,
                detail: "base states".into(),
            }),
            SearchEvent::Resumed { .. } => {}
            SearchEvent::Screening {
                step,
                done: d,
                total: t,
            } => on(Event::Progress {
                done,
                total,
                loss: None,
                detail: format!("step {step}/{k} screen {d}/{t}"),
            }),
            SearchEvent::Candidate {
                step,
                block,
                loss,
                done: d,
                total: t,
                ..
            } => {
                (done, total) = (*d, *t);
                on(Event::Progress {
                    done,
                    total,
                    loss: Some(*loss),
                    detail: format!("step {step}/{k} refit {block}"),
                })
            }
            SearchEvent::StepDone { chosen: b, .. } => {
                chosen.push(*b);
                on(Event::Chosen(Plan::with_skips(chosen.iter().copied())))
            }
            SearchEvent::Fitting(epoch) => on(Event::Progress {
                done,
                total,
                loss: Some(epoch.heldout_loss),
                detail: format!("final fit, epoch {}", epoch.epoch),
            }),
        },
    )
}

/// Skips `k` attention blocks, each chosen plan becoming the current one
/// and measured for the chart as it comes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchJob {
    pub k: usize,
}

impl Job for SearchJob {
    fn name(&self) -> String {
        JobKind::Search { k: self.k }.label()
    }

    fn lane(&self) -> JobLane {
        JobLane::Long
    }

    fn run(self: Box<Self>, cx: &JobCx) {
        let _busy = cx.busy(Busy::Search);
        let r = hopscotch(cx.model, cx.setup, self.k, cx.cancel(), |e| match e {
            Event::Progress {
                done,
                total,
                loss,
                detail,
            } => cx.send(Update::JobProgress {
                done,
                total,
                loss,
                detail,
            }),
            Event::Chosen(plan) => {
                cx.apply(Step(plan.clone()));
                cx.measure(&plan, Origin::Search);
            }
        });
        match r {
            Ok(res) if res.cancelled && res.steps.is_empty() => cx.send(Update::JobCancelled),
            Ok(res) => {
                // The final plan carries the fitted scales (or the last step's, if cancelled).
                cx.apply(Step(res.plan.clone()));
                cx.measure(&res.plan, Origin::Search);
                if res.cancelled {
                    cx.send(Update::JobCancelled);
                } else {
                    cx.send(Update::JobFinished(format!(
                        "search done: {}",
                        res.plan.describe()
                    )));
                }
            }
            Err(_) if cx.cancelled() => cx.send(Update::JobCancelled),
            Err(e) => cx.send(Update::JobFailed(format!("search: {e:#}"))),
        }
    }
}

/// The search chose a block: its plan becomes the current one.
#[derive(Debug, Clone, PartialEq)]
pub struct Step(pub Plan);

impl Apply for Step {
    fn apply(self: Box<Self>, app: &mut App) -> Vec<Request> {
        let plan = self.0;
        if &plan == app.plan() {
            return vec![];
        }
        app.record_mut(&plan, Origin::Search);
        if let Some(added) = plan.skip.difference(&app.plan().skip).next() {
            app.cursor = *added;
        }
        app.history.truncate(app.at + 1);
        app.history.push(plan);
        app.at = app.history.len() - 1;
        app.dirty = true;
        vec![]
    }
}
