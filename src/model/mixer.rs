//! A replacement for an attention block with a constant-size state: gated
//! linear attention with the base model's q/k/v/o shapes (RAD steps 2–3).
//!
//! Per KV head g (its query heads share g's state, as GQA shares K/V):
//!
//! ```text
//! α_t = sigmoid(x_t · w_g + b_g)                  input-dependent decay
//! S_t = α_t S_{t-1} + φ(k_t) v_tᵀ                  (head dim × head dim)
//! z_t = α_t z_{t-1} + φ(k_t)                       (head dim)
//! y_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t + ε)            per query head, then o_proj
//! φ(u) = elu(u / d^¼) + 1                          positive features
//! ```
//!
//! q, k, v, o are linear maps of the block's normed input with exactly the
//! replaced attention's shapes, so they start as copies of its weights
//! (`init_from_attention`, the MambaInLlama `init_with_kqvo` mapping); the
//! gate starts at w = 0, b = 3 (α ≈ 0.95). No RoPE: the decay carries
//! recency. The normaliser makes a one-token sequence give o(v), exactly
//! what softmax attention gives on one token.
//!
//! Two forms, equal to rounding (tests/mixer.rs): `recurrent` (one token at
//! a time, what decode runs) and `parallel` (a chunk at once with the
//! causal decay matrix exp(L_t − L_s), L the cumulative log decay; prefill
//! and training run it chunk by chunk, carrying the state).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, D};

use super::config::ModelConfig;
use super::pass::ParamSource;
use super::transformer::Attention;

/// Added to the normaliser (features are positive, so it is never 0).
pub const EPS: f64 = 1e-6;
/// Tokens per chunk of the parallel form (bounds its t × t matrices).
pub const CHUNK: usize = 128;
/// The gate's starting bias: α = sigmoid(3) ≈ 0.953, a memory of ~20 tokens.
pub const GATE_BIAS_INIT: f64 = 3.0;

/// The six trained tensors of layer `layer`'s mixer, by name.
pub fn tensor_names(layer: usize) -> [String; 6] {
    ["q", "k", "v", "o", "gate", "gate_bias"].map(|p| format!("mixer.{layer}.{p}"))
}

/// The attention layers a plan replaces and, for running it, the mixers'
/// weights by name (`tensor_names`). Training reads the weights from its
/// trainable set instead and leaves `weights` empty.
#[derive(Clone, Default)]
pub struct Replaced {
    pub layers: BTreeSet<usize>,
    pub weights: Arc<HashMap<String, Tensor>>,
}

impl Replaced {
    /// Layers to replace, weights supplied elsewhere (training).
    pub fn layers(layers: impl IntoIterator<Item = usize>) -> Self {
        Self {
            layers: layers.into_iter().collect(),
            weights: Arc::default(),
        }
    }
}

impl PartialEq for Replaced {
    fn eq(&self, other: &Self) -> bool {
        self.layers == other.layers && Arc::ptr_eq(&self.weights, &other.weights)
    }
}

impl fmt::Debug for Replaced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Replaced({:?}, {} tensors)",
            self.layers,
            self.weights.len()
        )
    }
}

/// Head counts of a mixer (those of the attention it replaces).
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
}

impl Dims {
    pub fn of(cfg: &ModelConfig) -> Self {
        Self {
            heads: cfg.n_heads,
            kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            hidden: cfg.hidden_size,
        }
    }

    /// Trained scalars per mixer.
    pub fn parameters(&self) -> usize {
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        2 * q * self.hidden + 2 * kv * self.hidden + self.kv_heads * (self.hidden + 1)
    }

    /// Bytes of one layer's recurrent state per sequence (f32).
    pub fn state_bytes(&self) -> usize {
        self.kv_heads * self.head_dim * (self.head_dim + 1) * 4
    }
}

/// One layer's mixer weights, read from a parameter source.
pub struct MixerWeights {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub o: Tensor,
    pub gate: Tensor,
    pub gate_bias: Tensor,
}

