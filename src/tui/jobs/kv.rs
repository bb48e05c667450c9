//! The KV view's state and jobs: which keys a KV budget policy keeps, per
//! layer, for the current prompt (a quick job: the prompt, and the base
//! model's continuation once generated, prefilled through the cache in
//! small chunks with the policy acting between them), and a long-context
//! measurement of the policy against the full cache (`eval --kv` on the
//! first `LONG_CONTEXT` tokens of the built-in text, in the background).

use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use candle_core::Tensor;

use super::activity::Busy;
use super::interface::{Apply, Job, JobCx, JobLane};
use crate::eval::data::DEFAULT_EVAL_TEXT;
use crate::eval::kv::{evaluate_kv_under, KvEvalOptions, KvEvalReport};
use crate::model::kv::{quest, KeptKeys, KvPolicy, KvSpec};
use crate::model::{Model, Pass, RunOptions};
use crate::plan::{KvSection, Plan};
use crate::tui::app::{App, JobKind, Request, Update};

/// The policies the view cycles through (`t`), in that order.
pub const KINDS: [&str; 5] = ["quest", "streaming", "window", "h2o", "snapkv"];
/// Budgets the view offers (`+` / `-` double and halve within these).
pub const MIN_BUDGET: usize = 16;
pub const MAX_BUDGET: usize = 4096;
/// A short prompt would fit any long-context budget; this one shows eviction.
pub const DEFAULT_BUDGET: usize = 32;
/// The view's prefill chunk: the policy acts after every chunk.
pub const MAP_CHUNK: usize = 16;
/// The long-context measurement: context and prefill chunk (as `eval --kv`).
pub const LONG_CONTEXT: usize = 2048;
pub const LONG_CHUNK: usize = 256;

/// The policy a kind and budget make (every kind parses at every budget ≥
/// `MIN_BUDGET`: SnapKV's window and StreamingLLM's sinks shrink to fit).
pub fn spec_of(kind: &str, budget: usize) -> KvSpec {
    let text = match kind {
        "snapkv" => format!("snapkv:{budget}:{}", (budget / 2).min(32)),
        "streaming" => format!("streaming:{budget}:{}", (budget / 4).min(4)),
        _ => format!("{kind}:{budget}"),
    };
    text.parse().unwrap_or(KvSpec::Window { budget })
}

/// Per layer, the share of KV heads that keep (or, for Quest, attend to
/// from the last query) each position; `None` where the layer holds no K/V
/// (its attention is skipped).
#[derive(Debug, Clone, PartialEq)]
pub struct KeptMap {
    pub tokens: usize,
    pub layers: Vec<Option<Vec<f32>>>,
    /// Layers with their own sliding window (Gemma 3's local layers),
    /// which keep it whatever the policy.
    pub local_layers: usize,
    /// Leading layers the policy leaves dense (Quest's first two).
    pub dense_layers: usize,
    /// Live K/V bytes under the policy (Quest: plus its page tables), and
    /// with the full cache.
    pub kv_bytes: usize,
    pub full_kv_bytes: usize,
}

impl KeptMap {
    /// Mean over the layers with K/V of the keys kept per KV head.
    pub fn mean_kept(&self) -> f64 {
        let kept: Vec<f64> = self
            .layers
            .iter()
            .flatten()
            .map(|l| l.iter().map(|&s| f64::from(s)).sum())
            .collect();
        kept.iter().sum::<f64>() / kept.len().max(1) as f64
    }
}

