//! Workbench state: plain data, no model and no terminal, so snapshot tests
//! build an `App` by hand. Keys become calls on `App`; worker results arrive
//! as `Update`s; both return the `Request`s the worker should run next.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::jobs::fit::FitJob;
use super::jobs::kv::KvView;
use super::jobs::prompt_run::PromptRun;
use super::jobs::routing::RoutingState;
use super::jobs::search::SearchJob;
use super::jobs::{Apply, Job};
use crate::plan::{BlockId, BlockKind, ModelIdentity, Plan};

/// The smallest terminal the layout is drawn for.
pub const MIN_WIDTH: u16 = 80;
pub const MIN_HEIGHT: u16 = 24;

/// What the workbench knows about the model and how it measures.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub identity: ModelIdentity,
    pub n_layers: usize,
    /// Parameters of one attention / one MLP block.
    pub attn_params: usize,
    pub mlp_params: usize,
    /// LM-head matmul parameters: part of every token's FLOPs, never skipped.
    pub head_params: usize,
    /// One line each: what the quality, importance and speed numbers are measured on.
    pub heldout: String,
    pub calibration: String,
    pub speed: String,
    /// What the `S` key runs, named honestly.
    pub search_name: String,
}

impl ModelInfo {
    pub fn block_params(&self, block: BlockId) -> usize {
        match block.kind {
            BlockKind::Attn => self.attn_params,
            BlockKind::Mlp => self.mlp_params,
        }
    }

    pub fn all_block_params(&self) -> usize {
        self.n_layers * (self.attn_params + self.mlp_params)
    }

    pub fn n_blocks(&self) -> usize {
        2 * self.n_layers
    }

    /// Shares skipped: of all block parameters, and of per-token matmul
    /// FLOPs including the LM head (attention-score FLOPs left out).
    pub fn skipped_shares(&self, plan: &Plan) -> (f64, f64) {
        let skipped: usize = plan.skip.iter().map(|b| self.block_params(*b)).sum();
        let params = skipped as f64 / self.all_block_params().max(1) as f64;
        let flops = skipped as f64 / (self.all_block_params() + self.head_params).max(1) as f64;
        (params, flops)
    }
}

/// Which importance score colours the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Metric {
    /// Calibration loss increase when this block alone is skipped.
    DeltaLoss,
    /// 1 − cos(block input, block output): how much the block turns the residual stream.
    Influence,
}

impl Metric {
    pub fn next(self) -> Self {
        match self {
            Metric::DeltaLoss => Metric::Influence,
            Metric::Influence => Metric::DeltaLoss,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Metric::DeltaLoss => "Δloss when skipped",
            Metric::Influence => "block influence (1−cos)",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Metric::DeltaLoss => "Δloss",
            Metric::Influence => "infl",
        }
    }
}

/// Importance scores of one block; each arrives on its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockScores {
    pub delta_loss: Option<f64>,
    pub influence: Option<f64>,
}

impl BlockScores {
    pub fn get(&self, metric: Metric) -> Option<f64> {
        match metric {
            Metric::DeltaLoss => self.delta_loss,
            Metric::Influence => self.influence,
        }
    }

    /// Keeps what is already known where `other` has nothing.
    pub fn merge(&mut self, other: BlockScores) {
        self.delta_loss = other.delta_loss.or(self.delta_loss);
        self.influence = other.influence.or(self.influence);
    }
}

/// Held-out quality of one plan.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    pub perplexity: f64,
    /// Mean KL(base ‖ plan) per token, nats.
    pub kl: f64,
    pub top1: f64,
}

/// Background jobs that ran while a speed was measured: they share the
/// cores, so such a speed is not comparable with one taken on a quiet machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overlap {
    pub importance: bool,
    pub search: bool,
    pub fit: bool,
    pub generation: bool,
    /// A job of another mode (see `jobs::activity::Busy::Other`).
    #[serde(default)]
    pub other: bool,
}

impl Overlap {
    pub fn is_clean(&self) -> bool {
        *self == Self::default()
    }

