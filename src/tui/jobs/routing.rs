//! The routing view's job: a routed plan's routers over the current prompt
//! (and the base model's continuation, once generated), every token's
//! decision per block recorded, and the compute they realised counted as
//! `eval --json`'s `executed_fraction` counts it (the routing policy's own
//! counts: blocks executed per token over all blocks, static skips not
//! executed). Also the view's state in the app and what changes it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Tensor;

use super::activity::Busy;
use super::interface::{Apply, Job, JobCx, JobLane};
use crate::model::pass::{AttnExec, MlpExec, Probe};
use crate::model::routing::{load_from_plan, slot, RoutingSection, ROUTING_SECTION};
use crate::model::{Model, Pass, RunOptions};
use crate::plan::{BlockId, Plan, PlanFile};
use crate::surgery::routing::measure::Routed;
use crate::tui::app::{App, Request};

/// How to get a routed plan, for the view and the status line.
pub const HOW_TO_ROUTE: &str = "scalpel route --capacity 0.9 --out routed.json";

/// Tokens the scroll keys move by.
pub const SCROLL_STEP: usize = 8;

/// What one token did at one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    /// Its router sent it through the block.
    Ran,
    /// Its router sent it past the block.
    Skipped,
    /// The plan under the routers skips the block for every token.
    Static,
    /// The block has no router: every token runs it.
    Unrouted,
}

impl Cell {
    pub fn executed(self) -> bool {
        matches!(self, Cell::Ran | Cell::Unrouted)
    }
}

/// Every token's decision at every block, and the compute realised.
#[derive(Debug, Clone, PartialEq)]
pub struct Decisions {
    /// `cells[token][slot]`, slots as `routing::slot` (attn.0, mlp.0, attn.1, …).
    pub cells: Vec<Vec<Cell>>,
    /// Blocks executed per token over all blocks, measured by the policy.
    pub executed_fraction: f64,
    /// Executed share of the routed blocks only (what `capacity` targets).
    pub routed_share: f64,
}

impl Decisions {
    pub fn get(&self, token: usize, block: BlockId) -> Cell {
        self.cells[token][slot(block)]
    }

    /// Share of the blocks this token executed.
    pub fn token_share(&self, token: usize) -> f64 {
        let row = &self.cells[token];
        row.iter().filter(|c| c.executed()).count() as f64 / row.len().max(1) as f64
    }
}

/// Records which rows each block ran, from the policy's decisions.
struct Recorder {
    tokens: usize,
    /// Per slot, the tokens that ran the block.
    ran: Vec<Vec<bool>>,
}

impl Recorder {
    fn mark(&mut self, block: BlockId, rows: Option<&[u32]>, all: bool) {
        let ran = &mut self.ran[slot(block)];
        match rows {
            Some(rows) => rows.iter().for_each(|&r| ran[r as usize] = true),
            None => ran.iter_mut().for_each(|r| *r = all),
        }
    }
}

impl Probe for Recorder {
    fn attn_decision(&mut self, layer: usize, exec: &AttnExec) -> candle_core::Result<()> {
        let block = BlockId::attn(layer);
        match exec {
            AttnExec::Rows { rows, .. } => self.mark(block, Some(rows), false),
            AttnExec::Skip | AttnExec::KvOnly => self.mark(block, None, false),
            _ => self.mark(block, None, true),
        }
        Ok(())
    }

    fn mlp_decision(&mut self, layer: usize, exec: &MlpExec) -> candle_core::Result<()> {
        let block = BlockId::mlp(layer);
        match exec {
            MlpExec::Rows(rows) => self.mark(block, Some(rows), false),
            MlpExec::Skip => self.mark(block, None, false),
            _ => self.mark(block, None, true),
        }
        Ok(())
    }
}