/// Which keys `spec` keeps for `ids` under `plan`, prefilled in chunks of
/// `chunk` tokens with the policy acting between them.
pub fn kept_map(
    model: &Model,
    plan: &Plan,
    ids: &[u32],
    spec: &KvSpec,
    chunk: usize,
    run: RunOptions,
) -> Result<KeptMap> {
    anyhow::ensure!(!ids.is_empty(), "no tokens: the prompt is empty");
    model.check_plan(plan)?;
    let t = &model.transformer;
    let mut policy = KvPolicy::new(spec.clone(), model.cfg())?;
    let mut state = t.new_state(ids.len());
    let mut last_kept = Vec::new();
    for piece in ids.chunks(chunk.max(1)) {
        let input = Tensor::new(piece, model.device())?.unsqueeze(0)?;
        policy.begin_pass(piece.len());
        let mut pass = Pass::plan(plan, run)
            .with_state(&mut state)
            .with_probe(&mut policy);
        t.forward_hidden(&input, &mut pass)?;
        last_kept = (0..t.n_layers()).map(|l| policy.kept(l, &state)).collect();
        policy.end_pass(&mut state)?;
    }
    let cfg = model.cfg();
    // The full cache holds every position in a global layer; a local layer
    // keeps its own window under any policy, as it does here.
    let full_kv_bytes = (0..t.n_layers())
        .filter_map(|l| {
            let store = state.kv(l).filter(|s| !s.is_empty())?;
            Some(match cfg.layer_window(l) {
                Some(_) => store.bytes(),
                None => store.bytes() / store.len() * ids.len(),
            })
        })
        .sum();
    let layers = (0..t.n_layers())
        .map(|l| {
            state.kv(l).filter(|s| !s.is_empty())?;
            // Evicting policies: what the next query will see; Quest: what
            // the last query attended to.
            let kept = match &last_kept[l] {
                k @ KeptKeys::Pages { .. } => k.clone(),
                _ => policy.kept(l, &state),
            };
            Some(shares(&kept, ids.len(), cfg.n_kv_heads))
        })
        .collect();
    Ok(KeptMap {
        tokens: ids.len(),
        layers,
        local_layers: (0..cfg.n_layers)
            .filter(|&l| cfg.layer_window(l).is_some())
            .count(),
        dense_layers: match spec {
            KvSpec::Quest { dense_layers, .. } => *dense_layers,
            _ => 0,
        },
        kv_bytes: state.bytes() + policy.metadata_bytes(),
        full_kv_bytes,
    })
}

/// Per position, the share of KV heads whose kept keys include it.
fn shares(kept: &KeptKeys, tokens: usize, kv_heads: usize) -> Vec<f32> {
    let mut share = vec![0.0f32; tokens];
    let one = 1.0 / kv_heads as f32;
    let mut mark = |p: usize| {
        if let Some(s) = share.get_mut(p) {
            *s += one;
        }
    };
    match kept {
        KeptKeys::All => return vec![1.0; tokens],
        KeptKeys::Positions(heads) => heads.iter().flatten().for_each(|&p| mark(p as usize)),
        KeptKeys::Pages { page, picks } => {
            for per_query in picks {
                match per_query.last() {
                    Some(Some(pages)) => pages
                        .iter()
                        .flat_map(|&p| quest::page_span(p, *page))
                        .for_each(&mut mark),
                    _ => (0..tokens).for_each(&mut mark),
                }
            }
        }
    }
    share
}

/// One long-context measurement, as shown in the view's table.
#[derive(Debug, Clone, PartialEq)]
pub struct LongRow {
    pub policy: String,
    pub plan: String,
    pub context: usize,
    pub full_perplexity: f64,
    pub perplexity: f64,
    pub kl: f64,
    pub top1: f64,
    pub recall: Option<f64>,
    pub kv_bytes: usize,
    pub full_kv_bytes: usize,
    pub scored_from: usize,
    pub seconds: f64,
}

impl LongRow {
    fn from_report(r: &KvEvalReport, plan: &Plan) -> Option<Self> {
        let row = r.rows.first()?;
        Some(Self {
            policy: row.policy.clone(),
            plan: plan.describe(),
            context: r.context,
            full_perplexity: r.full_perplexity,
            perplexity: row.perplexity,
            kl: row.kl_to_full,
            top1: row.top1_agreement,
            recall: row.attention_recall,
            kv_bytes: row.kv_bytes,
            full_kv_bytes: r.full_kv_bytes,
            scored_from: r.scored_from,
            seconds: r.seconds,
        })
    }
}

/// What the kept-keys map was computed for.
#[derive(Debug, Clone, PartialEq)]
pub struct MapKey {
    pub spec: KvSpec,
    pub plan: Plan,
    pub prompt: String,
    pub continuation: String,
}

