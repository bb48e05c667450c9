//! Background threads that own the model (through an `Arc`) and run jobs,
//! so the UI thread never waits on it. Three lanes, each one std thread:
//! evaluation (latest wins: a newer plan cancels the older one, as gitui's
//! `AsyncSingleJob`), long jobs (importance, search; Esc cancels) and
//! generation (latest wins). Requests go in; `Update`s come out on a channel.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};

use super::app::{BlockScores, JobKind, Origin, Quality, Request, Side, Update};
use super::jobs::{self, Setup};
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

impl<J: Send + 'static> Lane<J> {
    fn spawn(name: &str, mut run: impl FnMut(J, &AtomicBool) + Send + 'static) -> Self {
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
                    run(job, &cancel);
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

enum LongJob {
    Importance,
    Search { k: usize, from: Plan },
}

struct GenJob {
    prompt: String,
    plan: Plan,
}

/// Held-out quality already measured, keyed by the plan's JSON, shared by lanes.
type QualityCache = Arc<Mutex<HashMap<String, Quality>>>;

fn key(plan: &Plan) -> String {
    serde_json::to_string(plan).unwrap_or_default()
}

pub struct Worker {
    eval: Lane<Plan>,
    long: Lane<LongJob>,
    gen: Lane<GenJob>,
}

/// Everything a lane needs, cloned into its thread.
#[derive(Clone)]
struct Ctx {
    model: Arc<Model>,
    setup: Arc<Setup>,
    tx: Sender<Update>,
    cache: QualityCache,
}

impl Ctx {
    fn send(&self, u: Update) {
        // The UI has gone when this fails; the job's result no longer matters.
        let _ = self.tx.send(u);
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
        };
        let c = ctx.clone();
        let mut baseline_done = false;
        let eval = Lane::spawn("scalpel-eval", move |plan: Plan, cancel| {
            if !baseline_done {
                baseline_done = true;
                baseline(&c);
            }
            evaluate(&c, plan, cancel);
        });
        let c = ctx.clone();
        let long = Lane::spawn("scalpel-long", move |job: LongJob, cancel| match job {
            LongJob::Importance => importance(&c, cancel),
            LongJob::Search { k, from } => search(&c, k, from, cancel),
        });
        let c = ctx;
        let gen = Lane::spawn("scalpel-gen", move |job: GenJob, cancel| {
            generate(&c, job, cancel)
        });
        long.submit(LongJob::Importance, false);
        Self { eval, long, gen }
    }

    pub fn send(&self, req: Request) {
        match req {
            Request::Evaluate(plan) => self.eval.submit(plan, true),
            Request::Generate { prompt, plan } => self.gen.submit(GenJob { prompt, plan }, true),
            Request::Search { k, from } => self.long.submit(LongJob::Search { k, from }, false),
            Request::CancelJob => self.long.cancel(),
        }
    }

    /// Cancels everything; threads end at their next cancellation check.
    pub fn shutdown(&self) {
        self.eval.close();
        self.long.close();
        self.gen.close();
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
    match jobs::eval::speed(&c.model, &c.setup, &plan) {
        Ok(speed) => c.send(Update::Speed { plan, speed }),
        Err(e) => c.send(Update::EvalFailed {
            plan,
            error: format!("speed: {e:#}"),
        }),
    }
}

fn importance(c: &Ctx, cancel: &AtomicBool) {
    let hash = &c.model.identity.content_hash;
    let calib_desc = c.setup.describe_calibration();
    let path = jobs::importance::cache_path(hash);
    let n = c.model.n_layers();
    if let Some(blocks) = jobs::importance::load_cache(&path, hash, &calib_desc, n) {
        for (block, scores) in blocks {
            c.send(Update::Importance { block, scores });
        }
        c.send(Update::JobFinished(format!(
            "importance loaded from {}",
            path.display()
        )));
        return;
    }
    c.send(Update::JobStarted(JobKind::Importance));
    let mut all: BTreeMap<_, BlockScores> = BTreeMap::new();
    match jobs::importance::influence(&c.model, &c.setup.calibration) {
        Ok(map) => {
            for (block, v) in map {
                let scores = BlockScores {
                    delta_loss: None,
                    influence: Some(v),
                };
                all.entry(block).or_default().merge(scores);
                c.send(Update::Importance { block, scores });
            }
        }
        Err(e) => {
            c.send(Update::JobFailed(format!("block influence: {e:#}")));
            return;
        }
    }
    let r = jobs::importance::delta_loss(
        &c.model,
        &c.setup.calibration,
        cancel,
        |block, d, done, total| {
            let scores = BlockScores {
                delta_loss: Some(d),
                influence: None,
            };
            all.entry(block).or_default().merge(scores);
            c.send(Update::Importance { block, scores });
            c.send(Update::JobProgress {
                done,
                total,
                loss: None,
                detail: format!("Δloss of {block}"),
            });
        },
    );
    match r {
        Ok(()) => {
            let saved = jobs::importance::save_cache(&path, hash, &calib_desc, &all);
            c.send(Update::JobFinished(match saved {
                Ok(()) => "importance scored and cached".into(),
                Err(e) => format!("importance scored; cache not written: {e:#}"),
            }));
        }
        Err(_) if cancel.load(Ordering::Relaxed) => c.send(Update::JobCancelled),
        Err(e) => c.send(Update::JobFailed(format!("importance: {e:#}"))),
    }
}

fn search(c: &Ctx, k: usize, from: Plan, cancel: &AtomicBool) {
    let never = AtomicBool::new(false);
    let r = jobs::search::greedy(
        &c.model,
        &c.setup.calibration,
        &from,
        k,
        cancel,
        |p| {
            c.send(Update::JobProgress {
                done: p.done,
                total: p.total,
                loss: p.best_loss,
                detail: format!("step {}/{k}", p.step),
            })
        },
        |plan, _loss| {
            c.send(Update::SearchStep(plan.clone()));
            // Every step is measured on held-out text for the chart.
            let q = jobs::eval::quality(&c.model, &c.setup, plan, &never, |_, _| {})?;
            c.cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key(plan), q);
            c.send(Update::Quality {
                plan: plan.clone(),
                quality: q,
                origin: Origin::Search,
            });
            Ok(())
        },
    );
    match r {
        Ok(plan) => c.send(Update::JobFinished(format!(
            "search done: {}",
            plan.describe()
        ))),
        Err(_) if cancel.load(Ordering::Relaxed) => c.send(Update::JobCancelled),
        Err(e) => c.send(Update::JobFailed(format!("search: {e:#}"))),
    }
}

fn generate(c: &Ctx, job: GenJob, cancel: &AtomicBool) {
    let ids = match jobs::generate::prompt_ids(&c.model, &job.prompt) {
        Ok(ids) => ids,
        Err(e) => {
            for side in [Side::Base, Side::Plan] {
                c.send(Update::GenFailed {
                    side,
                    error: format!("{e:#}"),
                });
            }
            return;
        }
    };
    for (side, plan) in [(Side::Base, Plan::base()), (Side::Plan, job.plan.clone())] {
        let r = jobs::generate::stream(&c.model, &c.setup, &ids, &plan, cancel, |text| {
            c.send(Update::GenText { side, text })
        });
        match r {
            Ok(rep) => c.send(Update::GenDone {
                side,
                prefill_tps: rep.prefill_tokens_per_sec,
                decode_tps: rep.decode_tokens_per_sec,
            }),
            Err(e) => {
                let error = if cancel.load(Ordering::Relaxed) {
                    "cancelled".to_string()
                } else {
                    format!("{e:#}")
                };
                c.send(Update::GenFailed { side, error });
                return;
            }
        }
    }
}
