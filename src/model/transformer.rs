//! The forward pass of a Llama-family decoder under a `Plan`.
//!
//! One block implementation, two modes:
//! - `Mode::Fast`: fused candle ops (rms_norm, softmax_last_dim, rope), for
//!   evaluation and generation. Optionally quantized matmuls for decode.
//! - `Mode::Differentiable`: the slow ops that carry gradients
//!   (`rms_norm_slow`, `softmax`, `rope_slow`), f32 weights, scales as tensors
//!   (candle `Var`s) so `backward()` reaches them. Tests hold both equal.
//!
//! What each block executes comes from the pass's policy (`model::pass`):
//! a skipped block is not computed (no matmul, no K/V written), and a
//! subset of rows, heads or neurons computes only that subset. Each layer's
//! keys live in the sequence state with their positions (`model::state`);
//! masks and rotary positions come from those.

use std::borrow::Cow;
use std::rc::Rc;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};

use super::attention;
use super::config::{ModelConfig, RopeLayout};
use super::frozen::frozen_matmul;
use super::fused;
use super::lowrank::{self, LowRank};
use super::mask::AttentionMask;
use super::mixer;
use super::pass::{AttnExec, MlpExec, Pass, Probe, Projection, Residual};
use super::state::{position_range, KvStore, SeqState};
use crate::kernels::QWeight;
use crate::plan::{BlockId, LayerScales};

#[path = "lean/mod.rs"]
mod lean;
pub use lean::MAX_ROWS as LEAN_MAX_ROWS;
pub use lean::{row_dots, KeyRuns, Keys as StoredKeys};

/// A linear layer: f32 (or bf16 on GPU) weights for exact and differentiable
/// work, and optionally the original quantized weights for fast decode. A
/// quantized-only load (`--weights quantized`) keeps no dense copy: the
/// quantized matmul runs, and what needs dense values dequantizes them on
/// the spot (`dense_weight`), one matrix at a time.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `None` in a quantized-only load (then `quantized` is set).
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    pub quantized: Option<QMatMul>,
    /// The file's own quantized weights for the lean CPU path (`model::lean`).
    pub kernel: Option<Arc<QWeight>>,
    /// A low-rank correction added to the output, `W x + B (A x)` (healing).
    pub lora: Option<LowRank>,
}

