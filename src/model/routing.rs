//! Token routing at inference: one small router per routed block reads the
//! residual stream entering the block and decides, per token, whether the
//! block runs (SkipGPT / Router-Tuning, retrofitted on frozen weights).
//!
//! A router reads the RMS-normalised input x̂ = x/rms(x) (normalised because
//! SmolLM2's residual stream grows by orders of magnitude across layers):
//! linear, `logit = w·x̂ + b`, or SkipGPT's small MLP, `logit =
//! w·relu(W₁x̂ + b₁) + b` with W₁ of d/4 × d (SkipGPT's two softmax outputs
//! decide by their difference, which is this one logit). A token runs the block when its logit exceeds
//! the plan's threshold. The decision is carried out for real: prefill
//! gathers the routed rows (`AttnExec::Rows` / `MlpExec::Rows`), a decode
//! step runs or skips the block. A token that skips attention either still
//! writes its K/V (`KvPolicy::Write`, what training saw) or leaves a gap
//! later tokens cannot attend to (`KvPolicy::Gap`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use super::params::{ParamValues, SeededRng};
use super::pass::{AttnExec, LayerPolicy, MlpExec};
use super::Model;
use crate::plan::{BlockId, BlockKind, Plan, PlanFile};

/// The plan section that turns routing on.
pub const ROUTING_SECTION: &str = "routing";

/// The artifact name `scalpel route` writes the routers under.
pub const ROUTERS_ARTIFACT: &str = "routers";

/// RMS normalisation's epsilon inside a router.
const ROUTER_EPS: f64 = 1e-6;

/// Which blocks get a router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteOn {
    Attn,
    Mlp,
    Both,
}

impl RouteOn {
    pub fn includes(self, kind: BlockKind) -> bool {
        matches!(
            (self, kind),
            (RouteOn::Both, _) | (RouteOn::Attn, BlockKind::Attn) | (RouteOn::Mlp, BlockKind::Mlp)
        )
    }
}

/// What a token that skips an attention block leaves in that layer's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvPolicy {
    /// Its K/V are still projected and written (two small matmuls), so later
    /// tokens attend to it as in training.
    Write,
    /// Nothing is written: later tokens cannot attend to it at that layer.
    Gap,
}

/// The `routing` section of a plan: which artifact holds the routers, and
/// how their decisions are taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingSection {
    pub artifact: String,
    pub on: RouteOn,
    /// The trained target: the share of routed token-blocks that execute.
    pub capacity: f64,
    pub kv: KvPolicy,
    /// A token runs a block when its router logit exceeds this (calibrated
    /// after training so the calibration set executes `capacity`).
    pub threshold: f32,
}

/// Refuses a capacity outside (0, 1].
pub fn check_capacity(capacity: f64) -> anyhow::Result<()> {
    if !(capacity > 0.0 && capacity <= 1.0) {
        bail!(
            "capacity {capacity} is outside (0, 1]: it is the share of routed blocks a token \
             executes, e.g. 0.8"
        );
    }
    Ok(())
}

/// The section check `plan::SECTIONS` runs when a plan is read.
pub fn check_section(value: &serde_json::Value) -> anyhow::Result<()> {
    let s: RoutingSection = serde_json::from_value(value.clone()).context(
        "expected {\"artifact\": \"routers\", \"on\": \"attn|mlp|both\", \"capacity\": C, \
         \"kv\": \"write|gap\", \"threshold\": T}",
    )?;
    check_capacity(s.capacity)?;
    if !s.threshold.is_finite() {
        bail!("the routing threshold must be a finite number");
    }
    Ok(())
}

/// Tensor names of a block's router inside the artifact.
pub fn weight_name(block: BlockId) -> String {
    format!("router.{block}.w")
}

pub fn bias_name(block: BlockId) -> String {
    format!("router.{block}.b")
}

pub fn hidden_weight_name(block: BlockId) -> String {
    format!("router.{block}.w1")
}

pub fn hidden_bias_name(block: BlockId) -> String {
    format!("router.{block}.b1")
}

/// The router's form (`route --router linear|mlp`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouterKind {
    /// `w·x̂ + b`: hidden + 1 parameters per block.
    #[default]
    Linear,
    /// SkipGPT's d → d/4 → 1 with a ReLU: d²/4 + d/2 + 1 parameters per block.
    Mlp,
}

impl RouterKind {
    /// The hidden layer's width for a model of `hidden` (None: linear).
    pub fn width(self, hidden: usize) -> Option<usize> {
        match self {
            RouterKind::Linear => None,
            RouterKind::Mlp => Some((hidden / 4).max(1)),
        }
    }
}

