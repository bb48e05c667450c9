//! The lean CPU path for decoding and small verifies: one pass over a few
//! rows with the file's own quantized weights (`crate::kernels`), on
//! preallocated f32 buffers, with no candle op per step.
//!
//! candle runs ~25 ops per layer per token, each with an allocation and a
//! hand-off to its thread pool; on a 135M model at one row that overhead
//! and candle's quantized kernels were most of a decode step. Here each
//! layer is RMSNorm, Q/K/V, RoPE, an in-place K/V write into the layer's
//! `KvStore`, attention parallel over heads on the kernels' pool, o_proj,
//! the scaled residual, RMSNorm, gate/up, SiLU·mul, down and the residual,
//! all on one reusable workspace.
//!
//! It runs when the pass is fast, quantized, on the CPU in f32, unprobed,
//! with constant residual scales, at most `MAX_ROWS` rows, and every
//! projection of the model has a kernel (`Transformer::lean_ready`).
//! Blocks the policy skips compute nothing and write no K/V; a K/V-only
//! answer computes K and V alone; a replaced layer runs its mixer here
//! (`mixer`); any other answer (row, head or neuron subsets) runs that
//! block through the candle path on the same state, so every policy stays
//! correct. A
//! subset variant here is a filter on the attention tasks (heads) or a
//! `QWeight::matmul_range` over the selected outputs (rows, neurons).
//!
//! `SCALPEL_LEAN=0` in the environment (or `RunOptions::lean = false`)
//! forces the candle path, for comparisons.

mod attend;
mod mixer;
mod ops;

use std::ops::Range;
use std::sync::{Mutex, OnceLock};

use candle_core::{DType, Result, Tensor};

use super::{
    mlp, rms_norm, Activation, AttnCall, Layer, Linear, MaskMemo, Mode, RunOptions, Transformer,
};
use crate::kernels::QWeight;
use crate::model::config::Arch;
use crate::model::lowrank;
use crate::model::mixer::MixerState;
use crate::model::pass::{AttnExec, MlpExec, Pass, Probe, Residual};
use crate::model::state::{position_range, KvStore};
use crate::plan::LayerScales;
use attend::Heads;
pub use attend::{KeyRuns, Keys};

/// `out[i]` = q · row i of `rows` (contiguous rows of `q.len()`), with this
/// path's SIMD dot: Quest's page bounds on the lean path.
pub fn row_dots(q: &[f32], rows: &[f32], out: &mut [f32]) {
    let m = ops::Strided {
        m: rows,
        start: 0,
        stride: q.len(),
    };
    ops::scaled_dots(q, m, 1.0, out);
}

/// Rows up to which a pass runs here (a decode step is 1, a speculative
/// verify of k drafts is k + 1); longer prefills take the dense GEMM.
pub const MAX_ROWS: usize = 32;

/// What the lean path keeps per model: f32 copies of the small tensors
/// (norms, biases, RoPE tables), made on first use, and one workspace.
#[derive(Default)]
pub struct Cache {
    prepared: OnceLock<Option<Prepared>>,
    workspace: Mutex<Workspace>,
    /// Replaced layers' mixers, quantized on first use.
    mixers: mixer::Mixers,
}

struct Prepared {
    layers: Vec<LayerParams>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Gemma 3's local layers' RoPE tables.
    local_rope: Option<(Vec<f32>, Vec<f32>)>,
    /// `ModelConfig::query_scale`, as f32.
    query_scale: Option<f32>,
}

struct LayerParams {
    attn_norm: Vec<f32>,
    mlp_norm: Vec<f32>,
    q_bias: Option<Vec<f32>>,
    k_bias: Option<Vec<f32>>,
    v_bias: Option<Vec<f32>>,
    gemma: Option<GemmaParams>,
}

/// A Gemma 3 layer's extra norms (`GemmaNorms`) as f32.
struct GemmaParams {
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    post_attn_norm: Vec<f32>,
    post_mlp_norm: Vec<f32>,
}