impl Linear {
    /// A dense layer (no quantized copy).
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: Some(weight),
            bias,
            quantized: None,
            kernel: None,
            lora: None,
        }
    }

    pub fn forward(&self, x: &Tensor, run: RunOptions) -> Result<Tensor> {
        let y = match (&self.quantized, &self.weight, run.quantized, run.mode) {
            (Some(q), _, true, _) => q.forward(x)?,
            (_, Some(w), _, Mode::Differentiable) => frozen_matmul(x, w)?,
            (_, Some(w), _, Mode::Fast) => fused::linear(x, w)?,
            // Quantized-only: the fast path is the quantized matmul; a
            // differentiable pass dequantizes this matrix for the call.
            (Some(_), None, _, Mode::Differentiable) => {
                let w = self.dense_weight()?.to_dtype(x.dtype())?;
                frozen_matmul(x, &w)?
            }
            (Some(q), None, _, Mode::Fast) => q.forward(x)?,
            (None, None, _, _) => candle_core::bail!("a linear layer without weights"),
        };
        let y = match &self.lora {
            Some(l) => (y + l.forward(x)?)?,
            None => y,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The dense weight (out, in): the stored one, or the quantized one
    /// dequantized now (f32) when the load kept no dense copy.
    pub fn dense_weight(&self) -> Result<Cow<'_, Tensor>> {
        match (&self.weight, &self.quantized) {
            (Some(w), _) => Ok(Cow::Borrowed(w)),
            (None, Some(QMatMul::QTensor(q))) => Ok(Cow::Owned(q.dequantize(&q.device())?)),
            (None, Some(QMatMul::Tensor(t) | QMatMul::TensorF16(t))) => Ok(Cow::Borrowed(t)),
            (None, None) => candle_core::bail!("a linear layer without weights"),
        }
    }

    /// Bytes this layer holds for its weights (dense and quantized).
    pub fn weight_bytes(&self) -> usize {
        let dense = self.weight.as_ref().map_or(0, tensor_bytes);
        let bias = self.bias.as_ref().map_or(0, tensor_bytes);
        let quantized = match &self.quantized {
            Some(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Some(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => tensor_bytes(t),
            None => 0,
        };
        dense + bias + quantized
    }

    pub fn out_dim(&self) -> usize {
        match (&self.weight, &self.quantized) {
            (Some(w), _) => w.dims()[0],
            (None, Some(QMatMul::QTensor(q))) => q.shape().dims()[0],
            (None, Some(QMatMul::Tensor(t) | QMatMul::TensorF16(t))) => t.dims()[0],
            (None, None) => 0,
        }
    }

    pub fn in_dim(&self) -> usize {
        match (&self.weight, &self.quantized) {
            (Some(w), _) => w.dims()[1],
            (None, Some(QMatMul::QTensor(q))) => q.shape().dims()[1],
            (None, Some(QMatMul::Tensor(t) | QMatMul::TensorF16(t))) => t.dims()[1],
            (None, None) => 0,
        }
    }

    /// The output features `rows` only (dense weights; the quantized copy
    /// is dropped).
    pub fn rows(&self, rows: &Tensor) -> Result<Self> {
        Ok(Self {
            weight: Some(self.dense_weight()?.index_select(rows, 0)?),
            bias: self
                .bias
                .as_ref()
                .map(|b| b.index_select(rows, 0))
                .transpose()?,
            quantized: None,
            kernel: None,
            lora: self.lora.as_ref().map(|l| l.rows(rows)).transpose()?,
        })
    }

    /// The input features `cols` only (dense weights).
    pub fn cols(&self, cols: &Tensor) -> Result<Self> {
        Ok(Self {
            weight: Some(self.dense_weight()?.index_select(cols, 1)?.contiguous()?),
            bias: self.bias.clone(),
            quantized: None,
            kernel: None,
            lora: self.lora.as_ref().map(|l| l.cols(cols)).transpose()?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub attn_norm: Tensor,
    pub attn: Attention,
    /// Before the MLP (Gemma: `pre_feedforward_layernorm`).
    pub mlp_norm: Tensor,
    pub mlp: Mlp,
    /// Gemma 3's extra norms; `None` for the Llama family.
    pub gemma: Option<GemmaNorms>,
}

impl Layer {
    /// The seven projections, in `Projection::ALL` order.
    pub fn projections(&self) -> [&Linear; 7] {
        let (a, m) = (&self.attn, &self.mlp);
        [&a.q, &a.k, &a.v, &a.o, &m.gate, &m.up, &m.down]
    }

    /// The gated MLP's activation: GELU (tanh) for Gemma 3's layers, SiLU
    /// for the Llama family.
    fn activation(&self) -> Activation {
        if self.gemma.is_some() {
            Activation::GeluTanh
        } else {
            Activation::Silu
        }
    }
}

/// The norms a Gemma 3 layer adds: RMSNorm of each query and key head
/// before RoPE, and of each block's output before the residual add (the
/// "sandwich"). Weights are the effective ones, `1 + w` of the checkpoint.
#[derive(Debug, Clone)]
pub struct GemmaNorms {
    pub q_norm: Tensor,
    pub k_norm: Tensor,
    pub post_attn_norm: Tensor,
    pub post_mlp_norm: Tensor,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Fast,
    Differentiable,
}

/// How to run: mode and whether quantized weights may be used.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub mode: Mode,
    pub quantized: bool,
    /// Quantized passes of few rows may take the lean CPU path
    /// (`model/lean`); `false` forces the candle ops (for comparisons).
    pub lean: bool,
}

impl RunOptions {
    pub const FAST: Self = Self {
        mode: Mode::Fast,
        quantized: false,
        lean: true,
    };
    pub const DIFFERENTIABLE: Self = Self {
        mode: Mode::Differentiable,
        quantized: false,
        lean: true,
    };
    pub const QUANTIZED: Self = Self {
        mode: Mode::Fast,
        quantized: true,
        lean: true,
    };

    /// The options for a prefill of `tokens` positions. Quantized kernels
    /// win on the few rows of a decode step; from
    /// `DENSE_PREFILL_MIN_TOKENS` rows on, the dense GEMM over the f32 (or
    /// bf16) weights is faster (SmolLM2 prefill, 2 cores: 32 tokens 185 vs
    /// 177 tok/s, 512 tokens 696 vs 181 tok/s).
    pub fn for_prefill(self, tokens: usize) -> Self {
        if tokens >= DENSE_PREFILL_MIN_TOKENS {
            Self {
                quantized: false,
                ..self
            }
        } else {
            self
        }
    }
}

/// See `RunOptions::for_prefill`.
pub const DENSE_PREFILL_MIN_TOKENS: usize = 32;

pub struct Transformer {
    pub cfg: ModelConfig,
    /// Dense token embeddings; `None` in a quantized-only load, where rows
    /// are dequantized from `embed_quantized` as tokens are looked up.
    pub embed: Option<Tensor>,
    /// The quantized embeddings: the tied output projection for decode,
    /// and the lookup table of a quantized-only load.
    pub embed_quantized: Option<QMatMul>,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// `None` when tied to the embeddings.
    pub lm_head: Option<Linear>,
    /// The tied embeddings' kernel, when they are the output matrix.
    pub embed_kernel: Option<Arc<QWeight>>,
    cos: Tensor,
    sin: Tensor,
    /// Gemma 3's local layers rotate with their own base.
    local_rope: Option<(Tensor, Tensor)>,
    pub device: Device,
    pub dtype: DType,
    lean: lean::Cache,
    sliced: SliceCache,
}

impl Transformer {
    pub fn new(
        cfg: ModelConfig,
        embed: Tensor,
        embed_quantized: Option<QMatMul>,
        layers: Vec<Layer>,
        norm: Tensor,
        lm_head: Option<Linear>,
    ) -> Result<Self> {
        Self::with_embeddings(cfg, Some(embed), embed_quantized, layers, norm, lm_head)
    }

    /// As `new`, with the dense embeddings optional (quantized-only load:
    /// then `embed_quantized` must be set). Device and dtype follow `norm`.
    pub fn with_embeddings(
        cfg: ModelConfig,
        embed: Option<Tensor>,
        embed_quantized: Option<QMatMul>,
        layers: Vec<Layer>,
        norm: Tensor,
        lm_head: Option<Linear>,
    ) -> Result<Self> {
        if embed.is_none() && !matches!(embed_quantized, Some(QMatMul::QTensor(_))) {
            candle_core::bail!("a model needs dense or quantized token embeddings");
        }
        let device = norm.device().clone();
        let dtype = embed.as_ref().map_or(norm.dtype(), Tensor::dtype);
        let max_pos = cfg.max_position_embeddings.max(4096);
        let (cos, sin) = rope_tables(&cfg.rope_inv_freq(), max_pos, &device, dtype)?;
        let local_rope = cfg
            .rope_local_inv_freq()
            .map(|inv| rope_tables(&inv, max_pos, &device, dtype))
            .transpose()?;
        Ok(Self {
            cos,
            sin,
            local_rope,
            cfg,
            embed,
            embed_quantized,
            layers,
            norm,
            lm_head,
            embed_kernel: None,
            device,
            dtype,
            lean: lean::Cache::default(),
            sliced: SliceCache::default(),
        })
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Whether quantized passes of up to `LEAN_MAX_ROWS` rows run on the
    /// lean CPU path (every projection has a kernel, a plain decoder).
    pub fn lean_ready(&self) -> Result<bool> {
        self.lean.ready(self)
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// Token embeddings, shape (batch, seq, hidden) (Gemma: times √hidden).
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let rows = match (&self.embed, &self.embed_quantized) {
            (Some(e), _) => e.index_select(&flat, 0)?,
            (None, Some(QMatMul::QTensor(q))) => {
                quantized_rows(q, &flat.to_vec1::<u32>()?)?.to_dtype(self.dtype)?
            }
            _ => candle_core::bail!("this model has no token embeddings"),
        };
        let x = rows.reshape((b, t, self.cfg.hidden_size))?;
        match self.cfg.embed_scale() {
            Some(scale) => x.affine(scale, 0.0),
            None => Ok(x),
        }
    }

    /// The dense embedding matrix (vocab, hidden): the stored one, or the
    /// quantized one dequantized now.
    pub fn embed_weight(&self) -> Result<Cow<'_, Tensor>> {
        match (&self.embed, &self.embed_quantized) {
            (Some(e), _) => Ok(Cow::Borrowed(e)),
            (None, Some(QMatMul::QTensor(q))) => Ok(Cow::Owned(
                q.dequantize(&self.device)?.to_dtype(self.dtype)?,
            )),
            _ => candle_core::bail!("this model has no token embeddings"),
        }
    }

    /// Bytes held for weights (dense and quantized copies, norms, biases;
    /// not the RoPE tables or any cache).
    pub fn weight_bytes(&self) -> usize {
        let embed = self.embed.as_ref().map_or(0, tensor_bytes)
            + match &self.embed_quantized {
                Some(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
                Some(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => tensor_bytes(t),
                None => 0,
            };
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.projections()
                    .iter()
                    .map(|lin| lin.weight_bytes())
                    .sum::<usize>()
                    + tensor_bytes(&l.attn_norm)
                    + tensor_bytes(&l.mlp_norm)
            })
            .sum();
        let head = self.lm_head.as_ref().map_or(0, Linear::weight_bytes);
        embed + layers + head + tensor_bytes(&self.norm)
    }

    /// The sliding window of `layer`'s attention, if any (Gemma 3: local
    /// layers only).
    pub fn attention_window(&self, layer: usize) -> Option<usize> {
        self.cfg.layer_window(layer)
    }

    /// An empty sequence state for this model, with room for `tokens`
    /// positions per layer allocated up front (0: grow as needed).
    pub fn new_state(&self, tokens: usize) -> SeqState {
        let windows: Vec<_> = (0..self.n_layers())
            .map(|i| self.attention_window(i))
            .collect();
        SeqState::with_capacity(&windows, tokens)
    }

    /// Final-normed hidden states for `ids` (batch, seq). With a state, the
    /// tokens take the positions after those it holds, and it advances.
    pub fn forward_hidden(&self, ids: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        let x = self.embed_tokens(ids)?;
        let t = x.dim(1)?;
        let x = self.run_layers(x, 0..self.n_layers(), pass)?;
        if let Some(state) = pass.state.as_deref_mut() {
            state.advance(t);
        }
        self.final_norm(&x, pass.run)
    }

    pub fn final_norm(&self, x: &Tensor, run: RunOptions) -> Result<Tensor> {
        rms_norm(x, &self.norm, self.cfg.rms_norm_eps, run.mode)
    }

    /// Runs decoder layers `layers` over the residual stream `x`. The tokens
    /// sit at the positions after those the state holds (0.. without one);
    /// the state is not advanced here (`forward_hidden` does that), so a
    /// pass may run its layers in several calls.
    pub fn run_layers(
        &self,
        mut x: Tensor,
        layers: std::ops::Range<usize>,
        pass: &mut Pass,
    ) -> Result<Tensor> {
        let t = x.dim(1)?;
        let start = pass.state.as_ref().map_or(0, |s| s.next_position());
        if start as usize + t > self.max_positions() {
            candle_core::bail!(
                "sequence of {} positions exceeds the model's {} positions",
                start as usize + t,
                self.max_positions()
            );
        }
        if let Some(y) = lean::run_layers(self, &x, layers.clone(), pass)? {
            return Ok(y);
        }
        let positions = position_range(start, t);
        let mut masks = MaskMemo::default();
        let run = pass.run;
        for i in layers {
            // A healed plan's low-rank corrections ride on a copy of the layer.
            let corrected = lowrank::corrected_layer(&self.layers[i], i, pass.params)?;
            let layer = corrected.as_ref().unwrap_or(&self.layers[i]);
            let s = LayerScaleValues::new(pass.params.residual(i)?)?;
            // Attention sub-block: x1 = b_att·Attn(norm(x)) + s_att·x
            let exec = pass.policy.attn(i, &x)?;
            if let Some(p) = pass.probe.as_deref_mut() {
                p.attn_decision(i, &exec)?;
            }
            let eps = self.cfg.rms_norm_eps;
            let a = if exec == AttnExec::Skip {
                None
            } else if exec == AttnExec::Mixer {
                let h = rms_norm(&x, &layer.attn_norm, eps, run.mode)?;
                Some(self.mixer(i, &h, pass)?)
            } else {
                let h = rms_norm(&x, &layer.attn_norm, eps, run.mode)?;
                let store = pass.state.as_deref_mut().and_then(|s| s.kv_mut(i));
                let ctx = AttnCall {
                    layer: i,
                    positions: &positions,
                    exec: &exec,
                    run,
                    norms: layer.gemma.as_ref(),
                };
                self.attention(
                    &layer.attn,
                    &h,
                    ctx,
                    store,
                    &mut masks,
                    pass.probe.as_deref_mut(),
                )?
            };
            // Gemma's sandwich: the block's output is normed before it is
            // scaled and added, x1 = b_att·post_norm(Attn(norm(x))) + s_att·x.
            let a = match a {
                Some(a) => Some(self.attn_block_output(i, a, run.mode)?),
                None => None,
            };
            let a = match (a, pass.probe.as_deref_mut()) {
                (Some(a), Some(p)) => Some(p.block_output(BlockId::attn(i), &x, &a)?.unwrap_or(a)),
                (a, _) => a,
            };
            let x1 = match a {
                Some(a) => {
                    let x1 = (s.apply(0, &a)? + s.apply(1, &x)?)?;
                    if let Some(p) = pass.probe.as_deref_mut() {
                        p.block(BlockId::attn(i), &x, &x1)?;
                    }
                    x1
                }
                None => s.apply(1, &x)?,
            };
            // MLP sub-block: out = b_mlp·MLP(norm(x1)) + s_mlp·x1
            let exec = pass.policy.mlp(i, &x1)?;
            if let Some(p) = pass.probe.as_deref_mut() {
                p.mlp_decision(i, &exec)?;
            }
            x = if exec == MlpExec::Skip {
                s.apply(3, &x1)?
            } else {
                let h = rms_norm(&x1, &layer.mlp_norm, eps, run.mode)?;
                let act = layer.activation();
                let probe = pass.probe.as_deref_mut();
                let probe = probe.map(|p| (p, i));
                let m = match &exec {
                    MlpExec::Neurons(ns) => {
                        let sliced = self.sliced_mlp(i, ns)?;
                        mlp_probed(&sliced, &h, &MlpExec::Full, run, act, probe)?
                    }
                    _ => mlp_probed(&layer.mlp, &h, &exec, run, act, probe)?,
                };
                let m = match &layer.gemma {
                    Some(g) => rms_norm(&m, &g.post_mlp_norm, eps, run.mode)?,
                    None => m,
                };
                let m = match pass.probe.as_deref_mut() {
                    Some(p) => p.block_output(BlockId::mlp(i), &x1, &m)?.unwrap_or(m),
                    None => m,
                };
                let out = (s.apply(2, &m)? + s.apply(3, &x1)?)?;
                if let Some(p) = pass.probe.as_deref_mut() {
                    p.block(BlockId::mlp(i), &x1, &out)?;
                }
                out
            };
        }
        Ok(x)
    }

    /// Logits for hidden states (any leading shape), at least f32.
    pub fn logits(&self, hidden: &Tensor, run: RunOptions) -> Result<Tensor> {
        if let Some(logits) = lean::logits(self, hidden, run)? {
            return Ok(logits);
        }
        let logits = match (&self.lm_head, &self.embed_quantized) {
            (Some(head), _) => head.forward(hidden, run)?,
            (None, Some(q)) if run.quantized => q.forward(hidden)?,
            (None, _) if self.embed.is_none() => match (&self.embed_quantized, run.mode) {
                // Quantized-only: the quantized matmul, or for gradients
                // the dequantized matrix for this call.
                (Some(q), Mode::Fast) => q.forward(hidden)?,
                _ => frozen_matmul(hidden, self.embed_weight()?.as_ref())?,
            },
            (None, _) if run.mode == Mode::Differentiable => {
                frozen_matmul(hidden, self.embed_weight()?.as_ref())?
            }
            (None, _) => fused::linear(hidden, self.embed_weight()?.as_ref())?,
        };
        // Half-precision logits are upcast for stable log-softmax.
        match logits.dtype() {
            DType::BF16 | DType::F16 => logits.to_dtype(DType::F32),
            _ => Ok(logits),
        }
    }

    /// Layer `layer`'s replacing mixer over normed input `h`, its weights
    /// from the pass's parameters, continuing the layer's recurrent state.
    fn mixer(&self, layer: usize, h: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        let w = mixer::MixerWeights::from_params(pass.params, layer, h.dtype())?;
        let state = match pass.state.as_deref_mut() {
            Some(s) => Some(s.mixer_mut(layer)?),
            None => None,
        };
        self.run_mixer(layer, &w, h, state, pass.run.mode)
    }

    /// Layer `layer`'s mixer with weights `w` over normed input `h`. On
    /// Gemma its q and k pass the layer's frozen per-head norms, as the
    /// attention's do, so the copied weights start on the same scale.
    pub fn run_mixer(
        &self,
        layer: usize,
        w: &mixer::MixerWeights,
        h: &Tensor,
        state: Option<&mut mixer::MixerState>,
        mode: Mode,
    ) -> Result<Tensor> {
        let dims = mixer::Dims::of(&self.cfg);
        w.check(dims, layer)?;
        let eps = self.cfg.rms_norm_eps;
        let norm = |x: &Tensor, weight: &Tensor| rms_norm(x, weight, eps, mode);
        let norms = self.layers[layer].gemma.as_ref().map(|g| mixer::HeadNorms {
            q: &g.q_norm,
            k: &g.k_norm,
            norm: &norm,
        });
        mixer::forward(w, h, dims, norms.as_ref(), state)
    }

    /// What layer `layer`'s attention block adds to the residual stream for
    /// its output `a` (at unit scale): Gemma norms it (the sandwich's
    /// post-attention norm), Llama adds it as it is.
    pub fn attn_block_output(&self, layer: usize, a: Tensor, mode: Mode) -> Result<Tensor> {
        match &self.layers[layer].gemma {
            Some(g) => rms_norm(&a, &g.post_attn_norm, self.cfg.rms_norm_eps, mode),
            None => Ok(a),
        }
    }

    /// One attention block over normed input `x` (b, t, hidden) as `call`
    /// says; `None` when it computes no output (K/V only).
    fn attention<'p>(
        &self,
        attn: &Attention,
        x: &Tensor,
        call: AttnCall,
        store: Option<&mut KvStore>,
        masks: &mut MaskMemo,
        probe: Option<&mut (dyn Probe + 'p)>,
    ) -> Result<Option<Tensor>> {
        let mut probe = probe;
        let cfg = &self.cfg;
        let (b, t, hidden) = x.dims3()?;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let run = call.run;
        let differentiable = run.mode == Mode::Differentiable;
        let all: Vec<u32> = (0..t as u32).collect();
        let (query_rows, kv_rows): (Option<&[u32]>, &[u32]) = match call.exec {
            AttnExec::Skip => return Ok(None),
            AttnExec::Mixer => candle_core::bail!("a replaced attention runs as its mixer"),
            AttnExec::Full | AttnExec::Heads(_) => (Some(&all), &all),
            AttnExec::KvOnly => (None, &all),
            AttnExec::Rows {
                rows,
                others_write_kv,
            } => (Some(rows), if *others_write_kv { &all } else { rows }),
        };
        let pick = |rows: &[u32]| -> Result<(Tensor, Vec<u32>)> {
            let at: Vec<u32> = rows.iter().map(|&r| call.positions[r as usize]).collect();
            if rows.len() == t {
                return Ok((x.clone(), at));
            }
            let idx = Tensor::new(rows, x.device())?;
            Ok((x.index_select(&idx, 1)?, at))
        };

        // Keys and values of the rows that write them, rotated at their positions.
        let (kv_in, kv_positions) = pick(kv_rows)?;
        let tk = kv_positions.len();
        let layer = call.layer;
        let k = project(
            probe.as_deref_mut(),
            layer,
            Projection::K,
            &attn.k,
            &kv_in,
            run,
        )?
        .reshape((b, tk, nkv, hd))?;
        let k = match call.norms {
            Some(n) => rms_norm(&k, &n.k_norm, cfg.rms_norm_eps, run.mode)?,
            None => k,
        }
        .transpose(1, 2)?;
        let v = project(
            probe.as_deref_mut(),
            layer,
            Projection::V,
            &attn.v,
            &kv_in,
            run,
        )?
        .reshape((b, tk, nkv, hd))?
        .transpose(1, 2)?;
        let k = self.rope(&k.contiguous()?, &kv_positions, call.layer, run.mode)?;
        let v = v.contiguous()?;
        let (keys, values, key_positions) = match store {
            Some(store) => {
                store.append(&k, &v, &kv_positions, differentiable)?;
                let (k, v) = store
                    .keys_values()?
                    .ok_or_else(|| candle_core::Error::Msg("kv store empty after append".into()))?;
                (k, v, store.positions().to_vec())
            }
            None => (k, v, kv_positions),
        };
        let Some(query_rows) = query_rows else {
            return Ok(None);
        };

        // Queries: every head, or the policy's subset (sliced weights).
        let (q_in, q_positions) = pick(query_rows)?;
        let tq = q_positions.len();
        let heads: Vec<u32> = match call.exec {
            AttnExec::Heads(h) => h.clone(),
            _ => (0..nh as u32).collect(),
        };
        if heads.iter().any(|&h| h as usize >= nh) {
            candle_core::bail!("layer {}: head subset names a head ≥ {nh}", call.layer);
        }
        let all_heads = heads.len() == nh;
        let (q, keys, values, o) = if all_heads {
            let q = project(
                probe.as_deref_mut(),
                layer,
                Projection::Q,
                &attn.q,
                &q_in,
                run,
            )?;
            (q, keys, values, None)
        } else {
            let dev = x.device();
            let dims = dims_of(&heads, hd);
            let index = || Tensor::new(dims.as_slice(), dev);
            let q_lin = self.sliced.get((layer, Projection::Q, dims.clone()), || {
                attn.q.rows(&index()?)
            })?;
            let q = project(
                probe.as_deref_mut(),
                layer,
                Projection::Q,
                &q_lin,
                &q_in,
                run,
            )?;
            // Each selected head reads its own KV head.
            let group = (nh / nkv) as u32;
            let kv_of: Vec<u32> = heads.iter().map(|&h| h / group).collect();
            let kv_of = Tensor::new(kv_of.as_slice(), dev)?;
            let o = self.sliced.get((layer, Projection::O, dims.clone()), || {
                attn.o.cols(&index()?)
            })?;
            (
                q,
                keys.contiguous()?.index_select(&kv_of, 1)?,
                values.contiguous()?.index_select(&kv_of, 1)?,
                Some(o),
            )
        };
        let n_q = heads.len();
        let q = q.reshape((b, tq, n_q, hd))?;
        let q = match call.norms {
            Some(n) => rms_norm(&q, &n.q_norm, cfg.rms_norm_eps, run.mode)?,
            None => q,
        }
        .transpose(1, 2)?;
        let q = self.rope(&q.contiguous()?, &q_positions, call.layer, run.mode)?;
        let q = match cfg.query_scale() {
            Some(s) => q.affine(s, 0.0)?,
            None => q,
        };
        let window = self.attention_window(call.layer);
        let mask = masks.get(&q_positions, &key_positions, window, self, run)?;
        let wants_probs = probe
            .as_ref()
            .is_some_and(|p| p.wants_attention(call.layer));
        let chosen = match probe.as_deref_mut() {
            Some(p) if all_heads => p.attend(
                call.layer,
                &q,
                (&keys, &values),
                &key_positions,
                &q_positions,
            )?,
            _ => None,
        };
        let y = if let Some(y) = chosen {
            y
        } else if wants_probs {
            let (y, probs) =
                attention::dense_with_probs(&q, &keys, &values, mask.as_deref(), differentiable)?;
            if let Some(p) = probe.as_deref_mut() {
                p.attention(call.layer, &probs, &key_positions)?;
            }
            y
        } else {
            attention::attend(&q, &keys, &values, mask.as_deref(), differentiable)?
        };
        let y = match probe {
            Some(ref mut p) if p.wants_head_context(call.layer) => {
                let ctx = y.reshape((b, tq, n_q, hd))?;
                let ctx = p.head_context(call.layer, &heads, &ctx)?.unwrap_or(ctx);
                ctx.reshape((b, tq, n_q * hd))?
            }
            _ => y,
        };
        let o_lin = o.as_deref().unwrap_or(&attn.o);
        let out = project(probe, layer, Projection::O, o_lin, &y, run)?;
        if tq == t {
            return Ok(Some(out));
        }
        scatter_rows(&out, query_rows, (b, t, hidden)).map(Some)
    }

    /// The cos/sin tables `layer` rotates with (Gemma 3's local layers
    /// have their own base).
    fn rope_tables_of(&self, layer: usize) -> (&Tensor, &Tensor) {
        match &self.local_rope {
            Some((cos, sin)) if self.uses_local_rope(layer) => (cos, sin),
            _ => (&self.cos, &self.sin),
        }
    }

    /// Whether `layer` rotates with the local tables (Gemma 3's windowed
    /// layers), which must then exist.
    fn uses_local_rope(&self, layer: usize) -> bool {
        self.local_rope.is_some() && self.attention_window(layer).is_some()
    }

    /// Rotary embedding of x (b, heads, t, hd) at `positions`, with
    /// `layer`'s tables.
    fn rope(&self, x: &Tensor, positions: &[u32], layer: usize, mode: Mode) -> Result<Tensor> {
        let t = positions.len();
        let contiguous = positions.windows(2).all(|w| w[1] == w[0] + 1);
        let (cos_table, sin_table) = self.rope_tables_of(layer);
        let (cos, sin) = match positions.first() {
            Some(&p) if contiguous => (
                cos_table.narrow(0, p as usize, t)?,
                sin_table.narrow(0, p as usize, t)?,
            ),
            _ => {
                let idx = Tensor::new(positions, &self.device)?;
                (
                    cos_table.index_select(&idx, 0)?,
                    sin_table.index_select(&idx, 0)?,
                )
            }
        };
        use candle_nn::rotary_emb as re;
        match (self.cfg.rope_layout, mode) {
            (RopeLayout::Halves, Mode::Fast) => re::rope(x, &cos, &sin),
            (RopeLayout::Halves, Mode::Differentiable) => re::rope_slow(x, &cos, &sin),
            (RopeLayout::Interleaved, Mode::Fast) => re::rope_i(x, &cos, &sin),
            (RopeLayout::Interleaved, Mode::Differentiable) => re::rope_i_slow(x, &cos, &sin),
        }
    }
}

impl Transformer {
    /// `layer`'s MLP restricted to neurons `ns` (cached: see `SliceCache`).
    fn sliced_mlp(&self, layer: usize, ns: &[u32]) -> Result<Mlp> {
        let m = &self.layers[layer].mlp;
        let idx = || Tensor::new(ns, &self.device);
        let key = |p| (layer, p, ns.to_vec());
        let gate = self
            .sliced
            .get(key(Projection::Gate), || m.gate.rows(&idx()?))?;
        let up = self
            .sliced
            .get(key(Projection::Up), || m.up.rows(&idx()?))?;
        let down = self
            .sliced
            .get(key(Projection::Down), || m.down.cols(&idx()?))?;
        Ok(Mlp {
            gate: (*gate).clone(),
            up: (*up).clone(),
            down: (*down).clone(),
        })
    }
}

/// The q rows / o columns of query heads `heads`.
fn dims_of(heads: &[u32], hd: usize) -> Vec<u32> {
    heads
        .iter()
        .flat_map(|&h| h * hd as u32..(h + 1) * hd as u32)
        .collect()
}

/// Sliced copies of projections for head and neuron subsets, kept while the
/// same subsets come back (every decode step under one mask), so a step
/// reads only the kept weights instead of gathering them again. Bounded:
/// emptied when it holds `SLICE_CACHE_MAX` slices (a per-token router
/// churns it and pays the gather, as without it).
#[derive(Default)]
struct SliceCache(std::sync::Mutex<std::collections::HashMap<SliceKey, Arc<Linear>>>);

type SliceKey = (usize, Projection, Vec<u32>);

/// About one mask's worth of slices on a 32-layer model (5 per layer).
const SLICE_CACHE_MAX: usize = 192;

impl SliceCache {
    fn get(&self, key: SliceKey, make: impl FnOnce() -> Result<Linear>) -> Result<Arc<Linear>> {
        if let Some(l) = self.0.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(l);
        }
        let l = Arc::new(make()?);
        if let Ok(mut m) = self.0.lock() {
            if m.len() >= SLICE_CACHE_MAX {
                m.clear();
            }
            m.insert(key, l.clone());
        }
        Ok(l)
    }
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// Rows `ids` of a quantized (rows, cols) matrix, dequantized (f32): only
/// those rows' blocks are read, so no dense copy of the matrix is made.
fn quantized_rows(q: &QTensor, ids: &[u32]) -> Result<Tensor> {
    let (rows, cols) = q.shape().dims2()?;
    let dtype = q.dtype();
    if !cols.is_multiple_of(dtype.block_size()) {
        candle_core::bail!("embedding rows of {cols} do not split into {dtype:?} blocks");
    }
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let mut picked = Vec::with_capacity(ids.len() * row_bytes);
    for &id in ids {
        let id = id as usize;
        if id >= rows {
            candle_core::bail!("token id {id} is outside the vocabulary of {rows}");
        }
        picked.extend_from_slice(&data[id * row_bytes..(id + 1) * row_bytes]);
    }
    let device = q.device();
    let sub = candle_core::quantized::ggml_file::qtensor_from_ggml(
        dtype,
        &picked,
        vec![ids.len(), cols],
        &device,
    )?;
    sub.dequantize(&device)
}

/// cos and sin of every position × inverse frequency, (positions, hd / 2).
fn rope_tables(
    inv_freq: &[f32],
    positions: usize,
    device: &Device,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let inv = Tensor::new(inv_freq, device)?;
    let t = Tensor::arange(0u32, positions as u32, device)?.to_dtype(DType::F32)?;
    let freqs = t.unsqueeze(1)?.broadcast_mul(&inv.unsqueeze(0)?)?;
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Fast => candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32),
        Mode::Differentiable => candle_nn::ops::rms_norm_slow(x, weight, eps as f32),
    }
}

/// The gated MLP's activation: SiLU (Llama family) or GELU with the tanh
/// approximation (Gemma, `gelu_pytorch_tanh`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    Silu,
    GeluTanh,
}

/// `lin` applied to `x` as a probe that watches `layer`'s projection inputs
/// wants it: the probe's own product (TEAL/WINA executed), `lin` on the
/// input it returns (zeroed channels), or `lin` on `x`.
fn project(
    probe: Option<&mut (dyn Probe + '_)>,
    layer: usize,
    proj: Projection,
    lin: &Linear,
    x: &Tensor,
    run: RunOptions,
) -> Result<Tensor> {
    let Some(p) = probe.filter(|p| p.wants_projection_inputs(layer)) else {
        return lin.forward(x, run);
    };
    // The probe's own product skips what a low-rank correction would add.
    if lin.lora.is_none() {
        if let Some(y) = p.project(layer, proj, (lin.out_dim(), lin.in_dim()), x)? {
            return match &lin.bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            };
        }
    }
    let x = p
        .projection_input(layer, proj, x)?
        .unwrap_or_else(|| x.clone());
    lin.forward(&x, run)
}

/// The MLP block over normed input `x` (b, t, hidden) as `exec` says.
fn mlp(m: &Mlp, x: &Tensor, exec: &MlpExec, run: RunOptions, act: Activation) -> Result<Tensor> {
    mlp_probed(m, x, exec, run, act, None)
}

/// `mlp`, its projection inputs shown to `probe` (with the layer index).
fn mlp_probed<'p>(
    m: &Mlp,
    x: &Tensor,
    exec: &MlpExec,
    run: RunOptions,
    act: Activation,
    probe: Option<(&mut (dyn Probe + 'p), usize)>,
) -> Result<Tensor> {
    let probe = std::cell::RefCell::new(probe);
    let seen = |proj: Projection, lin: &Linear, x: &Tensor| -> Result<Tensor> {
        let mut p = probe.borrow_mut();
        match p.as_mut() {
            Some((p, layer)) => project(Some(&mut **p), *layer, proj, lin, x, run),
            None => lin.forward(x, run),
        }
    };
    let dense = |m: &Mlp, x: &Tensor| -> Result<Tensor> {
        let gate = seen(Projection::Gate, &m.gate, x)?;
        let up = seen(Projection::Up, &m.up, x)?;
        let act = match (act, run.mode) {
            (Activation::Silu, Mode::Fast) => fused::silu_mul(&gate, &up)?,
            (Activation::Silu, Mode::Differentiable) => (gate.silu()? * up)?,
            // candle's `gelu` is the tanh approximation (`gelu_erf` is exact).
            (Activation::GeluTanh, _) => (gate.gelu()? * up)?,
        };
        seen(Projection::Down, &m.down, &act)
    };
    match exec {
        MlpExec::Skip => candle_core::bail!("a skipped MLP block is not computed"),
        MlpExec::Full => dense(m, x),
        MlpExec::Rows(rows) => {
            let idx = Tensor::new(rows.as_slice(), x.device())?;
            let y = dense(m, &x.index_select(&idx, 1)?)?;
            scatter_rows(&y, rows, x.dims3()?)
        }
        MlpExec::Neurons(ns) => {
            let idx = Tensor::new(ns.as_slice(), x.device())?;
            let sliced = Mlp {
                gate: m.gate.rows(&idx)?,
                up: m.up.rows(&idx)?,
                down: m.down.cols(&idx)?,
            };
            dense(&sliced, x)
        }
    }
}

/// Places `y` (b, rows, hidden) at `rows` of a zero (b, t, hidden) tensor.
fn scatter_rows(y: &Tensor, rows: &[u32], shape: (usize, usize, usize)) -> Result<Tensor> {
    let idx = Tensor::new(rows, y.device())?;
    Tensor::zeros(shape, y.dtype(), y.device())?.index_add(&idx, y, 1)
}

/// What one attention call computes.
#[derive(Clone, Copy)]
struct AttnCall<'a> {
    layer: usize,
    /// Positions of the pass's tokens.
    positions: &'a [u32],
    exec: &'a AttnExec,
    run: RunOptions,
    /// Gemma's q/k norms, for its layers.
    norms: Option<&'a GemmaNorms>,
}

/// The last mask built in a pass, reused while the next layer's queries,
/// keys and window are the same (the common case: every layer alike).
#[derive(Default)]
struct MaskMemo {
    last: Option<MemoEntry>,
}

struct MemoEntry {
    queries: Vec<u32>,
    keys: Vec<u32>,
    window: Option<usize>,
    mask: Option<Rc<AttentionMask>>,
}

impl MaskMemo {
    fn get(
        &mut self,
        queries: &[u32],
        keys: &[u32],
        window: Option<usize>,
        t: &Transformer,
        run: RunOptions,
    ) -> Result<Option<Rc<AttentionMask>>> {
        if let Some(e) = &self.last {
            if e.queries == queries && e.keys == keys && e.window == window {
                return Ok(e.mask.clone());
            }
        }
        let fused = run.mode == Mode::Fast;
        let mask =
            AttentionMask::new(queries, keys, window, &t.device, t.dtype, fused)?.map(Rc::new);
        self.last = Some(MemoEntry {
            queries: queries.to_vec(),
            keys: keys.to_vec(),
            window,
            mask: mask.clone(),
        });
        Ok(mask)
    }
}

/// One layer's four scalars, as numbers or as differentiable tensors.
enum LayerScaleValues {
    Const(LayerScales),
    Tensor([Tensor; 4]),
}

impl LayerScaleValues {
    fn new(r: Residual) -> Result<Self> {
        Ok(match r {
            Residual::Const(s) => Self::Const(s),
            Residual::Tensor(t) => Self::Tensor([t.get(0)?, t.get(1)?, t.get(2)?, t.get(3)?]),
        })
    }

    /// Scales `x` by scalar `idx`: 0 b_att, 1 s_att, 2 b_mlp, 3 s_mlp.
    fn apply(&self, idx: usize, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Const(s) => {
                let v = s.as_array()[idx];
                if v == 1.0 {
                    Ok(x.clone())
                } else {
                    x.affine(f64::from(v), 0.0)
                }
            }
            Self::Tensor(ts) => x.broadcast_mul(&ts[idx].to_dtype(x.dtype())?),
        }
    }
}