/// One block's router: output weight (hidden, or the hidden layer's width)
/// and bias (1), after an optional hidden layer.
#[derive(Debug, Clone)]
pub struct Router {
    pub w: Tensor,
    pub b: Tensor,
    pub hidden: Option<RouterHidden>,
}

/// A router's hidden layer: weight (width, hidden) and bias (width), ReLU.
#[derive(Debug, Clone)]
pub struct RouterHidden {
    pub w: Tensor,
    pub b: Tensor,
}

impl Router {
    /// The router's tensors by reference, for `router_logits`.
    pub fn weights(&self) -> RouterWeights<'_> {
        RouterWeights {
            w: &self.w,
            b: &self.b,
            hidden: self.hidden.as_ref().map(|h| (&h.w, &h.b)),
        }
    }

    pub fn kind(&self) -> RouterKind {
        match self.hidden {
            Some(_) => RouterKind::Mlp,
            None => RouterKind::Linear,
        }
    }

    /// A bound on |logit| for any input (|x̂| = √hidden): the threshold
    /// calibration's bracket.
    pub fn logit_bound(&self, hidden: usize) -> Result<f32> {
        let norm =
            |t: &Tensor| -> Result<f32> { t.sqr()?.sum_all()?.to_scalar::<f32>().map(f32::sqrt) };
        let input = (hidden as f32).sqrt();
        let b = self.b.flatten_all()?.to_vec1::<f32>()?[0].abs();
        let feature = match &self.hidden {
            // |relu(W₁x̂ + b₁)| ≤ ‖W₁‖_F |x̂| + |b₁|.
            Some(h) => norm(&h.w)? * input + norm(&h.b)?,
            None => input,
        };
        Ok(b + norm(&self.w)? * feature)
    }
}

/// A router's tensors as `router_logits` takes them (`Var`s in training).
#[derive(Clone, Copy)]
pub struct RouterWeights<'a> {
    pub w: &'a Tensor,
    pub b: &'a Tensor,
    /// The hidden layer's (weight, bias), for an MLP router.
    pub hidden: Option<(&'a Tensor, &'a Tensor)>,
}

/// Every routed block's router.
#[derive(Debug, Clone, Default)]
pub struct Routers {
    pub by_block: BTreeMap<BlockId, Router>,
}

impl Routers {
    /// Linear routers for `blocks` that start at weight 0 and bias `bias`
    /// (every token executes with probability sigmoid(bias) in training).
    pub fn constant(blocks: &[BlockId], hidden: usize, bias: f32, device: &Device) -> Result<Self> {
        Self::initial(blocks, RouterKind::Linear, hidden, bias, 0, device)
    }

    /// Routers of `kind` whose output weight starts at 0 and bias at `bias`
    /// (so every token first executes with probability sigmoid(bias)); an
    /// MLP router's hidden layer starts at He-scaled Gaussian weights from
    /// `seed` and zero bias, so the output weight gets a gradient at once.
    pub fn initial(
        blocks: &[BlockId],
        kind: RouterKind,
        hidden: usize,
        bias: f32,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = SeededRng::new(seed);
        let mut by_block = BTreeMap::new();
        for &b in blocks {
            let (width, hidden_layer) = match kind.width(hidden) {
                None => (hidden, None),
                Some(m) => {
                    let std = (2.0 / hidden as f64).sqrt();
                    let w: Vec<f32> = (0..m * hidden)
                        .map(|_| (std * rng.normal()) as f32)
                        .collect();
                    let h = RouterHidden {
                        w: Tensor::from_vec(w, (m, hidden), device)?,
                        b: Tensor::zeros(m, DType::F32, device)?,
                    };
                    (m, Some(h))
                }
            };
            by_block.insert(
                b,
                Router {
                    w: Tensor::zeros(width, DType::F32, device)?,
                    b: Tensor::new(&[bias], device)?,
                    hidden: hidden_layer,
                },
            );
        }
        Ok(Self { by_block })
    }

