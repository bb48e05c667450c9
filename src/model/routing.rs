//! Token routing at inference: one small router per routed block reads the
//! residual stream entering the block and decides, per token, whether the
//! block runs (SkipGPT / Router-Tuning, retrofitted on frozen weights).
//!
//! A router is linear on the RMS-normalised input: `logit = w·x/rms(x) + b`
//! (normalised because SmolLM2's residual stream grows by orders of
//! magnitude across layers). A token runs the block when its logit exceeds
//! the plan's threshold. The decision is carried out for real: prefill
//! gathers the routed rows (`AttnExec::Rows` / `MlpExec::Rows`), a decode
//! step runs or skips the block. A token that skips attention either still
//! writes its K/V (`KvPolicy::Write`, what training saw) or leaves a gap
//! later tokens cannot attend to (`KvPolicy::Gap`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use super::params::ParamValues;
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

/// One block's router: weight (hidden) and bias (1).
#[derive(Debug, Clone)]
pub struct Router {
    pub w: Tensor,
    pub b: Tensor,
}

/// Every routed block's router.
#[derive(Debug, Clone, Default)]
pub struct Routers {
    pub by_block: BTreeMap<BlockId, Router>,
}

impl Routers {
    /// Routers for `blocks` that start at weight 0 and bias `bias` (every
    /// token executes with probability sigmoid(bias) in training).
    pub fn constant(blocks: &[BlockId], hidden: usize, bias: f32, device: &Device) -> Result<Self> {
        let mut by_block = BTreeMap::new();
        for &b in blocks {
            by_block.insert(
                b,
                Router {
                    w: Tensor::zeros(hidden, DType::F32, device)?,
                    b: Tensor::new(&[bias], device)?,
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
            let w = values
                .get(&weight_name(block))
                .with_context(|| format!("router artifact: `{block}` has no weight tensor"))?;
            let b = values
                .get(&bias_name(block))
                .with_context(|| format!("router artifact: `{block}` has no bias tensor"))?;
            if w.dims() != [hidden] || b.dims() != [1] {
                bail!(
                    "router artifact: `{block}` has weight {:?} and bias {:?}; this model needs \
                     [{hidden}] and [1] (the artifact belongs to another model)",
                    w.dims(),
                    b.dims()
                );
            }
            let w = w.to_dtype(DType::F32)?;
            let b = b.to_dtype(DType::F32)?;
            by_block.insert(block, Router { w, b });
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
        }
        Ok(v)
    }
}

/// The block a router tensor name (`router.attn.7.w`, `router.mlp.3.b`) belongs to.
fn router_block_of(name: &str) -> anyhow::Result<BlockId> {
    let inner = name
        .strip_prefix("router.")
        .and_then(|r| r.strip_suffix(".w").or_else(|| r.strip_suffix(".b")))
        .with_context(|| {
            format!(
                "router artifact: tensor `{name}` is not a router tensor (router.attn.N.w, \
                 router.attn.N.b, router.mlp.N.w, router.mlp.N.b)"
            )
        })?;
    inner
        .parse::<BlockId>()
        .with_context(|| format!("router artifact: tensor `{name}`"))
}

/// Router logits (batch, tokens), f32 (f64 for an f64 model), of the residual stream `x` (batch,
/// tokens, hidden). Differentiable in `w` and `b` when they are `Var`s.
pub fn router_logits(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (bs, t, h) = x.dims3()?;
    // f32 at least (f64 models stay f64, for finite-difference checks).
    let dt = if x.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let (x, w, b) = (x.to_dtype(dt)?, w.to_dtype(dt)?, b.to_dtype(dt)?);
    let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + ROUTER_EPS)?.sqrt()?;
    let xn = x.broadcast_div(&rms)?.reshape((bs * t, h))?;
    let l = xn.matmul(&w.reshape((h, 1))?)?.reshape((bs, t))?;
    l.broadcast_add(&b)
}

/// `router_logits` of one f32 sequence in plain loops: at a decode step
/// its five candle ops per routed block cost more than the block skips.
fn plain_router_logits(x: &Tensor, r: &Router) -> Result<Vec<f32>> {
    let h = x.dim(D::Minus1)?;
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let w: Vec<f32> = r.w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let b: f32 = r.b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?[0];
    Ok(xs
        .chunks_exact(h)
        .map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / h as f32;
            let rms = (ms + ROUTER_EPS as f32).sqrt();
            row.iter().zip(&w).map(|(v, w)| v / rms * w).sum::<f32>() + b
        })
        .collect())
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
        }
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
            plain_router_logits(x, r)?
        } else {
            router_logits(x, &r.w, &r.b)?.squeeze(0)?.to_vec1()?
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
        Some("token routers: per routed block, weight (hidden) and bias (1) on the RMS-normalised block input"),
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
