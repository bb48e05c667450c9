//! One interface for background work, so a mode's job is one new type
//! rather than a variant in `Request`, the worker and `Update`: the type
//! says what it is called, which lane runs it, what it computes (progress
//! and cancellation through `JobCx`), and what each of its results changes
//! in the app (an `Apply`, run on the UI thread). The worker routes a
//! `Request::Run` by its lane and knows nothing else of the job.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;

use super::activity::{Activity, Busy, Running};
use super::Setup;
use crate::model::Model;
use crate::plan::Plan;
use crate::tui::app::{App, Origin, Request, Update};

/// Which worker thread runs a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobLane {
    /// Long jobs (importance, search, fit): one at a time, queued behind
    /// the running one; Esc cancels. They report through `JobStarted`,
    /// `JobProgress` and `JobFinished`/`JobFailed`/`JobCancelled`.
    Long,
    /// The generation panel's runs: the latest wins, cancelling the older.
    Gen,
    /// A view's quick computation (the routing view's decisions): the
    /// latest wins, beside the long jobs and generation.
    Glance,
}

/// Background work of any mode.
pub trait Job: Send + fmt::Debug {
    /// What the job is, for messages (`importance`, `draft run`).
    fn name(&self) -> String;
    fn lane(&self) -> JobLane;
    /// Runs on the lane's thread; results go back through `cx.apply`.
    fn run(self: Box<Self>, cx: &JobCx);
}

/// A job's result, folded into the app on the UI thread.
pub trait Apply: Send + fmt::Debug {
    fn apply(self: Box<Self>, app: &mut App) -> Vec<Request>;
}

/// What a running job may use: the model, the measuring setup, its cancel
/// flag, the activity register (to mark speeds taken beside it) and the
/// channel back to the app.
pub struct JobCx<'a> {
    pub model: &'a Model,
    pub setup: &'a Setup,
    cancel: &'a AtomicBool,
    activity: &'a Activity,
    tx: &'a Sender<Update>,
    measure: &'a (dyn Fn(&Plan, Origin) + Sync),
}

impl<'a> JobCx<'a> {
    pub fn new(
        model: &'a Model,
        setup: &'a Setup,
        cancel: &'a AtomicBool,
        activity: &'a Activity,
        tx: &'a Sender<Update>,
        measure: &'a (dyn Fn(&Plan, Origin) + Sync),
    ) -> Self {
        Self {
            model,
            setup,
            cancel,
            activity,
            tx,
            measure,
        }
    }

    /// Held-out quality of a plan for the chart, through the worker's
    /// cache of measured plans (sends `Quality`, or `EvalFailed`).
    pub fn measure(&self, plan: &Plan, origin: Origin) {
        (self.measure)(plan, origin)
    }

    /// Set when the user cancels or a newer job replaces this one.
    pub fn cancel(&self) -> &AtomicBool {
        self.cancel
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    pub fn send(&self, update: Update) {
        // The UI has gone when this fails; the job's result no longer matters.
        let _ = self.tx.send(update);
    }

    /// Sends a result to be applied to the app.
    pub fn apply(&self, result: impl Apply + 'static) {
        self.send(Update::Job(Box::new(result)));
    }

    /// Marks the job as competing for the cores until the guard drops.
    pub fn busy(&self, what: Busy) -> Running {
        self.activity.enter(what)
    }
}
