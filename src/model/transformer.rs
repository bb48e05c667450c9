//! The forward pass of a Llama-family decoder under a `Plan`.
//!
//! One block implementation, two modes:
//! - `Mode::Fast`: fused candle ops (rms_norm, softmax_last_dim, rope), for
//!   evaluation and generation. Optionally quantized matmuls for decode.
//! - `Mode::Differentiable`: the slow ops that carry gradients
//!   (`rms_norm_slow`, `softmax`, `rope_slow`), f32 weights, scales as tensors
//!   (candle `Var`s) so `backward()` reaches them. Tests hold both equal.
//!
//! A skipped block is not computed: no matmul, and a skipped attention block
//! keeps no KV cache entry.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Result, Tensor};

use super::attention;
use super::config::{ModelConfig, RopeLayout};
use super::frozen::frozen_matmul;
use super::fused::{self, CausalMask};
use crate::plan::{BlockId, LayerScales, Plan};

/// A linear layer: f32 (or bf16 on GPU) weights for exact and differentiable
/// work, and optionally the original quantized weights for fast decode.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub quantized: Option<QMatMul>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor, run: RunOptions) -> Result<Tensor> {
        let y = match (&self.quantized, run.quantized, run.mode) {
            (Some(q), true, _) => q.forward(x)?,
            (_, _, Mode::Differentiable) => frozen_matmul(x, &self.weight)?,
            _ => fused::linear(x, &self.weight)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
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
    pub mlp_norm: Tensor,
    pub mlp: Mlp,
}

/// Per-layer scalars as the forward pass consumes them: plain numbers in
/// fast mode, tensors of shape `[4]` (b_att, s_att, b_mlp, s_mlp) when
/// gradients must reach them.
#[derive(Clone, Copy)]
pub enum Scales<'a> {
    FromPlan,
    Tensors(&'a [Tensor]),
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
}

impl RunOptions {
    pub const FAST: Self = Self {
        mode: Mode::Fast,
        quantized: false,
    };
    pub const DIFFERENTIABLE: Self = Self {
        mode: Mode::Differentiable,
        quantized: false,
    };
    pub const QUANTIZED: Self = Self {
        mode: Mode::Fast,
        quantized: true,
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

/// KV cache kept outside the model; a skipped attention layer has `None`.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
        }
    }

    /// Layers holding a cache entry (for tests and memory reports).
    pub fn cached_layers(&self) -> Vec<usize> {
        self.layers
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_some())
            .map(|(i, _)| i)
            .collect()
    }

    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}

/// Sees each computed block's input and output residual stream (for
/// block-influence importance). Skipped blocks are not reported.
pub trait BlockObserver {
    fn observe(&mut self, block: BlockId, input: &Tensor, output: &Tensor) -> Result<()>;
}