/// Activation buffers, grown to the largest pass seen and reused.
#[derive(Default)]
struct Workspace {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    ctx: Vec<f32>,
    out: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    scores: Vec<f32>,
}

impl Workspace {
    fn size(&mut self, t: &Transformer, rows: usize) {
        let c = &t.cfg;
        let (q, kv) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        for (buf, width) in [
            (&mut self.h, c.hidden_size),
            (&mut self.q, q),
            (&mut self.k, kv),
            (&mut self.v, kv),
            (&mut self.ctx, q),
            (&mut self.out, c.hidden_size),
            (&mut self.gate, c.intermediate_size),
            (&mut self.up, c.intermediate_size),
        ] {
            buf.resize(rows * width, 0.0);
        }
    }
}

/// Whether `SCALPEL_LEAN=0` forces the candle path (read once).
fn disabled_by_env() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    *OFF.get_or_init(|| std::env::var("SCALPEL_LEAN").is_ok_and(|v| v.trim() == "0"))
}

fn wants_lean(t: &Transformer, run: RunOptions, rows: usize) -> bool {
    run.lean
        && run.quantized
        && run.mode == Mode::Fast
        && (1..=MAX_ROWS).contains(&rows)
        && t.device.is_cpu()
        && t.dtype == DType::F32
        && !disabled_by_env()
}

fn to_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// The kernel of a projection the lean path can run (no bias: callers
/// handle the q/k/v biases themselves).
fn kernel(l: &Linear, out: usize, inp: usize) -> Option<&QWeight> {
    let k = l.kernel.as_deref()?;
    (k.out_dim() == out && k.in_dim() == inp).then_some(k)
}

impl Cache {
    pub(super) fn ready(&self, t: &Transformer) -> Result<bool> {
        Ok(self.prepared(t)?.is_some())
    }

    /// The prepared tensors, or `None` when this model cannot run here.
    fn prepared(&self, t: &Transformer) -> Result<Option<&Prepared>> {
        if let Some(p) = self.prepared.get() {
            return Ok(p.as_ref());
        }
        let p = prepare(t)?;
        Ok(self.prepared.get_or_init(|| p).as_ref())
    }
}