    pub fn names(&self) -> Vec<&'static str> {
        [
            (self.importance, "importance"),
            (self.search, "search"),
            (self.fit, "fit"),
            (self.generation, "generation"),
            (self.other, "another job"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }

    /// `⚠ importance running: not comparable` (short enough for the metrics
    /// panel at 80 columns), or nothing when clean.
    pub fn warning(&self) -> Option<String> {
        let names = self.names();
        if names.is_empty() {
            return None;
        }
        Some(format!("⚠ {} running: not comparable", names.join(" + ")))
    }
}

/// Medians of prefill / decode tokens per second, base and plan timed in the same run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Speed {
    pub base_prefill: f64,
    pub base_decode: f64,
    pub plan_prefill: f64,
    pub plan_decode: f64,
    /// Other jobs running while this was timed (sessions saved before it: none known).
    #[serde(default)]
    pub overlap: Overlap,
}

impl Speed {
    /// A plan that computes exactly what the base does: the base's own
    /// numbers on both sides, so the ratios are exactly 1.
    pub fn same_as_base(base_prefill: f64, base_decode: f64, overlap: Overlap) -> Self {
        Self {
            base_prefill,
            base_decode,
            plan_prefill: base_prefill,
            plan_decode: base_decode,
            overlap,
        }
    }

    pub fn prefill_ratio(&self) -> f64 {
        self.plan_prefill / self.base_prefill
    }
    pub fn decode_ratio(&self) -> f64 {
        self.plan_decode / self.base_decode
    }
}

/// Where a plan came from (the chart draws search steps as a line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    User,
    Search,
}

/// The plan run as a draft for the full model (`d`): decode speed against
/// the plain run just before it (one run of each: a glance, not a benchmark).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Speculative {
    pub speedup: f64,
    pub acceptance_rate: f64,
    pub mean_accepted: f64,
}

/// Everything measured about one plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub plan: Plan,
    pub quality: Option<Quality>,
    pub speed: Option<Speed>,
    pub origin: Origin,
    /// The last draft run of this plan, if any (older sessions: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speculative: Option<Speculative>,
}

/// The evaluation in flight for some plan.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingEval {
    pub plan: Plan,
    pub stage: EvalStage,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EvalStage {
    Quality { done: usize, total: usize },
    Speed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Importance,
    Search {
        k: usize,
    },
    Fit,
    /// Any other long job (a new mode's), known by its name.
    Named(&'static str),
}

impl JobKind {
    pub fn label(&self) -> String {
        match self {
            JobKind::Importance => "importance".into(),
            JobKind::Search { k } => format!("search K={k}"),
            JobKind::Fit => "fit scales".into(),
            JobKind::Named(name) => name.to_string(),
        }
    }
}

/// A long background job (importance, search) with its progress.
#[derive(Debug, Clone)]
pub struct LongJob {
    pub kind: JobKind,
    pub done: usize,
    pub total: usize,
    pub started: Instant,
    /// Live loss (calibration NLL of the best candidate so far).
    pub loss: Option<f64>,
    pub detail: String,
    pub cancelling: bool,
}

impl LongJob {
    pub fn new(kind: JobKind, now: Instant) -> Self {
        Self {
            kind,
            done: 0,
            total: 0,
            started: now,
            loss: None,
            detail: String::new(),
            cancelling: false,
        }
    }

    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            (self.done as f64 / self.total as f64).min(1.0)
        }
    }

    /// Remaining time at the average rate so far.
    pub fn eta(&self, now: Instant) -> Option<Duration> {
        if self.done == 0 || self.total == 0 {
            return None;
        }
        let elapsed = now.saturating_duration_since(self.started).as_secs_f64();
        Some(Duration::from_secs_f64(crate::progress::eta_secs(
            elapsed, self.done, self.total,
        )))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Base,
    Plan,
}

/// One column of the generation panel.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenSide {
    pub text: String,
    /// A speculative run's text, one piece per token, `true` where the
    /// draft proposed the token; empty for plain generation.
    pub pieces: Vec<(String, bool)>,
    pub running: bool,
    pub queued: bool,
    pub prefill_tps: Option<f64>,
    pub decode_tps: Option<f64>,
    /// A speculative run's acceptance, when finished.
    pub draft: Option<DraftStats>,
    pub error: Option<String>,
}

/// What a finished self-speculative run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DraftStats {
    /// Drafted tokens the full model accepted.
    pub acceptance_rate: f64,
    /// New tokens per verify pass (τ).
    pub mean_accepted: f64,
}

/// One draft run (`d`) made this session, for the speculative view.
#[derive(Debug, Clone, PartialEq)]
pub struct DraftRun {
    /// The plan that drafted.
    pub plan: Plan,
    pub new_tokens: usize,
    pub stats: DraftStats,
    /// Plain greedy decode of the same prompt, timed just before (tok/s).
    pub plain_decode: Option<f64>,
    /// Speculative decode, tok/s.
    pub draft_decode: f64,
    /// The speculative text is the plain greedy text (it must be).
    pub identical: bool,
}