impl MixerWeights {
    /// Layer `layer`'s weights from `params`, cast to `dtype`.
    pub fn from_params(params: &dyn ParamSource, layer: usize, dtype: DType) -> Result<Self> {
        let [q, k, v, o, gate, gate_bias] = tensor_names(layer).map(|n| {
            params.tensor(&n).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "layer {layer} is replaced by a mixer, but the pass has no tensor `{n}` \
                     (load the plan's mixer artifact, or train the mixer first)"
                ))
            })
        });
        let cast = |t: Result<Tensor>| t.and_then(|t| t.to_dtype(dtype));
        Ok(Self {
            q: cast(q)?,
            k: cast(k)?,
            v: cast(v)?,
            o: cast(o)?,
            gate: cast(gate)?,
            gate_bias: cast(gate_bias)?,
        })
    }

    /// Checks every shape against `dims`.
    pub fn check(&self, dims: Dims, layer: usize) -> Result<()> {
        let (q, kv, h) = (
            dims.heads * dims.head_dim,
            dims.kv_heads * dims.head_dim,
            dims.hidden,
        );
        let want: [(&str, &Tensor, Vec<usize>); 6] = [
            ("q", &self.q, vec![q, h]),
            ("k", &self.k, vec![kv, h]),
            ("v", &self.v, vec![kv, h]),
            ("o", &self.o, vec![h, q]),
            ("gate", &self.gate, vec![dims.kv_heads, h]),
            ("gate_bias", &self.gate_bias, vec![dims.kv_heads]),
        ];
        for (name, t, shape) in want {
            if t.dims() != shape.as_slice() {
                candle_core::bail!(
                    "mixer.{layer}.{name} has shape {:?}, this model needs {shape:?}: the mixers \
                     were trained for another model",
                    t.dims()
                );
            }
        }
        Ok(())
    }
}

/// The starting weights of a mixer replacing `attn`: q, k, v, o copied
/// (dense f32), gate w = 0, b = `GATE_BIAS_INIT`.
pub fn init_from_attention(
    attn: &Attention,
    dims: Dims,
    layer: usize,
) -> anyhow::Result<Vec<(String, Tensor)>> {
    let lins = [&attn.q, &attn.k, &attn.v, &attn.o];
    if lins.iter().any(|l| l.bias.is_some()) {
        anyhow::bail!(
            "layer {layer}'s attention has biases; the mixer copies only weights, so replacing it \
             is not supported for this model"
        );
    }
    let dense = |l: &super::transformer::Linear| -> Result<Tensor> {
        l.dense_weight()?.to_dtype(DType::F32)?.copy()
    };
    let device = attn.q.dense_weight()?.device().clone();
    let names = tensor_names(layer);
    let gate = Tensor::zeros((dims.kv_heads, dims.hidden), DType::F32, &device)?;
    let bias = Tensor::full(GATE_BIAS_INIT as f32, dims.kv_heads, &device)?;
    let values = [
        dense(&attn.q)?,
        dense(&attn.k)?,
        dense(&attn.v)?,
        dense(&attn.o)?,
        gate,
        bias,
    ];
    Ok(names.into_iter().zip(values).collect())
}

/// One layer's recurrent state: S (batch, kv heads, d, d), z (batch, kv
/// heads, d), and how many tokens it has consumed.
#[derive(Debug)]
pub struct MixerState {
    pub s: Option<Tensor>,
    pub z: Option<Tensor>,
    tokens: u32,
    /// Set when a rollback asked it to forget tokens: a recurrent state
    /// cannot, so its next use fails instead of running on a wrong state.
    stale: bool,
}

impl Default for MixerState {
    fn default() -> Self {
        Self::new()
    }
}

impl MixerState {
    pub fn new() -> Self {
        Self {
            s: None,
            z: None,
            tokens: 0,
            stale: false,
        }
    }

    pub fn tokens(&self) -> u32 {
        self.tokens
    }

    /// Forget tokens from `pos` on: only possible when there are none.
    pub fn truncate_to_position(&mut self, pos: u32) {
        if pos < self.tokens {
            self.stale = true;
        }
    }

    pub fn bytes(&self) -> usize {
        let b = |t: &Option<Tensor>| {
            t.as_ref()
                .map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes())
        };
        b(&self.s) + b(&self.z)
    }

    /// Fails when a rollback made this state stale (it cannot forget tokens).
    pub fn check_fresh(&self) -> Result<()> {
        if self.stale {
            candle_core::bail!(
                "a replaced layer's recurrent state cannot forget tokens (rollback, as speculative \
                 decoding does): run replaced plans without speculation"
            );
        }
        Ok(())
    }

    /// S and z as flat f32 values (zeros before the first token), for the
    /// lean path's step; `shape` is (kv heads, head dim).
    pub fn to_f32(&self, (kv_heads, head_dim): (usize, usize)) -> Result<(Vec<f32>, Vec<f32>)> {
        self.check_fresh()?;
        let flat = |t: &Option<Tensor>, n: usize| -> Result<Vec<f32>> {
            match t {
                Some(t) => t.to_dtype(DType::F32)?.flatten_all()?.to_vec1(),
                None => Ok(vec![0.0; n]),
            }
        };
        Ok((
            flat(&self.s, kv_heads * head_dim * head_dim)?,
            flat(&self.z, kv_heads * head_dim)?,
        ))
    }

    /// Takes S and z back from the lean path after it consumed `tokens` more.
    pub fn store_f32(
        &mut self,
        (s, z): (Vec<f32>, Vec<f32>),
        (kv_heads, head_dim): (usize, usize),
        tokens: usize,
        device: &Device,
    ) -> Result<()> {
        self.s = Some(Tensor::from_vec(
            s,
            (1, kv_heads, head_dim, head_dim),
            device,
        )?);
        self.z = Some(Tensor::from_vec(z, (1, kv_heads, head_dim), device)?);
        self.tokens += tokens as u32;
        Ok(())
    }

    pub fn deep_clone(&self) -> Result<Self> {
        let copy = |t: &Option<Tensor>| t.as_ref().map(Tensor::copy).transpose();
        Ok(Self {
            s: copy(&self.s)?,
            z: copy(&self.z)?,
            tokens: self.tokens,
            stale: self.stale,
        })
    }
}