fn prepare(t: &Transformer) -> Result<Option<Prepared>> {
    let c = &t.cfg;
    // Llama-style decoders and Gemma 3; others keep the candle path.
    let arch_ok = match c.arch {
        Arch::Llama | Arch::Qwen2 | Arch::Mistral => c.is_plain_llama(),
        Arch::Gemma3 => c.gemma3.is_some() && t.layers.iter().all(|l| l.gemma.is_some()),
    };
    if !arch_ok || !t.device.is_cpu() || t.dtype != DType::F32 || !c.head_dim.is_multiple_of(2) {
        return Ok(None);
    }
    let (h, q, kv, f) = (
        c.hidden_size,
        c.n_heads * c.head_dim,
        c.n_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    let mut layers = Vec::with_capacity(t.layers.len());
    for l in &t.layers {
        let (a, m) = (&l.attn, &l.mlp);
        let all = [
            (&a.q, q, h),
            (&a.k, kv, h),
            (&a.v, kv, h),
            (&a.o, h, q),
            (&m.gate, f, h),
            (&m.up, f, h),
            (&m.down, h, f),
        ];
        if all.iter().any(|(l, o, i)| kernel(l, *o, *i).is_none()) {
            return Ok(None);
        }
        if [&a.o, &m.gate, &m.up, &m.down]
            .iter()
            .any(|l| l.bias.is_some())
        {
            return Ok(None);
        }
        let bias = |l: &Linear| l.bias.as_ref().map(to_f32).transpose();
        let gemma = match &l.gemma {
            Some(g) => Some(GemmaParams {
                q_norm: to_f32(&g.q_norm)?,
                k_norm: to_f32(&g.k_norm)?,
                post_attn_norm: to_f32(&g.post_attn_norm)?,
                post_mlp_norm: to_f32(&g.post_mlp_norm)?,
            }),
            None => None,
        };
        layers.push(LayerParams {
            attn_norm: to_f32(&l.attn_norm)?,
            mlp_norm: to_f32(&l.mlp_norm)?,
            q_bias: bias(&a.q)?,
            k_bias: bias(&a.k)?,
            v_bias: bias(&a.v)?,
            gemma,
        });
    }
    let local_rope = match &t.local_rope {
        Some((cos, sin)) => Some((to_f32(cos)?, to_f32(sin)?)),
        None => None,
    };
    Ok(Some(Prepared {
        layers,
        cos: to_f32(&t.cos)?,
        sin: to_f32(&t.sin)?,
        local_rope,
        query_scale: c.query_scale().map(|s| s as f32),
    }))
}

/// Runs `layers` over the residual stream `x` (1, rows, hidden) on the lean
/// path, or `None` (nothing done) when this pass cannot run here.
pub(super) fn run_layers(
    t: &Transformer,
    x: &Tensor,
    layers: Range<usize>,
    pass: &mut Pass,
) -> Result<Option<Tensor>> {
    let (b, rows, hidden) = x.dims3()?;
    let probe_rides = pass.probe.as_deref().is_none_or(|p| p.rides_lean());
    if b != 1 || !probe_rides || !wants_lean(t, pass.run, rows) {
        return Ok(None);
    }
    let Some(prep) = t.lean.prepared(t)? else {
        return Ok(None);
    };
    let mut scales = Vec::with_capacity(layers.len());
    for i in layers.clone() {
        match pass.params.residual(i)? {
            Residual::Const(s) => scales.push(s),
            Residual::Tensor(_) => return Ok(None),
        }
    }
    // A second pass running at the same time (another thread) gets its own.
    let mut own = None;
    let mut guard = t.lean.workspace.try_lock().ok();
    let ws: &mut Workspace = match guard.as_deref_mut() {
        Some(ws) => ws,
        None => own.insert(Workspace::default()),
    };
    ws.size(t, rows);
    ws.x.clear();
    ws.x.extend_from_slice(&to_f32(x)?);
    let start = pass.state.as_ref().map_or(0, |s| s.next_position());
    let positions = position_range(start, rows);
    let mut step = Step {
        t,
        prep,
        positions: &positions,
        masks: MaskMemo::default(),
        rows,
    };
    for (i, s) in layers.zip(scales) {
        step.layer(i, s, ws, pass)?;
    }
    Tensor::from_slice(&ws.x, (1, rows, hidden), &t.device).map(Some)
}

/// One lean pass's fixed context.
struct Step<'a> {
    t: &'a Transformer,
    prep: &'a Prepared,
    positions: &'a [u32],
    /// For blocks that run through the candle path.
    masks: MaskMemo,
    rows: usize,
}