pub struct Transformer {
    pub cfg: ModelConfig,
    pub embed: Tensor,
    pub embed_quantized: Option<QMatMul>,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// `None` when tied to the embeddings.
    pub lm_head: Option<Linear>,
    cos: Tensor,
    sin: Tensor,
    pub device: Device,
    pub dtype: DType,
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
        let device = embed.device().clone();
        let dtype = embed.dtype();
        let inv_freq = cfg.rope_inv_freq();
        let max_pos = cfg.max_position_embeddings.max(4096);
        let inv = Tensor::new(inv_freq.as_slice(), &device)?;
        let t = Tensor::arange(0u32, max_pos as u32, &device)?.to_dtype(DType::F32)?;
        let freqs = t.unsqueeze(1)?.broadcast_mul(&inv.unsqueeze(0)?)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
            cfg,
            embed,
            embed_quantized,
            layers,
            norm,
            lm_head,
            device,
            dtype,
        })
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// Token embeddings, shape (batch, seq, hidden).
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))
    }

    /// Final-normed hidden states for `ids` (batch, seq) starting at `pos`.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        pos: usize,
        cache: Option<&mut KvCache>,
        plan: &Plan,
        scales: Scales,
        run: RunOptions,
    ) -> Result<Tensor> {
        let x = self.embed_tokens(ids)?;
        let x = self.run_layers(x, 0..self.n_layers(), pos, cache, plan, scales, run, None)?;
        self.final_norm(&x, run)
    }

    pub fn final_norm(&self, x: &Tensor, run: RunOptions) -> Result<Tensor> {
        rms_norm(x, &self.norm, self.cfg.rms_norm_eps, run.mode)
    }

    /// Runs decoder layers `layers` over the residual stream `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn run_layers(
        &self,
        mut x: Tensor,
        layers: std::ops::Range<usize>,
        pos: usize,
        mut cache: Option<&mut KvCache>,
        plan: &Plan,
        scales: Scales,
        run: RunOptions,
        mut observer: Option<&mut dyn BlockObserver>,
    ) -> Result<Tensor> {
        let t = x.dim(1)?;
        if pos + t > self.max_positions() {
            candle_core::bail!(
                "sequence of {} positions exceeds the model's {} positions",
                pos + t,
                self.max_positions()
            );
        }
        let mask = if t > 1 {
            let fused = run.mode == Mode::Fast;
            let window = self.cfg.sliding_window;
            Some(CausalMask::new(
                t,
                pos,
                window,
                &self.device,
                self.dtype,
                fused,
            )?)
        } else {
            None
        };
        for i in layers {
            let layer = &self.layers[i];
            let s = LayerScaleValues::new(plan, scales, i)?;
            // Attention sub-block: x1 = b_att·Attn(norm(x)) + s_att·x
            let x1 = if plan.skips_attn(i) {
                s.apply_s_att(&x)?
            } else {
                let h = rms_norm(&x, &layer.attn_norm, self.cfg.rms_norm_eps, run.mode)?;
                let cache_slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
                let a = self.attention(&layer.attn, &h, pos, cache_slot, mask.as_ref(), run)?;
                let x1 = (s.apply_b_att(&a)? + s.apply_s_att(&x)?)?;
                if let Some(o) = observer.as_deref_mut() {
                    o.observe(BlockId::attn(i), &x, &x1)?;
                }
                x1
            };
            // MLP sub-block: out = b_mlp·MLP(norm(x1)) + s_mlp·x1
            x = if plan.skips_mlp(i) {
                s.apply_s_mlp(&x1)?
            } else {
                let h = rms_norm(&x1, &layer.mlp_norm, self.cfg.rms_norm_eps, run.mode)?;
                let m = mlp(&layer.mlp, &h, run)?;
                let out = (s.apply_b_mlp(&m)? + s.apply_s_mlp(&x1)?)?;
                if let Some(o) = observer.as_deref_mut() {
                    o.observe(BlockId::mlp(i), &x1, &out)?;
                }
                out
            };
        }
        Ok(x)
    }

    /// Logits for hidden states (any leading shape), at least f32.
    pub fn logits(&self, hidden: &Tensor, run: RunOptions) -> Result<Tensor> {
        let logits = match (&self.lm_head, &self.embed_quantized) {
            (Some(head), _) => head.forward(hidden, run)?,
            (None, Some(q)) if run.quantized => q.forward(hidden)?,
            (None, _) if run.mode == Mode::Differentiable => frozen_matmul(hidden, &self.embed)?,
            (None, _) => fused::linear(hidden, &self.embed)?,
        };
        // Half-precision logits are upcast for stable log-softmax.
        match logits.dtype() {
            DType::BF16 | DType::F16 => logits.to_dtype(DType::F32),
            _ => Ok(logits),
        }
    }

    fn attention(
        &self,
        attn: &Attention,
        x: &Tensor,
        pos: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        mask: Option<&CausalMask>,
        run: RunOptions,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let q = attn
            .q
            .forward(x, run)?
            .reshape((b, t, nh, hd))?
            .transpose(1, 2)?;
        let k = attn
            .k
            .forward(x, run)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?;
        let v = attn
            .v
            .forward(x, run)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?;
        let q = self.rope(&q.contiguous()?, pos, run.mode)?;
        let k = self.rope(&k.contiguous()?, pos, run.mode)?;
        let v = v.contiguous()?;
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        let y = attention::attend(&q, &k, &v, mask, run.mode == Mode::Differentiable)?;
        attn.o.forward(&y, run)
    }

    fn rope(&self, x: &Tensor, pos: usize, mode: Mode) -> Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        use candle_nn::rotary_emb as re;
        match (self.cfg.rope_layout, mode) {
            (RopeLayout::Halves, Mode::Fast) => re::rope(x, &cos, &sin),
            (RopeLayout::Halves, Mode::Differentiable) => re::rope_slow(x, &cos, &sin),
            (RopeLayout::Interleaved, Mode::Fast) => re::rope_i(x, &cos, &sin),
            (RopeLayout::Interleaved, Mode::Differentiable) => re::rope_i_slow(x, &cos, &sin),
        }
    }
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Fast => candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32),
        Mode::Differentiable => candle_nn::ops::rms_norm_slow(x, weight, eps as f32),
    }
}

fn mlp(m: &Mlp, x: &Tensor, run: RunOptions) -> Result<Tensor> {
    let gate = m.gate.forward(x, run)?;
    let up = m.up.forward(x, run)?;
    let act = match run.mode {
        Mode::Fast => fused::silu_mul(&gate, &up)?,
        Mode::Differentiable => (gate.silu()? * up)?,
    };
    m.down.forward(&act, run)
}

/// One layer's four scalars, as numbers or as differentiable tensors.
enum LayerScaleValues {
    Const(LayerScales),
    Tensor([Tensor; 4]),
}

impl LayerScaleValues {
    fn new(plan: &Plan, scales: Scales, layer: usize) -> Result<Self> {
        Ok(match scales {
            Scales::FromPlan => Self::Const(plan.scales_for(layer)),
            Scales::Tensors(ts) => {
                let t = &ts[layer];
                Self::Tensor([t.get(0)?, t.get(1)?, t.get(2)?, t.get(3)?])
            }
        })
    }

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

    fn apply_b_att(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(0, x)
    }
    fn apply_s_att(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(1, x)
    }
    fn apply_b_mlp(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(2, x)
    }
    fn apply_s_mlp(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(3, x)
    }
}