    /// The routers in an artifact's tensors, checked against the model:
    /// every name a router tensor, layers that exist, weight (hidden) and
    /// bias (1).
    pub fn from_values(
        values: &ParamValues,
        hidden: usize,
        n_layers: usize,
    ) -> anyhow::Result<Self> {
        let mut by_block = BTreeMap::new();
        let mut names: Vec<&String> = values.keys().collect();
        names.sort();
        for name in names {
            let block = router_block_of(name)?;
            if block.layer >= n_layers {
                bail!(
                    "router artifact: `{name}` is for layer {}, the model has {n_layers} layers; \
                     this artifact belongs to another model",
                    block.layer
                );
            }
            if by_block.contains_key(&block) {
                continue;
            }
            let get = |name: String, what: &str| {
                values
                    .get(&name)
                    .with_context(|| format!("router artifact: `{block}` has no {what} tensor"))
            };
            let (w, b) = (
                get(weight_name(block), "weight")?,
                get(bias_name(block), "bias")?,
            );
            let hidden_layer = match values.get(&hidden_weight_name(block)) {
                None => None,
                Some(w1) => Some((w1, get(hidden_bias_name(block), "hidden bias")?)),
            };
            // Linear: w (hidden); MLP: w1 (m, hidden), b1 (m), w (m).
            let fits = match hidden_layer {
                None => w.dims() == [hidden],
                Some((w1, b1)) => {
                    let m = w1.dim(0).unwrap_or(0);
                    w1.dims() == [m, hidden] && b1.dims() == [m] && w.dims() == [m]
                }
            } && b.dims() == [1];
            if !fits {
                bail!(
                    "router artifact: `{block}` has weight {:?}, bias {:?}{}; this model needs a \
                     weight of [{hidden}] (linear) or a hidden layer of [m, {hidden}] (MLP), and a \
                     bias of [1] (the artifact belongs to another model)",
                    w.dims(),
                    b.dims(),
                    hidden_layer
                        .map(|(w1, b1)| format!(", hidden layer {:?} / {:?}", w1.dims(), b1.dims()))
                        .unwrap_or_default()
                );
            }
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            let router = Router {
                w: f32(w)?,
                b: f32(b)?,
                hidden: match hidden_layer {
                    Some((w1, b1)) => Some(RouterHidden {
                        w: f32(w1)?,
                        b: f32(b1)?,
                    }),
                    None => None,
                },
            };
            by_block.insert(block, router);
        }
        if by_block.is_empty() {
            bail!("router artifact holds no router");
        }
        Ok(Self { by_block })
    }

    /// The tensors to save, by name.
    pub fn values(&self) -> Result<ParamValues> {
        let mut v = ParamValues::new();
        for (&block, r) in &self.by_block {
            v.insert(weight_name(block), r.w.detach().copy()?);
            v.insert(bias_name(block), r.b.detach().copy()?);
            if let Some(h) = &r.hidden {
                v.insert(hidden_weight_name(block), h.w.detach().copy()?);
                v.insert(hidden_bias_name(block), h.b.detach().copy()?);
            }
        }
        Ok(v)
    }
}

/// The block a router tensor name (`router.attn.7.w`, `router.mlp.3.b`) belongs to.
fn router_block_of(name: &str) -> anyhow::Result<BlockId> {
    let inner = name
        .strip_prefix("router.")
        .and_then(|r| {
            [".w1", ".b1", ".w", ".b"]
                .iter()
                .find_map(|suffix| r.strip_suffix(suffix))
        })
        .with_context(|| {
            format!(
                "router artifact: tensor `{name}` is not a router tensor (router.attn.N.w, \
                 router.attn.N.b, router.mlp.N.w, router.mlp.N.b, and .w1/.b1 for an MLP router)"
            )
        })?;
    inner
        .parse::<BlockId>()
        .with_context(|| format!("router artifact: tensor `{name}`"))
}

/// Router logits (batch, tokens), f32 (f64 for an f64 model), of the residual stream `x` (batch,
/// tokens, hidden). Differentiable in the router's tensors when they are `Var`s.
pub fn router_logits(x: &Tensor, r: RouterWeights<'_>) -> Result<Tensor> {
    let (bs, t, h) = x.dims3()?;
    // f32 at least (f64 models stay f64, for finite-difference checks).
    let dt = if x.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let x = x.to_dtype(dt)?;
    let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + ROUTER_EPS)?.sqrt()?;
    let mut features = x.broadcast_div(&rms)?.reshape((bs * t, h))?;
    if let Some((w1, b1)) = r.hidden {
        let (w1, b1) = (w1.to_dtype(dt)?, b1.to_dtype(dt)?);
        features = features.matmul(&w1.t()?)?.broadcast_add(&b1)?.relu()?;
    }
    let width = features.dim(1)?;
    let l = features
        .matmul(&r.w.to_dtype(dt)?.reshape((width, 1))?)?
        .reshape((bs, t))?;
    l.broadcast_add(&r.b.to_dtype(dt)?)
}

/// A router's weights as plain vectors, for `router_logits` of one f32
/// sequence in plain loops: at a decode step its five candle ops per routed
/// block cost more than the block skips. Built once per policy (an MLP
/// router holds ~83k floats on SmolLM2: too many to copy per token).
struct PlainRouter {
    w: Vec<f32>,
    b: f32,
    hidden: Option<(Vec<f32>, Vec<f32>)>,
}