impl Step<'_> {
    fn residual_tensor(&self, ws: &Workspace) -> Result<Tensor> {
        Tensor::from_slice(
            &ws.x,
            (1, self.rows, self.t.cfg.hidden_size),
            &self.t.device,
        )
    }

    fn layer(
        &mut self,
        i: usize,
        s: LayerScales,
        ws: &mut Workspace,
        pass: &mut Pass,
    ) -> Result<()> {
        let [b_att, s_att, b_mlp, s_mlp] = s.as_array();
        // A healed plan's corrections ride on the layer's projections
        // (`matmul` adds them); factors this path cannot read go through candle.
        let corrected = lowrank::corrected_layer(&self.t.layers[i], i, pass.params)?;
        let layer = corrected.as_ref().unwrap_or(&self.t.layers[i]);
        let (a, m) = (&layer.attn, &layer.mlp);
        let attn_lean = lean_corrections(&[&a.q, &a.k, &a.v, &a.o]);
        let mlp_lean = lean_corrections(&[&m.gate, &m.up, &m.down]);
        match pass.policy.attn(i, &self.residual_tensor(ws)?)? {
            AttnExec::Skip => ops::scale(&mut ws.x, s_att),
            // A replaced attention: its mixer here when its shapes have a
            // kernel, else through the candle ops.
            AttnExec::Mixer => {
                if !self.mixer(i, ws, pass)? {
                    let x = self.residual_tensor(ws)?;
                    let h = rms_norm(&x, &layer.attn_norm, self.t.cfg.rms_norm_eps, Mode::Fast)?;
                    copy_into(&self.t.mixer(i, &h, pass)?, &mut ws.out)?;
                }
                self.post_norm(i, Block::Attn, &mut ws.out);
                ops::residual(&mut ws.x, &ws.out, b_att, s_att);
            }
            AttnExec::Full if attn_lean => {
                let store = pass.state.as_deref_mut().and_then(|st| st.kv_mut(i));
                self.attention(i, layer, ws, store, pass.probe.as_deref_mut())?;
                self.post_norm(i, Block::Attn, &mut ws.out);
                ops::residual(&mut ws.x, &ws.out, b_att, s_att);
            }
            // A token routed past the block still writes its K/V (routing's
            // `write` policy): the block adds nothing.
            AttnExec::KvOnly if attn_lean && pass.probe.is_none() => {
                let store = pass.state.as_deref_mut().and_then(|st| st.kv_mut(i));
                self.write_kv(i, layer, ws, store)?;
                ops::scale(&mut ws.x, s_att);
            }
            exec => {
                let store = pass.state.as_deref_mut().and_then(|st| st.kv_mut(i));
                let probe = pass.probe.as_deref_mut();
                self.candle_attention(i, layer, &exec, ws, (store, probe), pass.run)?;
                self.post_norm(i, Block::Attn, &mut ws.out);
                ops::residual(&mut ws.x, &ws.out, b_att, s_att);
            }
        }
        match pass.policy.mlp(i, &self.residual_tensor(ws)?)? {
            MlpExec::Skip => ops::scale(&mut ws.x, s_mlp),
            MlpExec::Full if mlp_lean => {
                self.mlp(i, layer, ws);
                self.post_norm(i, Block::Mlp, &mut ws.out);
                ops::residual(&mut ws.x, &ws.out, b_mlp, s_mlp);
            }
            exec => {
                let x1 = self.residual_tensor(ws)?;
                let eps = self.t.cfg.rms_norm_eps;
                let h = rms_norm(&x1, &layer.mlp_norm, eps, Mode::Fast)?;
                let act = layer.activation();
                let m = match &exec {
                    // Sliced once per mask (the transformer's slice cache).
                    MlpExec::Neurons(ns) => {
                        let sliced = self.t.sliced_mlp(i, ns)?;
                        mlp(&sliced, &h, &MlpExec::Full, pass.run, act)?
                    }
                    _ => mlp(&layer.mlp, &h, &exec, pass.run, act)?,
                };
                copy_into(&m, &mut ws.out)?;
                self.post_norm(i, Block::Mlp, &mut ws.out);
                ops::residual(&mut ws.x, &ws.out, b_mlp, s_mlp);
            }
        }
        Ok(())
    }

    /// Full attention of layer `i` into `ws.out`, writing K/V to `store`,
    /// over the keys `probe` selects (a KV budget policy) or all of them.
    fn attention<'p>(
        &self,
        i: usize,
        layer: &Layer,
        ws: &mut Workspace,
        store: Option<&mut KvStore>,
        probe: Option<&mut (dyn Probe + 'p)>,
    ) -> Result<()> {
        let c = &self.t.cfg;
        let rows = self.rows;
        let heads = Heads {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        self.project_qkv(i, layer, ws, true);
        let window = self.t.attention_window(i);
        let hd = c.head_dim;
        if let Some(s) = self.prep.query_scale {
            ops::scale(&mut ws.q, s);
        }
        let Workspace {
            q,
            k,
            v,
            ctx,
            scores,
            ..
        } = ws;
        match store {
            Some(store) => {
                store.append_rows(k, v, self.positions, c.n_kv_heads, hd)?;
                let key_pos = store.positions();
                store
                    .with_f32(|k, v, cap| -> Result<()> {
                        let keys = Keys {
                            k,
                            v,
                            head_stride: cap * hd,
                            key_stride: hd,
                            positions: key_pos,
                        };
                        let runs = match probe {
                            Some(p) => p.select_keys(i, q, &keys, self.positions)?,
                            None => None,
                        };
                        let runs = runs.as_ref();
                        attend::attend(q, self.positions, &keys, window, heads, runs, scores, ctx);
                        Ok(())
                    })?
                    .transpose()?;
            }
            None => {
                let keys = Keys {
                    k,
                    v,
                    head_stride: hd,
                    key_stride: c.n_kv_heads * hd,
                    positions: self.positions,
                };
                attend::attend(q, self.positions, &keys, window, heads, None, scores, ctx);
            }
        }
        matmul(&layer.attn.o, &ws.ctx, rows, &mut ws.out);
        Ok(())
    }

    /// Layer `i`'s mixer over `ws.x` into `ws.out`, continuing its state;
    /// `false` (nothing done) when it has no kernel here.
    fn mixer(&self, i: usize, ws: &mut Workspace, pass: &mut Pass) -> Result<bool> {
        let dims = crate::model::mixer::Dims::of(&self.t.cfg);
        let Some(m) = self.t.lean.mixers.get(pass.params, i, dims)? else {
            return Ok(false);
        };
        let c = &self.t.cfg;
        let eps = c.rms_norm_eps as f32;
        let p = &self.prep.layers[i];
        ops::rms_norm(&ws.x, &p.attn_norm, eps, &mut ws.h);
        let norms = p.gemma.as_ref().map(|g| mixer::QkNorms {
            q: &g.q_norm,
            k: &g.k_norm,
            eps,
        });
        let shape = (c.n_kv_heads, c.head_dim);
        let state = match pass.state.as_deref_mut() {
            Some(st) => Some(st.mixer_mut(i)?),
            None => None,
        };
        // No sequence state (a one-off pass): start from zeros, keep nothing.
        let mut sz = match &state {
            Some(st) => st.to_f32(shape)?,
            None => MixerState::new().to_f32(shape)?,
        };
        let buffers = mixer::Buffers {
            h: &ws.h,
            q: &mut ws.q,
            k: &mut ws.k,
            v: &mut ws.v,
            y: &mut ws.ctx,
            out: &mut ws.out,
        };
        m.run(dims, self.rows, buffers, norms, (&mut sz.0, &mut sz.1));
        if let Some(st) = state {
            st.store_f32(sz, shape, self.rows, &self.t.device)?;
        }
        Ok(true)
    }

    /// Layer `i`'s K (normed, rotated) and V of every row into `ws.k` and
    /// `ws.v`, and with `with_q` its Q into `ws.q` (before the query scale).
    fn project_qkv(&self, i: usize, layer: &Layer, ws: &mut Workspace, with_q: bool) {
        let c = &self.t.cfg;
        let (p, rows) = (&self.prep.layers[i], self.rows);
        let a = &layer.attn;
        let eps = c.rms_norm_eps as f32;
        ops::rms_norm(&ws.x, &p.attn_norm, eps, &mut ws.h);
        let q = with_q.then_some((&a.q, &p.q_bias, &mut ws.q));
        for (l, bias, y) in q
            .into_iter()
            .chain([(&a.k, &p.k_bias, &mut ws.k), (&a.v, &p.v_bias, &mut ws.v)])
        {
            matmul(l, &ws.h, rows, y);
            if let Some(bias) = bias {
                ops::add_bias(y, bias);
            }
        }
        let (cos, sin) = match &self.prep.local_rope {
            Some((cos, sin)) if self.t.uses_local_rope(i) => (cos, sin),
            _ => (&self.prep.cos, &self.prep.sin),
        };
        let hd = c.head_dim;
        if let Some(g) = &p.gemma {
            if with_q {
                ops::rms_norm_in_place(&mut ws.q, &g.q_norm, eps);
            }
            ops::rms_norm_in_place(&mut ws.k, &g.k_norm, eps);
        }
        if with_q {
            ops::rope(&mut ws.q, self.positions, hd, c.rope_layout, cos, sin);
        }
        ops::rope(&mut ws.k, self.positions, hd, c.rope_layout, cos, sin);
    }

    /// Only layer `i`'s K/V, appended to `store` (nothing without a state).
    fn write_kv(
        &self,
        i: usize,
        layer: &Layer,
        ws: &mut Workspace,
        store: Option<&mut KvStore>,
    ) -> Result<()> {
        let Some(store) = store else {
            return Ok(());
        };
        self.project_qkv(i, layer, ws, false);
        let c = &self.t.cfg;
        store.append_rows(&ws.k, &ws.v, self.positions, c.n_kv_heads, c.head_dim)
    }

    /// An attention answer the lean path does not compute (subsets, K/V
    /// only) through the candle path, on the same state, into `ws.out`.
    fn candle_attention<'p>(
        &mut self,
        i: usize,
        layer: &Layer,
        exec: &AttnExec,
        ws: &mut Workspace,
        (store, probe): (Option<&mut KvStore>, Option<&mut (dyn Probe + 'p)>),
        run: RunOptions,
    ) -> Result<()> {
        let x = self.residual_tensor(ws)?;
        let h = rms_norm(&x, &layer.attn_norm, self.t.cfg.rms_norm_eps, Mode::Fast)?;
        let call = AttnCall {
            layer: i,
            positions: self.positions,
            exec,
            run,
            norms: layer.gemma.as_ref(),
        };
        match self
            .t
            .attention(&layer.attn, &h, call, store, &mut self.masks, probe)?
        {
            Some(a) => copy_into(&a, &mut ws.out),
            None => {
                ws.out.fill(0.0);
                Ok(())
            }
        }
    }

    /// The gated MLP of layer `i` over `ws.x` into `ws.out`.
    fn mlp(&self, i: usize, layer: &Layer, ws: &mut Workspace) {
        let c = &self.t.cfg;
        let m = &layer.mlp;
        let p = &self.prep.layers[i];
        ops::rms_norm(&ws.x, &p.mlp_norm, c.rms_norm_eps as f32, &mut ws.h);
        matmul(&m.gate, &ws.h, self.rows, &mut ws.gate);
        matmul(&m.up, &ws.h, self.rows, &mut ws.up);
        // `ws.scores` doubles as the exp scratch.
        let n = ws.gate.len();
        if ws.scores.len() < n {
            ws.scores.resize(n, 0.0);
        }
        match layer.activation() {
            Activation::Silu => ops::silu_mul_in_place(&mut ws.gate, &ws.up, &mut ws.scores[..n]),
            Activation::GeluTanh => {
                ops::gelu_tanh_mul_in_place(&mut ws.gate, &ws.up, &mut ws.scores[..n])
            }
        }
        matmul(&m.down, &ws.gate, self.rows, &mut ws.out);
    }
}

/// Which sub-block of a layer (for Gemma 3's output norms).
#[derive(Clone, Copy)]
enum Block {
    Attn,
    Mlp,
}

impl Step<'_> {
    /// Gemma 3's "sandwich": a block's output is normed before the residual
    /// add (nothing for other models).
    fn post_norm(&self, i: usize, block: Block, out: &mut [f32]) {
        if let Some(g) = &self.prep.layers[i].gemma {
            let w = match block {
                Block::Attn => &g.post_attn_norm,
                Block::Mlp => &g.post_mlp_norm,
            };
            ops::rms_norm_in_place(out, w, self.t.cfg.rms_norm_eps as f32);
        }
    }
}