/// The routers' decisions for `ids` as one prefill, routing carried out
/// for real (the pass `eval` runs on each window).
pub fn decide(model: &Model, ids: &[u32], routed: &Routed) -> Result<Decisions> {
    anyhow::ensure!(!ids.is_empty(), "no tokens to route: the prompt is empty");
    model.check_plan(routed.plan)?;
    let n_layers = model.n_layers();
    let policy = routed.policy(model);
    let mut rec = Recorder {
        tokens: ids.len(),
        ran: vec![vec![false; ids.len()]; 2 * n_layers],
    };
    let input = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    let mut pass = Pass::plan(routed.plan, RunOptions::FAST)
        .with_policy(&policy)
        .with_probe(&mut rec);
    model.transformer.forward_hidden(&input, &mut pass)?;
    let kind_of = |s: usize| match s % 2 {
        0 => BlockId::attn(s / 2),
        _ => BlockId::mlp(s / 2),
    };
    let cells = (0..rec.tokens)
        .map(|t| {
            (0..2 * n_layers)
                .map(|s| {
                    let block = kind_of(s);
                    if routed.plan.is_skipped(block) {
                        Cell::Static
                    } else if !routed.routers.by_block.contains_key(&block) {
                        Cell::Unrouted
                    } else if rec.ran[s][t] {
                        Cell::Ran
                    } else {
                        Cell::Skipped
                    }
                })
                .collect()
        })
        .collect();
    let per_block = policy.counts.per_block();
    let routed_slots: Vec<f64> = routed
        .routers
        .by_block
        .keys()
        .filter(|b| !routed.plan.is_skipped(**b))
        .map(|&b| per_block[slot(b)])
        .collect();
    Ok(Decisions {
        cells,
        executed_fraction: policy.counts.executed_fraction(),
        routed_share: routed_slots.iter().sum::<f64>() / routed_slots.len().max(1) as f64,
    })
}

/// What was routed: the plan file, the prompt and the continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteKey {
    pub path: PathBuf,
    pub prompt: String,
    /// The base model's continuation in the generation panel ("" before one).
    pub continuation: String,
}

/// The decisions for one key, with the tokens as text pieces.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutedTokens {
    pub key: RouteKey,
    pub pieces: Vec<String>,
    /// The first `prompt_tokens` pieces are the prompt (chat template included).
    pub prompt_tokens: usize,
    pub decisions: Decisions,
}

/// The routed plan the workbench has open, and the latest decisions.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingState {
    pub path: PathBuf,
    pub section: RoutingSection,
    /// The static plan under the routers.
    pub plan: Plan,
    pub tokens: Option<RoutedTokens>,
    pub pending: Option<RouteKey>,
    pub error: Option<String>,
    /// The first token row shown.
    pub scroll: usize,
}

impl RoutingState {
    pub fn new(path: PathBuf, section: RoutingSection, plan: Plan) -> Self {
        Self {
            path,
            section,
            plan,
            tokens: None,
            pending: None,
            error: None,
            scroll: 0,
        }
    }
}

/// The routing section of a plan file, if it has one (the routers
/// themselves are read by the job, against the model).
pub fn section_of(file: &PlanFile) -> Result<Option<RoutingSection>> {
    file.sections.get::<RoutingSection>(ROUTING_SECTION)
}

impl App {
    /// Makes `path`'s routing the routing view's, and routes the prompt.
    pub fn open_routing(
        &mut self,
        path: &Path,
        section: RoutingSection,
        plan: Plan,
    ) -> Vec<Request> {
        self.routing = Some(RoutingState::new(path.to_path_buf(), section, plan));
        self.refresh_routing(false)
    }

    /// What the routing view would route now.
    fn route_key(&self) -> Option<RouteKey> {
        let r = self.routing.as_ref()?;
        let base = &self.gen.base;
        let continuation = match base.running || base.queued || base.error.is_some() {
            true => String::new(),
            false => base.text.clone(),
        };
        Some(RouteKey {
            path: r.path.clone(),
            prompt: self.gen.prompt.trim().to_string(),
            continuation,
        })
    }