/// φ: positive features.
fn features(u: &Tensor, head_dim: usize) -> Result<Tensor> {
    let scale = (head_dim as f64).powf(-0.25);
    u.affine(scale, 0.0)?.elu(1.0)? + 1.0
}

/// log sigmoid(a), stable for large |a|: min(a, 0) − log(1 + e^−|a|).
fn log_sigmoid(a: &Tensor) -> Result<Tensor> {
    let soft = (a.abs()?.neg()?.exp()? + 1.0)?.log()?;
    a.minimum(0.0)? - soft
}

/// `x` (b, t, in) times `w` (out, in) transposed.
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.broadcast_matmul(&w.t()?)
}

/// Per-head norms of q and k before the features, as the replaced
/// attention applies them (Gemma 3's frozen q/k norms); `norm(x, weight)`
/// is the model's RMSNorm over the last dimension.
pub struct HeadNorms<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub norm: &'a dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
}

/// The mixer over normed input `x` (b, t, hidden) → (b, t, hidden). With a
/// state, continues from it and leaves it after the last token; decode
/// steps (one token) take the recurrent form, longer inputs the chunked
/// parallel form.
pub fn forward(
    w: &MixerWeights,
    x: &Tensor,
    dims: Dims,
    norms: Option<&HeadNorms>,
    state: Option<&mut MixerState>,
) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let (nh, nkv, hd) = (dims.heads, dims.kv_heads, dims.head_dim);
    let heads = |y: Tensor, n: usize, norm: Option<&Tensor>| -> Result<Tensor> {
        let y = y.reshape((b, t, n, hd))?;
        let y = match (norms, norm) {
            (Some(n), Some(weight)) => (n.norm)(&y, weight)?,
            _ => y,
        };
        y.transpose(1, 2)?.contiguous()
    };
    let q = features(&heads(linear(x, &w.q)?, nh, norms.map(|n| n.q))?, hd)?;
    let k = features(&heads(linear(x, &w.k)?, nkv, norms.map(|n| n.k))?, hd)?;
    let v = heads(linear(x, &w.v)?, nkv, None)?;
    let a = linear(x, &w.gate)?.broadcast_add(&w.gate_bias)?;
    let log_a = log_sigmoid(&a.transpose(1, 2)?.contiguous()?)?;
    if let Some(st) = &state {
        st.check_fresh()?;
    }
    let (s0, z0) = match &state {
        Some(MixerState {
            s: Some(s),
            z: Some(z),
            ..
        }) => (s.clone(), z.clone()),
        _ => zero_state(b, nkv, hd, x.dtype(), x.device())?,
    };
    let (y, s, z) = if t == 1 {
        recurrent(&q, &k, &v, &log_a, &s0, &z0)?
    } else {
        chunked(&q, &k, &v, &log_a, &s0, &z0, CHUNK)?
    };
    if let Some(st) = state {
        st.s = Some(s);
        st.z = Some(z);
        st.tokens += t as u32;
    }
    let y = y.transpose(1, 2)?.reshape((b, t, nh * hd))?;
    linear(&y, &w.o)
}

/// A zero state for `b` sequences.
pub fn zero_state(
    b: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    Ok((
        Tensor::zeros((b, kv_heads, head_dim, head_dim), dtype, device)?,
        Tensor::zeros((b, kv_heads, head_dim), dtype, device)?,
    ))
}