impl PlainRouter {
    fn new(r: &Router) -> Result<Self> {
        let vec =
            |t: &Tensor| -> Result<Vec<f32>> { t.to_dtype(DType::F32)?.flatten_all()?.to_vec1() };
        Ok(Self {
            w: vec(&r.w)?,
            b: vec(&r.b)?[0],
            hidden: match &r.hidden {
                Some(l) => Some((vec(&l.w)?, vec(&l.b)?)),
                None => None,
            },
        })
    }

    fn logits(&self, x: &Tensor) -> Result<Vec<f32>> {
        let h = x.dim(D::Minus1)?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        // The lean path's SIMD dots (`row_dots`): a scalar loop over an MLP router's
        // 144 × 576 weights cost more per decode step than the blocks it
        // skips.
        let dot = |a: &[f32], b: &[f32]| {
            let mut out = [0f32];
            super::transformer::row_dots(a, b, &mut out);
            out[0]
        };
        let mut features = vec![0f32; self.hidden.as_ref().map_or(0, |(_, b1)| b1.len())];
        Ok(xs
            .chunks_exact(h)
            .map(|row| {
                let ms = row.iter().map(|v| v * v).sum::<f32>() / h as f32;
                let rms = (ms + ROUTER_EPS as f32).sqrt();
                let xn: Vec<f32> = row.iter().map(|v| v / rms).collect();
                match &self.hidden {
                    None => dot(&xn, &self.w) + self.b,
                    Some((w1, b1)) => {
                        super::transformer::row_dots(&xn, w1, &mut features);
                        for (f, b) in features.iter_mut().zip(b1) {
                            *f = (*f + b).max(0.0);
                        }
                        dot(&features, &self.w) + self.b
                    }
                }
            })
            .collect())
    }
}

/// Executed and total token-blocks counted by a policy, per block.
#[derive(Debug, Default)]
pub struct ExecCounts {
    executed: Vec<AtomicUsize>,
    total: Vec<AtomicUsize>,
}

impl ExecCounts {
    fn new(blocks: usize) -> Self {
        Self {
            executed: (0..blocks).map(|_| AtomicUsize::new(0)).collect(),
            total: (0..blocks).map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    fn add(&self, slot: usize, executed: usize, total: usize) {
        self.executed[slot].fetch_add(executed, Ordering::Relaxed);
        self.total[slot].fetch_add(total, Ordering::Relaxed);
    }

    /// Blocks executed per token over all blocks (static skips count as not
    /// executed), 1 before any pass.
    pub fn executed_fraction(&self) -> f64 {
        let e: usize = self
            .executed
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .sum();
        let t: usize = self.total.iter().map(|a| a.load(Ordering::Relaxed)).sum();
        if t == 0 {
            1.0
        } else {
            e as f64 / t as f64
        }
    }

    /// Executed share per block, in slot order (attn.0, mlp.0, attn.1, …).
    pub fn per_block(&self) -> Vec<f64> {
        self.executed
            .iter()
            .zip(&self.total)
            .map(|(e, t)| {
                let t = t.load(Ordering::Relaxed);
                if t == 0 {
                    1.0
                } else {
                    e.load(Ordering::Relaxed) as f64 / t as f64
                }
            })
            .collect()
    }
}

/// The slot of a block in `ExecCounts` (attn.0, mlp.0, attn.1, …).
pub fn slot(block: BlockId) -> usize {
    2 * block.layer + usize::from(block.kind == BlockKind::Mlp)
}

/// Routing over a static base plan (its skips stay skipped; its scales are
/// the pass's parameters), counting what executes.
pub struct RouterPolicy<'a> {
    pub base: &'a Plan,
    pub routers: &'a Routers,
    pub kv: KvPolicy,
    pub threshold: f32,
    pub counts: ExecCounts,
    plain: Mutex<BTreeMap<BlockId, Arc<PlainRouter>>>,
}

impl<'a> RouterPolicy<'a> {
    pub fn new(
        base: &'a Plan,
        routers: &'a Routers,
        kv: KvPolicy,
        threshold: f32,
        n_layers: usize,
    ) -> Self {
        Self {
            base,
            routers,
            kv,
            threshold,
            counts: ExecCounts::new(2 * n_layers),
            plain: Mutex::default(),
        }
    }

    /// `block`'s router as plain vectors, converted on first use.
    fn plain_router(&self, block: BlockId, r: &Router) -> Result<Arc<PlainRouter>> {
        let lock = || self.plain.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = lock().get(&block) {
            return Ok(p.clone());
        }
        let p = Arc::new(PlainRouter::new(r)?);
        lock().insert(block, p.clone());
        Ok(p)
    }