/// The KV view: the policy being looked at, its map for the current
/// prompt, and the long-context measurements of this session.
#[derive(Debug, Clone, PartialEq)]
pub struct KvView {
    pub kind: usize,
    pub budget: usize,
    /// An opened plan's policy, exactly as written (its page size, sinks
    /// or dense layers), until `t` or `+`/`-` change it.
    pub opened: Option<KvSpec>,
    /// Saved as the plan's `kv` section (`a`); opened plans set it.
    pub attached: bool,
    pub map: Option<(MapKey, KeptMap)>,
    pub pending: Option<MapKey>,
    pub error: Option<String>,
    pub long: Vec<LongRow>,
}

impl Default for KvView {
    fn default() -> Self {
        Self {
            kind: 0,
            budget: DEFAULT_BUDGET,
            opened: None,
            attached: false,
            map: None,
            pending: None,
            error: None,
            long: Vec::new(),
        }
    }
}

impl KvView {
    pub fn spec(&self) -> KvSpec {
        match &self.opened {
            Some(spec) => spec.clone(),
            None => spec_of(KINDS[self.kind], self.budget),
        }
    }

    /// Takes a plan file's `kv` section: its policy, attached.
    pub fn adopt(&mut self, section: &KvSection) -> Result<()> {
        let spec = section.spec()?;
        let kind = KINDS
            .iter()
            .position(|k| *k == spec.name())
            .with_context(|| format!("the KV view cannot show `{spec}`"))?;
        self.kind = kind;
        self.budget = spec.budget().unwrap_or(DEFAULT_BUDGET);
        self.opened = Some(spec);
        self.attached = true;
        Ok(())
    }

    /// The plan's `kv` section when the policy is attached.
    pub fn section(&self) -> Option<KvSection> {
        self.attached.then(|| KvSection {
            policy: self.spec().to_string(),
        })
    }
}

impl App {
    fn kv_key(&self) -> MapKey {
        let base = &self.gen.base;
        let continuation = match base.running || base.queued || base.error.is_some() {
            true => String::new(),
            false => base.text.clone(),
        };
        MapKey {
            spec: self.kv.spec(),
            plan: self.plan().clone(),
            prompt: self.gen.prompt.trim().to_string(),
            continuation,
        }
    }

    /// Maps the kept keys again when the policy, plan or prompt changed.
    pub fn refresh_kv_map(&mut self) -> Vec<Request> {
        let key = self.kv_key();
        if key.prompt.is_empty() {
            self.set_status("the prompt is empty; e edits it", true);
            return vec![];
        }
        let v = &mut self.kv;
        let known = v.map.as_ref().is_some_and(|(k, _)| *k == key);
        if known || v.pending.as_ref() == Some(&key) {
            return vec![];
        }
        v.pending = Some(key.clone());
        v.error = None;
        vec![Request::run(KvMapJob { key })]
    }

    /// `t`: the next policy.
    pub fn next_kv_policy(&mut self) -> Vec<Request> {
        self.kv.opened = None;
        self.kv.kind = (self.kv.kind + 1) % KINDS.len();
        self.kv_changed()
    }

    /// `+` / `-`: doubles or halves the budget.
    pub fn scale_kv_budget(&mut self, up: bool) -> Vec<Request> {
        self.kv.opened = None;
        let b = self.kv.budget;
        self.kv.budget = match up {
            true => (b * 2).min(MAX_BUDGET),
            false => (b / 2).max(MIN_BUDGET),
        };
        self.kv_changed()
    }

    fn kv_changed(&mut self) -> Vec<Request> {
        if self.kv.attached {
            self.set_status(
                format!("plan's KV policy now {} (s saves it)", self.kv.spec()),
                false,
            );
        }
        self.refresh_kv_map()
    }

    /// `a`: makes the policy the plan's `kv` section, or detaches it.
    pub fn toggle_kv_attached(&mut self) {
        self.kv.attached = !self.kv.attached;
        let text = match self.kv.attached {
            true => format!(
                "{} is the plan's KV policy: s saves it in the plan's kv section",
                self.kv.spec()
            ),
            false => "the plan has no KV policy now".to_string(),
        };
        self.set_status(text, false);
    }

    /// `L`: measures the policy at long context in the background.
    pub fn measure_kv_long(&mut self) -> Vec<Request> {
        vec![Request::run(KvLongJob {
            spec: self.kv.spec(),
            plan: self.plan().clone(),
            context: LONG_CONTEXT,
        })]
    }
}

/// Maps which keys the policy keeps for a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct KvMapJob {
    pub key: MapKey,
}