/// The recurrence one token at a time. q (b, heads, t, d) and k, v (b, kv
/// heads, t, d) are features and values, `log_a` (b, kv heads, t) the log
/// decays, (s0, z0) the state before. Returns y (b, heads, t, d) and the
/// state after.
pub fn recurrent(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    log_a: &Tensor,
    s0: &Tensor,
    z0: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, nh, t, d) = q.dims4()?;
    let nkv = k.dim(1)?;
    let rep = nh / nkv;
    let (mut s, mut z) = (s0.clone(), z0.clone());
    let mut ys = Vec::with_capacity(t);
    for i in 0..t {
        let alpha = log_a.narrow(2, i, 1)?.exp()?; // (b, nkv, 1)
        let ki = k.narrow(2, i, 1)?; // (b, nkv, 1, d)
        let vi = v.narrow(2, i, 1)?;
        s = (s.broadcast_mul(&alpha.unsqueeze(3)?)? + ki.transpose(2, 3)?.matmul(&vi)?)?;
        z = (z.broadcast_mul(&alpha)? + ki.squeeze(2)?)?;
        let qi = q.narrow(2, i, 1)?.reshape((b, nkv, rep, d))?;
        let num = qi.matmul(&s)?;
        let den = qi.matmul(&z.unsqueeze(3)?)?;
        let y = num.broadcast_div(&(den + EPS)?)?;
        ys.push(y.reshape((b, nh, 1, d))?);
    }
    Ok((Tensor::cat(&ys, 2)?, s, z))
}

/// The parallel form over chunks of `chunk` tokens, the state carried.
pub fn chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    log_a: &Tensor,
    s0: &Tensor,
    z0: &Tensor,
    chunk: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let t = q.dim(2)?;
    let (mut s, mut z) = (s0.clone(), z0.clone());
    let mut ys = Vec::new();
    let mut at = 0;
    while at < t {
        let n = chunk.min(t - at);
        let (y, s1, z1) = parallel(
            &q.narrow(2, at, n)?,
            &k.narrow(2, at, n)?,
            &v.narrow(2, at, n)?,
            &log_a.narrow(2, at, n)?,
            &s,
            &z,
        )?;
        ys.push(y);
        (s, z) = (s1, z1);
        at += n;
    }
    let y = if ys.len() == 1 {
        ys.pop().expect("one chunk")
    } else {
        Tensor::cat(&ys, 2)?
    };
    Ok((y, s, z))
}

/// The parallel form over one chunk (same arguments as `recurrent`).
pub fn parallel(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    log_a: &Tensor,
    s0: &Tensor,
    z0: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, nh, t, d) = q.dims4()?;
    let nkv = k.dim(1)?;
    let rep = nh / nkv;
    let qg = q.contiguous()?.reshape((b, nkv, rep * t, d))?;
    let l = log_a.contiguous()?.cumsum(2)?; // L_t, (b, nkv, t)
                                            // exp(L_t − L_s) for s ≤ t, 0 above the diagonal.
    let diff = l.unsqueeze(3)?.broadcast_sub(&l.unsqueeze(2)?)?;
    let decay = diff
        .broadcast_add(&causal_mask(t, l.dtype(), l.device())?)?
        .exp()?;
    let scores = qg.matmul(&k.t()?.contiguous()?)?; // (b, nkv, rep·t, t)
    let w = scores
        .reshape((b, nkv, rep, t, t))?
        .broadcast_mul(&decay.unsqueeze(2)?)?
        .reshape((b, nkv, rep * t, t))?;
    let from_start = l
        .exp()?
        .unsqueeze(2)?
        .broadcast_as((b, nkv, rep, t))?
        .reshape((b, nkv, rep * t, 1))?;
    let num = (w.matmul(&v.contiguous()?)? + qg.matmul(s0)?.broadcast_mul(&from_start)?)?;
    let den =
        (w.sum_keepdim(D::Minus1)? + qg.matmul(&z0.unsqueeze(3)?)?.broadcast_mul(&from_start)?)?;
    let y = num.broadcast_div(&(den + EPS)?)?.reshape((b, nh, t, d))?;
    // The state after the chunk: each token's contribution decayed to its end.
    let last = l.narrow(2, t - 1, 1)?; // (b, nkv, 1)
    let to_end = last.broadcast_sub(&l)?.exp()?; // (b, nkv, t)
    let kw = k.broadcast_mul(&to_end.unsqueeze(3)?)?;
    let carry = last.exp()?;
    let s = (kw.t()?.contiguous()?.matmul(&v.contiguous()?)?
        + s0.broadcast_mul(&carry.unsqueeze(3)?)?)?;
    let z = (kw.sum(2)? + z0.broadcast_mul(&carry)?)?;
    Ok((y, s, z))
}

/// (t, t): 0 on and below the diagonal, −∞ above.
fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)
}