/// `y = x Wᵀ` with a projection's kernel (present: `prepare` checked),
/// plus its low-rank correction `B (A x)` when it has one (a healed plan;
/// `lean_corrections` checked the factors are readable here).
fn matmul(l: &Linear, x: &[f32], rows: usize, y: &mut [f32]) {
    let k = l
        .kernel
        .as_deref()
        .expect("lean path: kernel checked at prepare");
    k.matmul(x, rows, y);
    if let Some(c) = &l.lora {
        with_f32(&c.a, |a| {
            with_f32(&c.b, |b| add_low_rank(a, b, c.rank(), x, rows, y));
        });
    }
}

/// A contiguous f32 CPU tensor's values, without a copy.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) = &*storage else {
        return None;
    };
    let (start, end) = layout.contiguous_offsets()?;
    Some(f(&v[start..end]))
}

/// Whether every correction of `lins` can run here (f32, contiguous, CPU).
fn lean_corrections(lins: &[&Linear]) -> bool {
    lins.iter().all(|l| {
        l.lora
            .as_ref()
            .is_none_or(|c| with_f32(&c.a, |_| ()).is_some() && with_f32(&c.b, |_| ()).is_some())
    })
}

/// `y += B (A x)` per row: `a` (rank, in), `b` (out, rank), row-major.
fn add_low_rank(a: &[f32], b: &[f32], rank: usize, x: &[f32], rows: usize, y: &mut [f32]) {
    let inp = a.len() / rank.max(1);
    let out = b.len() / rank.max(1);
    let mut t = vec![0f32; rank];
    for r in 0..rows {
        let xr = &x[r * inp..(r + 1) * inp];
        for (k, tk) in t.iter_mut().enumerate() {
            *tk = a[k * inp..(k + 1) * inp]
                .iter()
                .zip(xr)
                .map(|(p, q)| p * q)
                .sum();
        }
        let yr = &mut y[r * out..(r + 1) * out];
        for (o, yo) in yr.iter_mut().enumerate() {
            *yo += b[o * rank..(o + 1) * rank]
                .iter()
                .zip(&t)
                .map(|(p, q)| p * q)
                .sum::<f32>();
        }
    }
}