impl KvMapJob {
    pub fn map(&self, model: &Model, run: RunOptions) -> Result<KeptMap> {
        let mut ids = model.prompt_ids_preferring_chat(&self.key.prompt)?;
        if !self.key.continuation.is_empty() {
            ids.extend(model.codec()?.encode(&self.key.continuation)?);
        }
        let plan = model.with_implied(&self.key.plan);
        kept_map(model, &plan, &ids, &self.key.spec, MAP_CHUNK, run)
    }
}

impl Job for KvMapJob {
    fn name(&self) -> String {
        "kept keys".into()
    }

    fn lane(&self) -> JobLane {
        JobLane::Glance
    }

    fn run(self: Box<Self>, cx: &JobCx) {
        let _busy = cx.busy(Busy::Other);
        let result = self
            .map(cx.model, cx.setup.gen_run)
            .map_err(|e| format!("{e:#}"));
        cx.apply(Mapped {
            key: self.key,
            result,
        });
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub key: MapKey,
    pub result: std::result::Result<KeptMap, String>,
}

impl Apply for Mapped {
    fn apply(self: Box<Self>, app: &mut App) -> Vec<Request> {
        let v = &mut app.kv;
        // Only the latest request's answer counts.
        if v.pending.as_ref() != Some(&self.key) {
            return vec![];
        }
        v.pending = None;
        match self.result {
            Ok(map) => v.map = Some((self.key, map)),
            Err(e) => {
                v.error = Some(e.clone());
                app.set_status(format!("kept keys: {e}"), true);
            }
        }
        vec![]
    }
}

/// `eval --kv` of one policy on the first `context` tokens of the built-in
/// text (`LONG_CONTEXT` from the view), under the current plan.
#[derive(Debug, Clone, PartialEq)]
pub struct KvLongJob {
    pub spec: KvSpec,
    pub plan: Plan,
    pub context: usize,
}

impl KvLongJob {
    pub fn measure(
        &self,
        model: &Model,
        cancel: Option<&AtomicBool>,
        progress: impl FnMut(usize, usize),
    ) -> Result<LongRow> {
        let mut ids = model.codec()?.encode(DEFAULT_EVAL_TEXT)?;
        let context = self.context.min(model.transformer.max_positions());
        ids.truncate(context);
        let plan = model.with_implied(&self.plan);
        let opts = KvEvalOptions {
            context,
            chunk: LONG_CHUNK,
            recall: true,
            run: RunOptions::FAST,
            parallel_windows: false,
            cancel,
        };
        let report = evaluate_kv_under(
            model,
            &ids,
            &plan,
            std::slice::from_ref(&self.spec),
            opts,
            progress,
        )?;
        LongRow::from_report(&report, &plan).context("the measurement returned no row")
    }
}

impl Job for KvLongJob {
    fn name(&self) -> String {
        format!("long-context {}", self.spec)
    }

    fn lane(&self) -> JobLane {
        JobLane::Long
    }

    fn run(self: Box<Self>, cx: &JobCx) {
        let _busy = cx.busy(Busy::Other);
        cx.send(Update::JobStarted(JobKind::Named("long-context KV")));
        cx.send(Update::JobProgress {
            done: 0,
            total: 1,
            loss: None,
            detail: format!(
                "{} vs the full cache: {} tokens in chunks of {LONG_CHUNK}",
                self.spec, self.context
            ),
        });
        match self.measure(cx.model, Some(cx.cancel()), |_, _| {}) {
            // Stopped between chunks, or finished after the cancel: dropped.
            _ if cx.cancelled() => cx.send(Update::JobCancelled),
            Ok(row) => {
                let done = format!(
                    "{} at {} tokens: KL {:.4}, recall {}",
                    row.policy,
                    row.context,
                    row.kl,
                    row.recall
                        .map_or("-".into(), |r| format!("{:.1}%", 100.0 * r))
                );
                cx.apply(Measured { row });
                cx.send(Update::JobFinished(done));
            }
            Err(e) => cx.send(Update::JobFailed(format!("long-context KV: {e:#}"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    pub row: LongRow,
}

impl Apply for Measured {
    fn apply(self: Box<Self>, app: &mut App) -> Vec<Request> {
        app.kv.long.push(self.row);
        vec![]
    }
}
