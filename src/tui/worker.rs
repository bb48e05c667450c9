//! Background threads that own the model (through an `Arc`) and run jobs,
//! so the UI thread never waits on it. Four lanes, each one std thread:
//! evaluation (latest wins: a newer plan cancels the older one, as gitui's
//! `AsyncSingleJob`), long jobs (importance, search; Esc cancels),
//! generation (latest wins) and a view's quick computations (latest
//! wins). Requests go in; `Update`s come out on a channel.
//! A job behind the job interface (`Request::Run`) goes to the lane it
//! names and is otherwise the job's own business.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};

use super::app::{LaneName, Origin, Quality, Request, Speed, Update};
use super::jobs::activity::Activity;
use super::jobs::importance::ImportanceJob;
use super::jobs::{self, Job, JobCx, JobLane, Setup};
use crate::model::Model;
use crate::plan::Plan;

struct LaneState<J> {
    pending: Option<J>,
    running: Option<Arc<AtomicBool>>,
    closed: bool,
}

/// One worker thread holding at most one queued job: submitting replaces
/// the queued one, and may cancel the one running.
struct Lane<J> {
    shared: Arc<(Mutex<LaneState<J>>, Condvar)>,
}

/// The text of a caught panic (a `&str` or `String` payload; rayon and
/// scoped threads pass their thread's payload on), with where it happened
/// when the workbench's panic hook saw it.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    match super::event::take_compute_panic() {
        Some(seen) if seen.contains(&text) => seen,
        Some(seen) => format!("{text} ({seen})"),
        None => text,
    }
}

impl<J: Send + 'static> Lane<J> {
    /// `on_panic` hears of a job that panicked (in this thread or in the
    /// rayon or scoped threads it waited on); the lane lives on for the next job.
    fn spawn(
        name: &str,
        mut run: impl FnMut(J, &AtomicBool) + Send + 'static,
        on_panic: impl Fn(String) + Send + 'static,
    ) -> Self {
        let shared = Arc::new((
            Mutex::new(LaneState {
                pending: None,
                running: None,
                closed: false,
            }),
            Condvar::new(),
        ));
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                super::event::nice_this_thread();
                loop {
                    let (job, cancel) = {
                        let (lock, cv) = &*s;
                        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
                        while st.pending.is_none() && !st.closed {
                            st = cv.wait(st).unwrap_or_else(|e| e.into_inner());
                        }
                        if st.closed {
                            return;
                        }
                        let cancel = Arc::new(AtomicBool::new(false));
                        st.running = Some(Arc::clone(&cancel));
                        (st.pending.take().expect("checked above"), cancel)
                    };
                    let ran = catch_unwind(AssertUnwindSafe(|| run(job, &cancel)));
                    if let Err(payload) = ran {
                        on_panic(panic_message(payload));
                    }
                    let (lock, _) = &*s;
                    lock.lock().unwrap_or_else(|e| e.into_inner()).running = None;
                }
            })
            .expect("spawning a worker thread");
        Self { shared }
    }

    fn submit(&self, job: J, cancel_running: bool) {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        if cancel_running {
            if let Some(c) = &st.running {
                c.store(true, Ordering::Relaxed);
            }
        }
        st.pending = Some(job);
        cv.notify_one();
    }

    fn cancel(&self) {
        let (lock, _) = &*self.shared;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        st.pending = None;
        if let Some(c) = &st.running {
            c.store(true, Ordering::Relaxed);
        }
    }

    fn close(&self) {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        st.closed = true;
        st.pending = None;
        if let Some(c) = &st.running {
            c.store(true, Ordering::Relaxed);
        }
        cv.notify_one();
    }
}

/// Held-out quality already measured, keyed by the plan's JSON, shared by lanes.
type QualityCache = Arc<Mutex<HashMap<String, Quality>>>;

fn key(plan: &Plan) -> String {
    serde_json::to_string(plan).unwrap_or_default()
}

pub struct Worker {
    eval: Lane<Plan>,
    long: Lane<Box<dyn Job>>,
    gen: Lane<Box<dyn Job>>,
    glance: Lane<Box<dyn Job>>,
}

