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

use std::rc::Rc;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Result, Tensor};

use super::attention;
use super::config::{ModelConfig, RopeLayout};
use super::frozen::frozen_matmul;
use super::fused;
use super::mask::AttentionMask;
use super::pass::{AttnExec, MlpExec, Pass, Probe, Residual};
use super::state::{position_range, KvStore, SeqState};
use crate::plan::{BlockId, LayerScales};

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

    /// The output features `rows` only (dense weights; the quantized copy
    /// is dropped).
    pub fn rows(&self, rows: &Tensor) -> Result<Self> {
        Ok(Self {
            weight: self.weight.index_select(rows, 0)?,
            bias: self
                .bias
                .as_ref()
                .map(|b| b.index_select(rows, 0))
                .transpose()?,
            quantized: None,
        })
    }

    /// The input features `cols` only (dense weights).
    pub fn cols(&self, cols: &Tensor) -> Result<Self> {
        Ok(Self {
            weight: self.weight.index_select(cols, 1)?.contiguous()?,
            bias: self.bias.clone(),
            quantized: None,
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
    pub mlp_norm: Tensor,
    pub mlp: Mlp,
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

    /// The sliding window of `layer`'s attention, if any.
    pub fn attention_window(&self, _layer: usize) -> Option<usize> {
        self.cfg.sliding_window
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
        let positions = position_range(start, t);
        let mut masks = MaskMemo::default();
        let run = pass.run;
        for i in layers {
            let layer = &self.layers[i];
            let s = LayerScaleValues::new(pass.params.residual(i)?)?;
            // Attention sub-block: x1 = b_att·Attn(norm(x)) + s_att·x
            let exec = pass.policy.attn(i, &x)?;
            if let Some(p) = pass.probe.as_deref_mut() {
                p.attn_decision(i, &exec)?;
            }
            let a = if exec == AttnExec::Skip {
                None
            } else {
                let h = rms_norm(&x, &layer.attn_norm, self.cfg.rms_norm_eps, run.mode)?;
                let store = pass.state.as_deref_mut().and_then(|s| s.kv_mut(i));
                let ctx = AttnCall {
                    layer: i,
                    positions: &positions,
                    exec: &exec,
                    run,
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
                let h = rms_norm(&x1, &layer.mlp_norm, self.cfg.rms_norm_eps, run.mode)?;
                let m = mlp(&layer.mlp, &h, &exec, run)?;
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
        let cfg = &self.cfg;
        let (b, t, hidden) = x.dims3()?;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let run = call.run;
        let differentiable = run.mode == Mode::Differentiable;
        let all: Vec<u32> = (0..t as u32).collect();
        let (query_rows, kv_rows): (Option<&[u32]>, &[u32]) = match call.exec {
            AttnExec::Skip => return Ok(None),
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
        let k = attn
            .k
            .forward(&kv_in, run)?
            .reshape((b, tk, nkv, hd))?
            .transpose(1, 2)?;
        let v = attn
            .v
            .forward(&kv_in, run)?
            .reshape((b, tk, nkv, hd))?
            .transpose(1, 2)?;
        let k = self.rope(&k.contiguous()?, &kv_positions, run.mode)?;
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
            let q = attn.q.forward(&q_in, run)?;
            (q, keys, values, None)
        } else {
            let dev = x.device();
            let dims: Vec<u32> = heads
                .iter()
                .flat_map(|&h| h * hd as u32..(h + 1) * hd as u32)
                .collect();
            let dims = Tensor::new(dims.as_slice(), dev)?;
            let q = attn.q.rows(&dims)?.forward(&q_in, run)?;
            // Each selected head reads its own KV head.
            let group = (nh / nkv) as u32;
            let kv_of: Vec<u32> = heads.iter().map(|&h| h / group).collect();
            let kv_of = Tensor::new(kv_of.as_slice(), dev)?;
            let o = attn.o.cols(&dims)?;
            (
                q,
                keys.contiguous()?.index_select(&kv_of, 1)?,
                values.contiguous()?.index_select(&kv_of, 1)?,
                Some(o),
            )
        };
        let n_q = heads.len();
        let q = q.reshape((b, tq, n_q, hd))?.transpose(1, 2)?;
        let q = self.rope(&q.contiguous()?, &q_positions, run.mode)?;
        let window = self.attention_window(call.layer);
        let mask = masks.get(&q_positions, &key_positions, window, self, run)?;
        let mut probe = probe;
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
            Some(p) if p.wants_head_context(call.layer) => {
                let ctx = y.reshape((b, tq, n_q, hd))?;
                let ctx = p.head_context(call.layer, &heads, &ctx)?.unwrap_or(ctx);
                ctx.reshape((b, tq, n_q * hd))?
            }
            _ => y,
        };
        let out = match &o {
            Some(o) => o.forward(&y, run)?,
            None => attn.o.forward(&y, run)?,
        };
        if tq == t {
            return Ok(Some(out));
        }
        scatter_rows(&out, query_rows, (b, t, hidden)).map(Some)
    }

    /// Rotary embedding of x (b, heads, t, hd) at `positions`.
    fn rope(&self, x: &Tensor, positions: &[u32], mode: Mode) -> Result<Tensor> {
        let t = positions.len();
        let contiguous = positions.windows(2).all(|w| w[1] == w[0] + 1);
        let (cos, sin) = match positions.first() {
            Some(&p) if contiguous => (
                self.cos.narrow(0, p as usize, t)?,
                self.sin.narrow(0, p as usize, t)?,
            ),
            _ => {
                let idx = Tensor::new(positions, &self.device)?;
                (
                    self.cos.index_select(&idx, 0)?,
                    self.sin.index_select(&idx, 0)?,
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

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Fast => candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32),
        Mode::Differentiable => candle_nn::ops::rms_norm_slow(x, weight, eps as f32),
    }
}

/// The MLP block over normed input `x` (b, t, hidden) as `exec` says.
fn mlp(m: &Mlp, x: &Tensor, exec: &MlpExec, run: RunOptions) -> Result<Tensor> {
    let dense = |m: &Mlp, x: &Tensor| -> Result<Tensor> {
        let gate = m.gate.forward(x, run)?;
        let up = m.up.forward(x, run)?;
        let act = match run.mode {
            Mode::Fast => fused::silu_mul(&gate, &up)?,
            Mode::Differentiable => (gate.silu()? * up)?,
        };
        m.down.forward(&act, run)
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