impl DraftRun {
    pub fn speedup(&self) -> Option<f64> {
        self.plain_decode.map(|b| self.draft_decode / b)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Generation {
    pub prompt: String,
    pub base: GenSide,
    pub plan: GenSide,
    /// The plan the right column was generated with.
    pub plan_label: String,
    /// The right column ran the plan as a draft for the full model.
    pub drafting: bool,
    /// The plan drafting, so its measurement lands on its record.
    pub draft_plan: Option<Plan>,
}

impl Generation {
    pub fn side_mut(&mut self, side: Side) -> &mut GenSide {
        match side {
            Side::Base => &mut self.base,
            Side::Plan => &mut self.plan,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    SavePath,
    OpenPath,
    Prompt,
    SearchK,
}

impl InputKind {
    pub fn label(self) -> &'static str {
        match self {
            InputKind::SavePath => "save plan to",
            InputKind::OpenPath => "open plan",
            InputKind::Prompt => "prompt",
            InputKind::SearchK => "blocks to skip (K)",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Normal,
    Help,
    History { selected: usize },
    Input { kind: InputKind, text: String },
}

/// What the main panel shows: one mode's view, with that mode's keys
/// (a command bound to a view runs only there; see `keys::When::InView`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Block surgery: the grid, the plan's metrics and the chart.
    Blocks,
    /// Self-speculative decoding: the draft runs made this session.
    Speculative,
    /// KV budgets: which keys a policy keeps per layer for the current
    /// prompt, and its long-context measurements.
    Kv,
    /// Token routing: which tokens the routed plan's routers send past
    /// which blocks, for the current prompt.
    Routing,
}

impl View {
    pub const ALL: [View; 4] = [View::Blocks, View::Speculative, View::Routing, View::Kv];

    pub fn next(self) -> Self {
        let i = Self::ALL.iter().position(|v| *v == self).unwrap_or(0);
        Self::ALL[(i + 1) % Self::ALL.len()]
    }

    pub fn label(self) -> &'static str {
        match self {
            View::Blocks => "blocks",
            View::Speculative => "speculative",
            View::Routing => "routing",
            View::Kv => "KV",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChartX {
    BlocksSkipped,
    DecodeSpeedup,
    /// Offered once some plan has been run as a draft.
    SpeculativeSpeedup,
}

impl ChartX {
    /// A record's position on this axis, if measured.
    pub fn of(self, r: &Record) -> Option<f64> {
        match self {
            ChartX::BlocksSkipped => Some(r.plan.skip.len() as f64),
            ChartX::DecodeSpeedup => Some(r.speed?.decode_ratio()),
            ChartX::SpeculativeSpeedup => Some(r.speculative?.speedup),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChartY {
    Kl,
    Perplexity,
}

impl ChartY {
    pub fn of(self, q: &Quality) -> f64 {
        match self {
            ChartY::Kl => q.kl,
            ChartY::Perplexity => q.perplexity,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub text: String,
    pub error: bool,
}

/// Work for the background threads.
#[derive(Debug)]
pub enum Request {
    /// Held-out quality, then speed; latest wins.
    Evaluate(Plan),
    /// Any job behind the one job interface (generation, draft runs,
    /// importance, search, fit; a new mode's work): the worker runs it on its lane.
    Run(Box<dyn Job>),
    /// Cancels the running long job.
    CancelJob,
}

impl Request {
    pub fn run(job: impl Job + 'static) -> Self {
        Request::Run(Box::new(job))
    }

    /// The job's name, for a `Run`.
    pub fn job_name(&self) -> Option<String> {
        match self {
            Request::Run(job) => Some(job.name()),
            _ => None,
        }
    }
}

/// Jobs are plain data: two are equal when they print the same.
impl PartialEq for Request {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Request::Evaluate(a), Request::Evaluate(b)) => a == b,
            (Request::Run(a), Request::Run(b)) => format!("{a:?}") == format!("{b:?}"),
            (Request::CancelJob, Request::CancelJob) => true,
            _ => false,
        }
    }
}

/// The worker's threads, named for a crash report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneName {
    /// Held-out quality and speed of the current plan.
    Eval,
    /// Importance, search, fit.
    Long,
    Gen,
    /// A view's quick computation (the routing decisions).
    Glance,
}

/// Results and progress from the background threads.
#[derive(Debug)]
pub enum Update {
    Baseline(Quality),
    BaselineFailed(String),
    EvalProgress {
        plan: Plan,
        done: usize,
        total: usize,
    },
    Quality {
        plan: Plan,
        quality: Quality,
        origin: Origin,
    },
    SpeedStarted(Plan),
    Speed {
        plan: Plan,
        speed: Speed,
    },
    EvalFailed {
        plan: Plan,
        error: String,
    },
    EvalCancelled(Plan),
    JobStarted(JobKind),
    JobProgress {
        done: usize,
        total: usize,
        loss: Option<f64>,
        detail: String,
    },
    JobFinished(String),
    JobFailed(String),
    JobCancelled,
    /// A result of a job behind the job interface, applied as it says.
    Job(Box<dyn Apply>),
    /// A job panicked (in its lane or a compute thread it waited on); the
    /// lane is ready for the next job.
    Crashed {
        lane: LaneName,
        message: String,
    },
}

impl Update {
    pub fn job(result: impl Apply + 'static) -> Self {
        Update::Job(Box::new(result))
    }
}

pub struct App {
    pub info: ModelInfo,
    /// Plans in the order they were made; `at` is the current one.
    pub history: Vec<Plan>,
    pub at: usize,
    pub cursor: BlockId,
    pub metric: Metric,
    pub importance: BTreeMap<BlockId, BlockScores>,
    pub base_quality: Option<Quality>,
    pub baseline_error: Option<String>,
    /// Every plan measured this session (user's and search steps).
    pub records: Vec<Record>,
    pub eval: Option<PendingEval>,
    pub job: Option<LongJob>,
    pub gen: Generation,
    /// Every draft run this session, oldest first.
    pub draft_runs: Vec<DraftRun>,
    pub view: View,
    /// The routed plan opened for the routing view, and its decisions.
    pub routing: Option<RoutingState>,
    /// The KV budget view's policy, kept-keys map and measurements.
    pub kv: KvView,
    pub mode: Mode,
    pub chart_x: ChartX,
    pub chart_y: ChartY,
    pub status: Option<Status>,
    /// Drawing time; the loop sets it each frame, tests fix it.
    pub now: Instant,
    pub quit: bool,
    /// Session changed since the last autosave.
    pub dirty: bool,
    /// Suggested path for the next save.
    pub save_path: PathBuf,
}

impl App {
    pub fn new(info: ModelInfo, plan: Plan, prompt: String, now: Instant) -> Self {
        Self {
            info,
            history: vec![plan],
            at: 0,
            cursor: BlockId::attn(0),
            metric: Metric::DeltaLoss,
            importance: BTreeMap::new(),
            base_quality: None,
            baseline_error: None,
            records: Vec::new(),
            eval: None,
            job: None,
            gen: Generation {
                prompt,
                ..Default::default()
            },
            draft_runs: Vec::new(),
            view: View::Blocks,
            routing: None,
            kv: KvView::default(),
            mode: Mode::Normal,
            chart_x: ChartX::BlocksSkipped,
            chart_y: ChartY::Kl,
            status: None,
            now,
            quit: false,
            dirty: false,
            save_path: PathBuf::from("scalpel-plan.json"),
        }
    }

    /// Requests the first frame needs: the opening plan's evaluation. The
    /// worker scores importance on its own at start (or loads the cache).
    pub fn start(&mut self) -> Vec<Request> {
        self.job = Some(LongJob::new(JobKind::Importance, self.now));
        self.evaluate_current()
    }

    pub fn plan(&self) -> &Plan {
        &self.history[self.at]
    }

    pub fn record(&self, plan: &Plan) -> Option<&Record> {
        self.records.iter().find(|r| &r.plan == plan)
    }

    pub(crate) fn record_mut(&mut self, plan: &Plan, origin: Origin) -> &mut Record {
        let i = match self.records.iter().position(|r| &r.plan == plan) {
            Some(i) => i,
            None => {
                self.records.push(Record {
                    plan: plan.clone(),
                    quality: None,
                    speed: None,
                    origin,
                    speculative: None,
                });
                self.records.len() - 1
            }
        };
        &mut self.records[i]
    }

    pub fn current_record(&self) -> Option<&Record> {
        self.record(self.plan())
    }

    /// The evaluation in flight for the current plan, if any.
    pub fn current_eval(&self) -> Option<&PendingEval> {
        self.eval.as_ref().filter(|e| &e.plan == self.plan())
    }

    pub fn search_running(&self) -> bool {
        matches!(
            self.job.as_ref().map(|j| j.kind),
            Some(JobKind::Search { .. })
        )
    }

    pub fn set_status(&mut self, text: impl Into<String>, error: bool) {
        self.status = Some(Status {
            text: text.into(),
            error,
        });
    }

    /// Makes `plan` current as a new history entry (dropping any redo tail).
    pub fn push_plan(&mut self, plan: Plan) -> Vec<Request> {
        if &plan == self.plan() {
            return vec![];
        }
        self.history.truncate(self.at + 1);
        self.history.push(plan);
        self.at = self.history.len() - 1;
        self.dirty = true;
        self.evaluate_current()
    }

    /// Asks for the current plan's numbers unless they are already known.
    fn evaluate_current(&mut self) -> Vec<Request> {
        let plan = self.plan().clone();
        let known = self
            .record(&plan)
            .is_some_and(|r| r.quality.is_some() && r.speed.is_some());
        if known {
            return vec![];
        }
        self.eval = Some(PendingEval {
            plan: plan.clone(),
            stage: EvalStage::Quality { done: 0, total: 0 },
        });
        vec![Request::Evaluate(plan)]
    }

    /// Refuses plan edits while a search is writing the plan.
    fn editable(&mut self) -> bool {
        if self.search_running() {
            self.set_status("a search is changing the plan; Esc cancels it first", true);
            false
        } else {
            true
        }
    }

    pub fn toggle_cursor(&mut self) -> Vec<Request> {
        if !self.editable() {
            return vec![];
        }
        let mut plan = self.plan().clone();
        let now_skipped = plan.toggle(self.cursor);
        if !now_skipped {
            // A skipped block's output scale means nothing (a fit may have
            // left any value there); restored, it gets its full output.
            plan.reset_output_scale(self.cursor);
        }
        self.set_status(
            format!(
                "{} {}",
                if now_skipped { "skipped" } else { "restored" },
                self.cursor
            ),
            false,
        );
        self.push_plan(plan)
    }

    pub fn clear_skips(&mut self) -> Vec<Request> {
        if !self.editable() {
            return vec![];
        }
        self.set_status("back to the base model", false);
        self.push_plan(Plan::base())
    }

    pub fn undo(&mut self) -> Vec<Request> {
        if !self.editable() {
            return vec![];
        }
        if self.at == 0 {
            self.set_status("nothing to undo", false);
            return vec![];
        }
        self.jump(self.at - 1)
    }

    pub fn redo(&mut self) -> Vec<Request> {
        if !self.editable() {
            return vec![];
        }
        if self.at + 1 >= self.history.len() {
            self.set_status("nothing to redo", false);
            return vec![];
        }
        self.jump(self.at + 1)
    }

    /// Moves along the history without changing it.
    pub fn jump(&mut self, index: usize) -> Vec<Request> {
        if index >= self.history.len() || !self.editable() {
            return vec![];
        }
        self.at = index;
        self.dirty = true;
        self.set_status(
            format!(
                "plan {}/{}: {}",
                index + 1,
                self.history.len(),
                self.plan().describe()
            ),
            false,
        );
        self.evaluate_current()
    }

    pub fn move_cursor(&mut self, d_layer: isize, d_row: isize) {
        let n = self.info.n_layers as isize;
        let layer = (self.cursor.layer as isize + d_layer).clamp(0, n - 1) as usize;
        let kind = match (self.cursor.kind, d_row) {
            (_, 0) => self.cursor.kind,
            (_, r) if r < 0 => BlockKind::Attn,
            _ => BlockKind::Mlp,
        };
        self.cursor = BlockId { layer, kind };
    }

    pub fn start_search(&mut self, k: usize) -> Vec<Request> {
        if self.job.is_some() {
            self.set_status("a background job is running; Esc cancels it", true);
            return vec![];
        }
        // The search skips attention blocks, starting from the base model.
        let most = self.info.n_layers;
        if k == 0 || k > most {
            self.set_status(format!("K must be between 1 and {most}"), true);
            return vec![];
        }
        self.job = Some(LongJob::new(JobKind::Search { k }, self.now));
        self.set_status(format!("{}: {k} blocks", self.info.search_name), false);
        vec![Request::run(SearchJob { k })]
    }

    /// Fits Hopscotch scales for the current plan in the background.
    pub fn start_fit(&mut self) -> Vec<Request> {
        if self.job.is_some() {
            self.set_status("a background job is running; Esc cancels it", true);
            return vec![];
        }
        if self.plan().skip.is_empty() {
            self.set_status(
                "skip some blocks first: scales make up for skipped blocks",
                true,
            );
            return vec![];
        }
        self.job = Some(LongJob::new(JobKind::Fit, self.now));
        self.set_status(
            format!("fitting scales for {}", self.plan().describe()),
            false,
        );
        vec![Request::run(FitJob {
            plan: self.plan().clone(),
        })]
    }

    pub fn cancel_job(&mut self) -> Vec<Request> {
        match &mut self.job {
            Some(job) => {
                job.cancelling = true;
                vec![Request::CancelJob]
            }
            None => vec![],
        }
    }

    /// Runs the prompt through the base model and the plan, side by side;
    /// with `draft`, the plan drafts for the full model instead (the right
    /// column is then the full model's text, marked by who proposed it).
    pub fn generate(&mut self, draft: bool) -> Vec<Request> {
        let prompt = self.gen.prompt.trim().to_string();
        if prompt.is_empty() {
            self.set_status("the prompt is empty; e edits it", true);
            return vec![];
        }
        self.gen.base = GenSide {
            queued: true,
            ..Default::default()
        };
        self.gen.plan = GenSide {
            queued: true,
            ..Default::default()
        };
        self.gen.plan_label = self.plan().describe();
        self.gen.drafting = draft;
        self.gen.draft_plan = draft.then(|| self.plan().clone());
        vec![Request::run(PromptRun {
            prompt,
            plan: self.plan().clone(),
            draft,
        })]
    }

    /// Folds a worker result into the state.
    pub fn apply(&mut self, update: Update) -> Vec<Request> {
        match update {
            Update::Baseline(q) => {
                self.base_quality = Some(q);
            }
            Update::BaselineFailed(e) => {
                self.set_status(format!("base evaluation failed: {e}"), true);
                self.baseline_error = Some(e);
            }
            Update::EvalProgress { plan, done, total } => {
                self.eval = Some(PendingEval {
                    plan,
                    stage: EvalStage::Quality { done, total },
                });
            }
            Update::Quality {
                plan,
                quality,
                origin,
            } => {
                self.record_mut(&plan, origin).quality = Some(quality);
                self.dirty = true;
            }
            Update::SpeedStarted(plan) => {
                self.eval = Some(PendingEval {
                    plan,
                    stage: EvalStage::Speed,
                });
            }
            Update::Speed { plan, speed } => {
                self.record_mut(&plan, Origin::User).speed = Some(speed);
                if self.eval.as_ref().is_some_and(|e| e.plan == plan) {
                    self.eval = None;
                }
                self.dirty = true;
            }
            Update::EvalFailed { plan, error } => {
                if self.eval.as_ref().is_some_and(|e| e.plan == plan) {
                    self.eval = None;
                }
                self.set_status(
                    format!("evaluation of {} failed: {error}", plan.describe()),
                    true,
                );
            }
            Update::EvalCancelled(plan) => {
                if self.eval.as_ref().is_some_and(|e| e.plan == plan) {
                    self.eval = None;
                }
            }
            Update::JobStarted(kind) => {
                self.job = Some(LongJob::new(kind, self.now));
            }
            Update::JobProgress {
                done,
                total,
                loss,
                detail,
            } => {
                if let Some(job) = &mut self.job {
                    job.done = done;
                    job.total = total;
                    job.loss = loss.or(job.loss);
                    job.detail = detail;
                }
            }
            Update::JobFinished(summary) => {
                let was_search = self.search_running();
                self.job = None;
                self.set_status(summary, false);
                if was_search {
                    // The final plan's quality is known; its speed is not yet.
                    return self.evaluate_current();
                }
            }
            Update::JobFailed(e) => {
                self.job = None;
                self.set_status(e, true);
            }
            Update::JobCancelled => {
                let what = self.job.take().map(|j| j.kind.label()).unwrap_or_default();
                self.set_status(format!("{what} cancelled"), false);
                return self.evaluate_current();
            }
            Update::Job(result) => return result.apply(self),
            Update::Crashed { lane, message } => self.crashed(lane, message),
        }
        vec![]
    }

    /// A crashed job stops showing as under way; the screen stays and says what happened.
    fn crashed(&mut self, lane: LaneName, message: String) {
        let what = match lane {
            LaneName::Eval => {
                self.eval = None;
                // The base is measured first on this lane: not here yet, it never will be.
                if self.base_quality.is_none() {
                    self.baseline_error = Some(message.clone());
                }
                "the evaluation".to_string()
            }
            LaneName::Long => self
                .job
                .take()
                .map_or("a background job".into(), |j| j.kind.label()),
            LaneName::Gen => {
                for side in [&mut self.gen.base, &mut self.gen.plan] {
                    if side.running || side.queued {
                        side.running = false;
                        side.queued = false;
                        side.error = Some("crashed".into());
                    }
                }
                "generation".to_string()
            }
            LaneName::Glance => {
                if let Some(r) = &mut self.routing {
                    r.pending = None;
                    r.error = Some("crashed".into());
                }
                if self.kv.pending.take().is_some() {
                    self.kv.error = Some("crashed".into());
                }
                "the view's computation".to_string()
            }
        };
        self.set_status(format!("{what} crashed: {message}; please report it"), true);
    }

    /// Importance level 0..=3 of a block among the blocks scored so far (quartiles).
    pub fn level(&self, block: BlockId) -> Option<u8> {
        let v = self.importance.get(&block)?.get(self.metric)?;
        let all: Vec<f64> = self
            .importance
            .values()
            .filter_map(|s| s.get(self.metric))
            .collect();
        let below = all.iter().filter(|x| **x < v).count();
        Some(((below * 4) / all.len().max(1)).min(3) as u8)
    }

    /// The next x axis for the chart; speculative speed-up only once a
    /// draft run measured it.
    pub fn next_chart_x(&self) -> ChartX {
        match self.chart_x {
            ChartX::BlocksSkipped => ChartX::DecodeSpeedup,
            ChartX::DecodeSpeedup if self.records.iter().any(|r| r.speculative.is_some()) => {
                ChartX::SpeculativeSpeedup
            }
            ChartX::DecodeSpeedup | ChartX::SpeculativeSpeedup => ChartX::BlocksSkipped,
        }
    }

    /// Plans measured this session for the chart: (origin, blocks skipped, quality, speed).
    pub fn chart_points(&self, origin: Origin) -> Vec<(f64, f64)> {
        let mut pts: Vec<(f64, f64)> = self
            .records
            .iter()
            .filter(|r| r.origin == origin)
            .filter_map(|r| {
                let q = r.quality.as_ref()?;
                Some((self.chart_x.of(r)?, self.chart_y.of(q)))
            })
            .collect();
        if origin == Origin::Search {
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        pts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::LayerScales;

    pub fn info() -> ModelInfo {
        ModelInfo {
            identity: ModelIdentity {
                name: "test".into(),
                architecture: "llama".into(),
                n_layers: 4,
                shape: None,
                content_hash: "abc".into(),
            },
            n_layers: 4,
            attn_params: 100,
            mlp_params: 300,
            head_params: 400,
            heldout: String::new(),
            calibration: String::new(),
            speed: String::new(),
            search_name: "search".into(),
        }
    }

    #[test]
    fn toggle_undo_redo_walk_the_history() {
        let mut app = App::new(info(), Plan::base(), String::new(), Instant::now());
        assert_eq!(app.start(), vec![Request::Evaluate(Plan::base())]);
        app.move_cursor(2, 1);
        assert_eq!(app.cursor, BlockId::mlp(2));
        let reqs = app.toggle_cursor();
        let one = Plan::with_skips([BlockId::mlp(2)]);
        assert_eq!(reqs, vec![Request::Evaluate(one.clone())]);
        app.undo();
        assert_eq!(app.plan(), &Plan::base());
        app.redo();
        assert_eq!(app.plan(), &one);
        // A new edit after an undo drops the redo tail.
        app.undo();
        app.move_cursor(-5, -1);
        app.toggle_cursor();
        assert_eq!(app.history.len(), 2);
        assert_eq!(app.plan(), &Plan::with_skips([BlockId::attn(0)]));
    }

    #[test]
    fn restoring_a_block_gives_it_a_neutral_output_scale() {
        // An old fit left b_att = 0 on skipped attn.1: restored as it was,
        // the block would be computed and add nothing.
        let mut plan = Plan::with_skips([BlockId::attn(1)]);
        let mut scales = vec![LayerScales::IDENTITY; 4];
        scales[1] = LayerScales::from_array([0.0, 0.7, 1.0, 1.0]);
        plan.scales = Some(scales);
        let mut app = App::new(info(), plan, String::new(), Instant::now());
        app.cursor = BlockId::attn(1);
        app.toggle_cursor();
        assert!(!app.plan().skips_attn(1));
        assert_eq!(app.plan().scales_for(1).b_att, 1.0);
        assert_eq!(app.plan().scales_for(1).s_att, 0.7, "s_att is kept");
    }

    #[test]
    fn known_plans_are_not_evaluated_again() {
        let mut app = App::new(info(), Plan::base(), String::new(), Instant::now());
        let q = Quality {
            perplexity: 10.0,
            kl: 0.0,
            top1: 1.0,
        };
        let s = Speed {
            base_prefill: 1.0,
            base_decode: 1.0,
            plan_prefill: 1.0,
            plan_decode: 1.0,
            overlap: Overlap::default(),
        };
        app.apply(Update::Quality {
            plan: Plan::base(),
            quality: q,
            origin: Origin::User,
        });
        app.apply(Update::Speed {
            plan: Plan::base(),
            speed: s,
        });
        app.toggle_cursor();
        assert!(app.undo().is_empty());
    }

    #[test]
    fn shares_and_levels() {
        let mut app = App::new(info(), Plan::base(), String::new(), Instant::now());
        let (p, f) = app
            .info
            .skipped_shares(&Plan::with_skips([BlockId::mlp(0)]));
        assert!((p - 300.0 / 1600.0).abs() < 1e-12);
        assert!((f - 300.0 / 2000.0).abs() < 1e-12);
        for l in 0..4 {
            app.apply(Update::job(crate::tui::jobs::importance::Scored {
                block: BlockId::attn(l),
                scores: BlockScores {
                    delta_loss: Some(l as f64),
                    influence: None,
                },
            }));
        }
        assert_eq!(app.level(BlockId::attn(0)), Some(0));
        assert_eq!(app.level(BlockId::attn(3)), Some(3));
        assert_eq!(app.level(BlockId::mlp(3)), None);
    }

    /// A toy result of some future mode's job: one type, no enum touched.
    #[derive(Debug)]
    struct Swept(usize);

    impl Apply for Swept {
        fn apply(self: Box<Self>, app: &mut App) -> Vec<Request> {
            app.set_status(format!("swept {} budgets", self.0), false);
            vec![]
        }
    }

    #[test]
    fn a_job_of_another_mode_needs_no_variant_of_its_own() {
        let mut app = App::new(info(), Plan::base(), "hi".into(), Instant::now());
        app.apply(Update::JobStarted(JobKind::Named("kv sweep")));
        assert_eq!(app.job.as_ref().unwrap().kind.label(), "kv sweep");
        app.apply(Update::job(Swept(3)));
        assert_eq!(app.status.as_ref().unwrap().text, "swept 3 budgets");
        assert_eq!(app.cancel_job(), vec![Request::CancelJob]);
        app.apply(Update::JobCancelled);
        assert!(app.job.is_none());
        assert_eq!(app.status.as_ref().unwrap().text, "kv sweep cancelled");
        // Requests carrying jobs compare by what the job is.
        let run = |draft| {
            Request::run(PromptRun {
                prompt: "hi".into(),
                plan: Plan::base(),
                draft,
            })
        };
        assert_eq!(app.generate(true), vec![run(true)]);
        assert_ne!(run(true), run(false));
        assert_eq!(run(false).job_name().as_deref(), Some("generation"));
    }

    #[test]
    fn search_locks_the_plan_until_it_ends() {
        let mut app = App::new(info(), Plan::base(), String::new(), Instant::now());
        assert_eq!(app.start_search(99), vec![]);
        let reqs = app.start_search(2);
        assert_eq!(reqs, vec![Request::run(SearchJob { k: 2 })]);
        assert_eq!(reqs[0].job_name().as_deref(), Some("search K=2"));
        assert!(app.toggle_cursor().is_empty());
        assert!(app.status.as_ref().unwrap().error);
        app.apply(Update::job(crate::tui::jobs::search::Step(
            Plan::with_skips([BlockId::mlp(1)]),
        )));
        assert_eq!(app.cursor, BlockId::mlp(1));
        let reqs = app.apply(Update::JobFinished("done".into()));
        assert!(app.job.is_none());
        assert_eq!(reqs.len(), 1);
    }
}