    /// The rows (token indices) of `x` that run `block`; `None` when the
    /// block has no router (every token runs it).
    fn routed_rows(&self, block: BlockId, x: &Tensor) -> Result<Option<Vec<u32>>> {
        let Some(r) = self.routers.by_block.get(&block) else {
            return Ok(None);
        };
        let (bs, t, _) = x.dims3()?;
        if bs != 1 {
            candle_core::bail!(
                "token routing runs one sequence at a time (got a batch of {bs}); run the \
                 sequences one by one"
            );
        }
        let logits = if x.dtype() == DType::F32 {
            self.plain_router(block, r)?.logits(x)?
        } else {
            router_logits(x, r.weights())?.squeeze(0)?.to_vec1()?
        };
        debug_assert_eq!(logits.len(), t);
        Ok(Some(
            (0..t as u32)
                .filter(|&i| logits[i as usize] > self.threshold)
                .collect(),
        ))
    }

    fn count(&self, block: BlockId, executed: usize, x: &Tensor) -> Result<()> {
        let (bs, t, _) = x.dims3()?;
        self.counts.add(slot(block), executed * bs, t * bs);
        Ok(())
    }
}

impl LayerPolicy for RouterPolicy<'_> {
    fn attn(&self, layer: usize, x: &Tensor) -> Result<AttnExec> {
        let block = BlockId::attn(layer);
        let t = x.dim(1)?;
        if self.base.skips_attn(layer) {
            self.count(block, 0, x)?;
            return Ok(AttnExec::Skip);
        }
        let Some(rows) = self.routed_rows(block, x)? else {
            self.count(block, t, x)?;
            return Ok(AttnExec::Full);
        };
        self.count(block, rows.len(), x)?;
        let write = self.kv == KvPolicy::Write;
        Ok(match rows.len() {
            n if n == t => AttnExec::Full,
            0 if write => AttnExec::KvOnly,
            0 => AttnExec::Skip,
            _ => AttnExec::Rows {
                rows,
                others_write_kv: write,
            },
        })
    }

    fn mlp(&self, layer: usize, x: &Tensor) -> Result<MlpExec> {
        let block = BlockId::mlp(layer);
        let t = x.dim(1)?;
        if self.base.skips_mlp(layer) {
            self.count(block, 0, x)?;
            return Ok(MlpExec::Skip);
        }
        let Some(rows) = self.routed_rows(block, x)? else {
            self.count(block, t, x)?;
            return Ok(MlpExec::Full);
        };
        self.count(block, rows.len(), x)?;
        Ok(match rows.len() {
            n if n == t => MlpExec::Full,
            0 => MlpExec::Skip,
            _ => MlpExec::Rows(rows),
        })
    }
}

/// Writes the routers as artifact `section.artifact` of the plan that will
/// be saved at `plan_path`, and the plan's `routing` section.
pub fn save_to_plan(
    file: &mut PlanFile,
    plan_path: &Path,
    routers: &Routers,
    section: &RoutingSection,
) -> anyhow::Result<()> {
    file.write_artifact(
        plan_path,
        &section.artifact,
        &routers.values()?,
        Some("token routers: per routed block on the RMS-normalised block input x̂, linear (w: hidden, b: 1; logit w·x̂ + b) or MLP (w1: m × hidden, b1: m, w: m, b: 1; logit w·relu(w1 x̂ + b1) + b)"),
    )?;
    file.sections.set(ROUTING_SECTION, section)
}

/// The routing a plan file carries (`None` without a `routing` section),
/// `load_from_plan` of the plan file a command was given, if any.
pub fn load_from_given(
    file: Option<&PlanFile>,
    model: &Model,
) -> anyhow::Result<Option<(RoutingSection, Routers)>> {
    Ok(file
        .map(|f| load_from_plan(f, model))
        .transpose()?
        .flatten())
}

/// its routers checked against `model`'s shapes.
pub fn load_from_plan(
    file: &PlanFile,
    model: &Model,
) -> anyhow::Result<Option<(RoutingSection, Routers)>> {
    let Some(section) = file.sections.get::<RoutingSection>(ROUTING_SECTION)? else {
        return Ok(None);
    };
    let values = file.load_artifact(&section.artifact, model.device())?;
    let routers = Routers::from_values(&values, model.cfg().hidden_size, model.n_layers())
        .with_context(|| format!("plan section `{ROUTING_SECTION}`"))?;
    Ok(Some((section, routers)))
}
