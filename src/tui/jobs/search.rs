//! The Hopscotch search (the `surgery` engine), reported as progress the
//! workbench can show: candidates refitted of all, live loss, each chosen block.

use std::sync::atomic::AtomicBool;

use anyhow::Result;

use super::Setup;
use crate::model::Model;
use crate::plan::Plan;
use crate::surgery::hopscotch::{search, SearchEvent, SearchOptions, SearchResult};
use crate::surgery::objective::LossKind;

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