fn copy_into(t: &Tensor, out: &mut [f32]) -> Result<()> {
    let v = to_f32(t)?;
    out.copy_from_slice(&v);
    Ok(())
}

/// Logits of `hidden` (..., hidden) with the output matrix's kernel, or
/// `None` when the candle path computes them.
pub(super) fn logits(t: &Transformer, hidden: &Tensor, run: RunOptions) -> Result<Option<Tensor>> {
    let h = t.cfg.hidden_size;
    let rows = hidden.elem_count() / h.max(1);
    if !wants_lean(t, run, rows) || hidden.dtype() != DType::F32 {
        return Ok(None);
    }
    let (weight, bias) = match &t.lm_head {
        Some(head) => (head.kernel.as_deref(), head.bias.as_ref()),
        None => (t.embed_kernel.as_deref(), None),
    };
    let Some(w) = weight.filter(|w| w.in_dim() == h) else {
        return Ok(None);
    };
    let x = to_f32(hidden)?;
    let vocab = w.out_dim();
    let mut y = vec![0f32; rows * vocab];
    w.matmul(&x, rows, &mut y);
    if let Some(b) = bias {
        ops::add_bias(&mut y, &to_f32(b)?);
    }
    let mut shape = hidden.dims().to_vec();
    *shape.last_mut().expect("hidden has a feature axis") = vocab;
    Tensor::from_vec(y, shape, &t.device).map(Some)
}