/// Everything a lane needs, cloned into its thread.
#[derive(Clone)]
struct Ctx {
    model: Arc<Model>,
    setup: Arc<Setup>,
    tx: Sender<Update>,
    cache: QualityCache,
    /// Which jobs run now, for marking speeds taken beside them.
    activity: Activity,
    /// The last base speed measured, reused for plans equal to the base.
    base_speed: Arc<Mutex<Option<Speed>>>,
}

impl Ctx {
    fn send(&self, u: Update) {
        // The UI has gone when this fails; the job's result no longer matters.
        let _ = self.tx.send(u);
    }

    fn run(&self, job: Box<dyn Job>, cancel: &AtomicBool) {
        let measured = |plan: &Plan, origin| measure(self, plan, origin);
        let cx = JobCx::new(
            &self.model,
            &self.setup,
            cancel,
            &self.activity,
            &self.tx,
            &measured,
        );
        job.run(&cx);
    }
}

impl Worker {
    /// Starts the lanes; the evaluation lane measures the base model first
    /// and the long lane scores block importance.
    pub fn spawn(model: Arc<Model>, setup: Arc<Setup>, tx: Sender<Update>) -> Self {
        let ctx = Ctx {
            model,
            setup,
            tx,
            cache: Arc::new(Mutex::new(HashMap::new())),
            activity: Activity::default(),
            base_speed: Arc::new(Mutex::new(None)),
        };
        let crashed = |lane: LaneName| {
            let c = ctx.clone();
            move |message| c.send(Update::Crashed { lane, message })
        };
        let c = ctx.clone();
        let mut baseline_done = false;
        let eval = Lane::spawn(
            "scalpel-eval",
            move |plan: Plan, cancel| {
                if !baseline_done {
                    baseline_done = true;
                    baseline(&c);
                }
                evaluate(&c, plan, cancel);
            },
            crashed(LaneName::Eval),
        );
        let c = ctx.clone();
        let long = Lane::spawn(
            "scalpel-long",
            move |job: Box<dyn Job>, cancel| c.run(job, cancel),
            crashed(LaneName::Long),
        );
        let c = ctx.clone();
        let gen = Lane::spawn(
            "scalpel-gen",
            move |job: Box<dyn Job>, cancel| c.run(job, cancel),
            crashed(LaneName::Gen),
        );
        let c = ctx.clone();
        let glance = Lane::spawn(
            "scalpel-glance",
            move |job: Box<dyn Job>, cancel| c.run(job, cancel),
            crashed(LaneName::Glance),
        );
        // The base model's numbers first, whatever the first plan is.
        eval.submit(Plan::base(), false);
        long.submit(Box::new(ImportanceJob), false);
        Self {
            eval,
            long,
            gen,
            glance,
        }
    }

    pub fn send(&self, req: Request) {
        match req {
            Request::Evaluate(plan) => self.eval.submit(plan, true),
            Request::Run(job) => match job.lane() {
                JobLane::Gen => self.gen.submit(job, true),
                JobLane::Long => self.long.submit(job, false),
                JobLane::Glance => self.glance.submit(job, true),
            },
            Request::CancelJob => self.long.cancel(),
        }
    }

    /// Cancels everything; threads end at their next cancellation check.
    pub fn shutdown(&self) {
        self.eval.close();
        self.long.close();
        self.gen.close();
        self.glance.close();
    }
}

fn baseline(c: &Ctx) {
    let never = AtomicBool::new(false);
    match jobs::eval::quality(&c.model, &c.setup, &Plan::base(), &never, |_, _| {}) {
        Ok(q) => {
            c.cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key(&Plan::base()), q);
            c.send(Update::Baseline(q));
        }
        Err(e) => c.send(Update::BaselineFailed(format!("{e:#}"))),
    }
}