    /// Routes the prompt (and continuation) again when they changed since
    /// the last decisions, or always with `force`.
    pub fn refresh_routing(&mut self, force: bool) -> Vec<Request> {
        let Some(key) = self.route_key() else {
            if force {
                self.set_status(
                    format!("no routed plan: {HOW_TO_ROUTE}, then o opens it"),
                    true,
                );
            }
            return vec![];
        };
        if key.prompt.is_empty() {
            self.set_status("the prompt is empty; e edits it", true);
            return vec![];
        }
        let r = self.routing.as_mut().expect("route_key checked it");
        let known = r.tokens.as_ref().is_some_and(|t| t.key == key);
        if !force && (known || r.pending.as_ref() == Some(&key)) {
            return vec![];
        }
        r.pending = Some(key.clone());
        r.error = None;
        vec![Request::run(RoutingJob { key })]
    }

    /// Moves the routing view's first row by `by` tokens.
    pub fn scroll_routing(&mut self, by: isize) {
        let Some(r) = &mut self.routing else {
            self.set_status(
                format!("no routed plan: {HOW_TO_ROUTE}, then o opens it"),
                true,
            );
            return;
        };
        let n = r.tokens.as_ref().map_or(0, |t| t.pieces.len());
        r.scroll = r.scroll.saturating_add_signed(by).min(n.saturating_sub(1));
    }
}

/// Routes a prompt through the routed plan at `key.path`.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingJob {
    pub key: RouteKey,
}

impl RoutingJob {
    /// The decisions for the key, with the tokens as text (what `run` sends).
    pub fn routes(&self, model: &Model) -> Result<RoutedTokens> {
        let path = &self.key.path;
        let file = PlanFile::load(path)?;
        file.check_model(&model.identity)
            .with_context(|| format!("cannot use plan {}", path.display()))?;
        let plan = model.with_implied(&file.plan);
        let (section, routers) = load_from_plan(&file, model)?.with_context(|| {
            format!("plan {} has no `{ROUTING_SECTION}` section", path.display())
        })?;
        let codec = model.codec()?;
        let mut ids = model.prompt_ids_preferring_chat(&self.key.prompt)?;
        let prompt_tokens = ids.len();
        if !self.key.continuation.is_empty() {
            ids.extend(codec.encode(&self.key.continuation)?);
        }
        let routed = Routed {
            plan: &plan,
            routers: &routers,
            kv: section.kv,
            threshold: section.threshold,
        };
        let decisions = decide(model, &ids, &routed)?;
        let pieces = ids
            .iter()
            .map(|&id| codec.tokenizer.decode(&[id], false).unwrap_or_default())
            .collect();
        Ok(RoutedTokens {
            key: self.key.clone(),
            pieces,
            prompt_tokens,
            decisions,
        })
    }
}

impl Job for RoutingJob {
    fn name(&self) -> String {
        "routing decisions".into()
    }

    fn lane(&self) -> JobLane {
        JobLane::Glance
    }

    fn run(self: Box<Self>, cx: &JobCx) {
        let _busy = cx.busy(Busy::Other);
        let result = self.routes(cx.model).map_err(|e| format!("{e:#}"));
        cx.apply(Routes {
            key: self.key,
            result,
        });
    }
}

/// The decisions for a key, or why there are none.
#[derive(Debug, Clone, PartialEq)]
pub struct Routes {
    pub key: RouteKey,
    pub result: std::result::Result<RoutedTokens, String>,
}

impl Apply for Routes {
    fn apply(self: Box<Self>, app: &mut App) -> Vec<Request> {
        let Some(r) = &mut app.routing else {
            return vec![];
        };
        // Only the latest request's answer counts.
        if r.pending.as_ref() != Some(&self.key) {
            return vec![];
        }
        r.pending = None;
        match self.result {
            Ok(tokens) => {
                r.scroll = r.scroll.min(tokens.pieces.len().saturating_sub(1));
                r.tokens = Some(tokens);
            }
            Err(e) => {
                app.set_status(format!("routing failed: {e}"), true);
                if let Some(r) = &mut app.routing {
                    r.error = Some(e);
                }
            }
        }
        vec![]
    }
}
