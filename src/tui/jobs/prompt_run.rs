//! The generation panel's job (`p`, `d`): the prompt through the base
//! model, then through the plan, or with the plan drafting for the full
//! model; and what each of its results changes in the app.

use super::activity::Busy;
use super::generate::{stream, stream_draft};
use super::interface::{Apply, Job, JobCx, JobLane};
use crate::plan::Plan;
use crate::tui::app::{App, DraftRun, DraftStats, Origin, Request, Side, Speculative, View};

#[derive(Debug, Clone, PartialEq)]
pub struct PromptRun {
    pub prompt: String,
    pub plan: Plan,
    /// Run the plan as a draft the full model verifies (lossless), instead
    /// of generating with the plan.
    pub draft: bool,
}

impl Job for PromptRun {
    fn name(&self) -> String {
        match self.draft {
            true => "draft run".into(),
            false => "generation".into(),
        }
    }

    fn lane(&self) -> JobLane {
        JobLane::Gen
    }

    fn run(self: Box<Self>, cx: &JobCx) {
        let _busy = cx.busy(Busy::Generation);
        let ids = match cx.model.prompt_ids_preferring_chat(&self.prompt) {
            Ok(ids) => ids,
            Err(e) => {
                for side in [Side::Base, Side::Plan] {
                    cx.apply(Failed {
                        side,
                        error: format!("{e:#}"),
                    });
                }
                return;
            }
        };
        let failed = |side, e: anyhow::Error| {
            let error = match cx.cancelled() {
                true => "cancelled".to_string(),
                false => format!("{e:#}"),
            };
            cx.apply(Failed { side, error });
        };
        // The base model first; with a draft, the same text comes again, faster or not.
        let sides = match self.draft {
            true => vec![(Side::Base, Plan::base())],
            false => vec![(Side::Base, Plan::base()), (Side::Plan, self.plan.clone())],
        };
        for (side, plan) in sides {
            let r = stream(cx.model, cx.setup, &ids, &plan, cx.cancel(), |text| {
                cx.apply(Text { side, text })
            });
            match r {
                Ok(rep) => cx.apply(Done {
                    side,
                    prefill_tps: rep.prefill_tokens_per_sec,
                    decode_tps: rep.decode_tokens_per_sec,
                }),
                Err(e) => return failed(side, e),
            }
        }
        if self.draft {
            let r = stream_draft(
                cx.model,
                cx.setup,
                &ids,
                &self.plan,
                cx.cancel(),
                |pieces| cx.apply(DraftText { pieces }),
            );
            match r {
                Ok(rep) => cx.apply(DraftDone {
                    prefill_tps: rep.prompt_tokens as f64 / rep.prefill_seconds.max(1e-9),
                    decode_tps: rep.decode_tokens_per_sec,
                    stats: DraftStats {
                        acceptance_rate: rep.acceptance_rate,
                        mean_accepted: rep.mean_accepted,
                    },
                    new_tokens: rep.new_tokens.len(),
                }),
                Err(e) => failed(Side::Plan, e),
            }
        }
    }
}

/// One column's text so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Text {
    pub side: Side,
    pub text: String,
}

impl Apply for Text {
    fn apply(self: Box<Self>, app: &mut App) -> Vec<Request> {
        let s = app.gen.side_mut(self.side);
        s.queued = false;
        s.running = true;
        s.text = self.text;
        vec![]
    }
}

/// One column finished, with its speeds.
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    pub side: Side,
    pub prefill_tps: f64,
    pub decode_tps: f64,
}

impl Apply for Done {
    fn apply(self: Box<Self>, app: &mut App) -> Vec<Request> {
        let s = app.gen.side_mut(self.side);
        s.running = false;
        s.queued = false;
        s.prefill_tps = Some(self.prefill_tps);
        s.decode_tps = Some(self.decode_tps);
        // The routing view routes the continuation too, once it is there.
        if self.side == Side::Base {
            match app.view {
                View::Routing => return app.refresh_routing(false),
                View::Kv => return app.refresh_kv_map(),
                _ => {}
            }
        }
        vec![]
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Failed {
    pub side: Side,
    pub error: String,
}

impl Apply for Failed {
    fn apply(self: Box<Self>, app: &mut App) -> Vec<Request> {
        let s = app.gen.side_mut(self.side);
        s.running = false;
        s.queued = false;
        s.error = Some(self.error);
        vec![]
    }
}

/// A speculative run's text so far, one piece per token, `true` where the
/// draft proposed it.
#[derive(Debug, Clone, PartialEq)]
pub struct DraftText {
    pub pieces: Vec<(String, bool)>,
}

impl Apply for DraftText {
    fn apply(self: Box<Self>, app: &mut App) -> Vec<Request> {
        let s = &mut app.gen.plan;
        s.queued = false;
        s.running = true;
        s.text = self.pieces.iter().map(|(p, _)| p.as_str()).collect();
        s.pieces = self.pieces;
        vec![]
    }
}

/// A speculative run finished: its speeds and acceptance land on the
/// panel, on the plan's record (the chart's draft × axis) and in the
/// session's list of draft runs (the speculative view).
#[derive(Debug, Clone, PartialEq)]
pub struct DraftDone {
    pub prefill_tps: f64,
    pub decode_tps: f64,
    pub stats: DraftStats,
    pub new_tokens: usize,
}

impl Apply for DraftDone {
    fn apply(self: Box<Self>, app: &mut App) -> Vec<Request> {
        let s = &mut app.gen.plan;
        s.running = false;
        s.queued = false;
        s.prefill_tps = Some(self.prefill_tps);
        s.decode_tps = Some(self.decode_tps);
        s.draft = Some(self.stats);
        let base = app.gen.base.decode_tps.filter(|b| *b > 0.0);
        let Some(plan) = app.gen.draft_plan.clone() else {
            return vec![];
        };
        if let Some(b) = base {
            app.record_mut(&plan, Origin::User).speculative = Some(Speculative {
                speedup: self.decode_tps / b,
                acceptance_rate: self.stats.acceptance_rate,
                mean_accepted: self.stats.mean_accepted,
            });
            app.dirty = true;
        }
        app.draft_runs.push(DraftRun {
            plan,
            new_tokens: self.new_tokens,
            stats: self.stats,
            plain_decode: base,
            draft_decode: self.decode_tps,
            identical: app.gen.plan.text == app.gen.base.text,
        });
        vec![]
    }
}