fn evaluate(c: &Ctx, plan: Plan, cancel: &AtomicBool) {
    let cached = c
        .cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key(&plan))
        .copied();
    let quality = match cached {
        Some(q) => q,
        None => {
            let r = jobs::eval::quality(&c.model, &c.setup, &plan, cancel, |done, total| {
                c.send(Update::EvalProgress {
                    plan: plan.clone(),
                    done,
                    total,
                })
            });
            match r {
                Ok(q) => q,
                Err(_) if cancel.load(Ordering::Relaxed) => {
                    c.send(Update::EvalCancelled(plan));
                    return;
                }
                Err(e) => {
                    c.send(Update::EvalFailed {
                        plan,
                        error: format!("{e:#}"),
                    });
                    return;
                }
            }
        }
    };
    c.cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key(&plan), quality);
    c.send(Update::Quality {
        plan: plan.clone(),
        quality,
        origin: Origin::User,
    });
    // A newer plan is waiting: its numbers matter more than this one's speed.
    if cancel.load(Ordering::Relaxed) {
        c.send(Update::EvalCancelled(plan));
        return;
    }
    c.send(Update::SpeedStarted(plan.clone()));
    match plan_speed(c, &plan) {
        Ok(speed) => c.send(Update::Speed { plan, speed }),
        Err(e) => c.send(Update::EvalFailed {
            plan,
            error: format!("speed: {e:#}"),
        }),
    }
}

/// Times the plan (or reuses the base's numbers for a plan equal to it),
/// noting which other jobs ran meanwhile.
fn plan_speed(c: &Ctx, plan: &Plan) -> anyhow::Result<Speed> {
    let last_base = *c.base_speed.lock().unwrap_or_else(|e| e.into_inner());
    let timed = |f: &dyn Fn() -> anyhow::Result<Speed>| {
        let watch = c.activity.watch();
        let mut s = f()?;
        s.overlap = watch.finish();
        let base = Speed::same_as_base(s.base_prefill, s.base_decode, s.overlap);
        *c.base_speed.lock().unwrap_or_else(|e| e.into_inner()) = Some(base);
        Ok(s)
    };
    jobs::eval::speed_or_reuse(
        plan,
        last_base,
        || timed(&|| jobs::eval::base_speed(&c.model, &c.setup)),
        || timed(&|| jobs::eval::speed(&c.model, &c.setup, plan)),
    )
}

/// Measures a plan on the held-out text for the chart (search steps, fits).
fn measure(c: &Ctx, plan: &Plan, origin: Origin) {
    let never = AtomicBool::new(false);
    match jobs::eval::quality(&c.model, &c.setup, plan, &never, |_, _| {}) {
        Ok(q) => {
            c.cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key(plan), q);
            c.send(Update::Quality {
                plan: plan.clone(),
                quality: q,
                origin,
            });
        }
        Err(e) => c.send(Update::EvalFailed {
            plan: plan.clone(),
            error: format!("{e:#}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// How each test job ends.
    enum Job {
        Panic,
        PanicInRayon,
        PanicInScopedThread,
        Finish(u32),
    }

    #[test]
    fn a_panicking_job_is_reported_and_the_lane_runs_the_next_one() {
        let (done_tx, done_rx) = mpsc::channel();
        let (panic_tx, panic_rx) = mpsc::channel();
        let panic_tx = Mutex::new(panic_tx);
        let lane = Lane::spawn(
            "scalpel-test",
            move |job: Job, _| match job {
                Job::Panic => panic!("injected in the lane"),
                Job::PanicInRayon => {
                    let _: Vec<u32> = (0..64u32)
                        .into_par_iter()
                        .map(|i| {
                            if i == 33 {
                                panic!("injected in rayon")
                            } else {
                                i
                            }
                        })
                        .collect();
                }
                Job::PanicInScopedThread => std::thread::scope(|s| {
                    s.spawn(|| panic!("injected in a scoped thread"));
                }),
                Job::Finish(n) => done_tx.send(n).unwrap(),
            },
            move |message| panic_tx.lock().unwrap().send(message).unwrap(),
        );
        let wait = Duration::from_secs(30);
        for (job, expected) in [
            (Job::Panic, "injected in the lane"),
            (Job::PanicInRayon, "injected in rayon"),
            (Job::PanicInScopedThread, "a scoped thread panicked"),
        ] {
            lane.submit(job, false);
            let message = panic_rx
                .recv_timeout(wait)
                .expect("the panic was not reported");
            assert!(message.contains(expected), "{message}");
        }
        lane.submit(Job::Finish(7), false);
        assert_eq!(
            done_rx.recv_timeout(wait),
            Ok(7),
            "the lane died with its job"
        );
        lane.close();
    }
}
