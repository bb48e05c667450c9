//! Models of real shapes with random weights, generated on the device, for
//! speed measurements where the real weights are not at hand (an 8B model on
//! a GPU machine that cannot download it). Their outputs mean nothing.
//!
//! A quantized-only build (`KeepWeights::QuantizedOnly`) writes random
//! Q4_K blocks (Q4_0 where a row is not a multiple of 256) straight into
//! each matrix, one at a time: no f32 copy of the model ever exists, so an
//! 8B shape builds in ~5 GB.

use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use super::config::{Arch, Llama3RopeScaling, ModelConfig, RopeLayout};
use super::transformer::{Attention, Layer, Linear, Mlp, Transformer};
use super::weights::KeepWeights;
use super::Model;
use crate::kernels::QWeight;
use crate::plan::{ModelIdentity, Plan};

pub const SHAPES: &[&str] = &["llama-8b", "llama-1b", "smollm2-135m"];

pub fn config(shape: &str) -> Result<ModelConfig> {
    // (hidden, intermediate, layers, heads, kv heads, vocab, theta, llama3 rope)
    let (h, i, l, nh, nkv, v, theta, llama3) = match shape {
        "llama-8b" => (4096, 14336, 32, 32, 8, 128_256, 500_000.0, true),
        "llama-1b" => (2048, 8192, 16, 32, 8, 128_256, 500_000.0, true),
        "smollm2-135m" => (576, 1536, 30, 9, 3, 49_152, 100_000.0, false),
        other => bail!(
            "unknown synthetic shape `{other}`; known: {}",
            SHAPES.join(", ")
        ),
    };
    Ok(ModelConfig {
        arch: Arch::Llama,
        vocab_size: v,
        hidden_size: h,
        intermediate_size: i,
        n_layers: l,
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: h / nh,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        rope_scaling: llama3.then_some(Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }),
        rope_freq_factors: None,
        rope_layout: RopeLayout::Halves,
        max_position_embeddings: 8192,
        sliding_window: None,
        tie_word_embeddings: false,
        attention_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        add_bos: true,
        gemma3: None,
    })
}

/// Refuses to build `shape` where its estimate exceeds the memory available.
pub fn check_memory(shape: &str, device: &Device, opts: &super::LoadOptions) -> Result<()> {
    let cfg = config(shape)?;
    let dtype = super::default_dtype(device);
    super::check_memory(&format!("synthetic {shape}"), device, opts, |o| {
        super::memory::estimate_synthetic(&cfg, quant_type, device, dtype, o)
    })
}

/// Builds a random model of `shape` on `device` (bf16 on GPU, f32 on CPU).
pub fn build(shape: &str, device: &Device) -> Result<Model> {
    build_with(shape, device, KeepWeights::Both)
}

/// As `build`; `QuantizedOnly` gives random Q4 matrices and no dense copies.
pub fn build_with(shape: &str, device: &Device, keep: KeepWeights) -> Result<Model> {
    if keep == KeepWeights::QuantizedOnly {
        return build_quantized(shape, device);
    }
    let cfg = config(shape)?;
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let rand = |rows: usize, cols: usize| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 0.02, (rows, cols), device)?.to_dtype(dtype)?)
    };
    let ones = || Tensor::ones(cfg.hidden_size, dtype, device);
    let lin = |rows, cols| -> Result<Linear> { Ok(Linear::dense(rand(rows, cols)?, None)) };
    let embed = rand(cfg.vocab_size, cfg.hidden_size)?;
    let transformer = assemble(&cfg, lin, ones, |layers, norm, head| {
        Transformer::new(cfg.clone(), embed, None, layers, norm, head)
    })?;
    Ok(finish(shape, &cfg, transformer, false))
}

/// The matrix type of a random quantized matrix with rows of `cols`.
pub fn quant_type(cols: usize) -> GgmlDType {
    if cols.is_multiple_of(GgmlDType::Q4K.block_size()) {
        GgmlDType::Q4K
    } else {
        GgmlDType::Q4_0
    }
}

fn build_quantized(shape: &str, device: &Device) -> Result<Model> {
    let cfg = config(shape)?;
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut qmatrix = |rows: usize, cols: usize| -> Result<Arc<QTensor>> {
        let ty = quant_type(cols);
        let bytes = random_blocks(ty, rows * cols / ty.block_size(), &mut rng);
        Ok(Arc::new(qtensor_from_ggml(
            ty,
            &bytes,
            vec![rows, cols],
            device,
        )?))
    };
    // The lean CPU path's kernels read the same blocks (zero copy).
    let kernel = |q: &Arc<QTensor>| -> Result<Option<Arc<QWeight>>> {
        Ok(QWeight::from_qtensor(q.clone())?.map(Arc::new))
    };
    let embed = qmatrix(cfg.vocab_size, cfg.hidden_size)?;
    let embed_kernel = kernel(&embed)?;
    let ones = || Tensor::ones(cfg.hidden_size, dtype, device);
    let lin = |rows, cols| -> Result<Linear> {
        let q = qmatrix(rows, cols)?;
        Ok(Linear {
            weight: None,
            bias: None,
            kernel: kernel(&q)?,
            lora: None,
            quantized: Some(QMatMul::from_arc(q)?),
        })
    };
    let embed_q = QMatMul::from_arc(embed)?;
    let mut transformer = assemble(&cfg, lin, ones, |layers, norm, head| {
        Transformer::with_embeddings(cfg.clone(), None, Some(embed_q), layers, norm, head)
    })?;
    if cfg.tie_word_embeddings {
        transformer.embed_kernel = embed_kernel;
    }
    Ok(finish(shape, &cfg, transformer, true))
}

/// `n` random blocks of type `ty`: random quants, scales that keep values
/// near the 0.02 spread of the dense build.
fn random_blocks(ty: GgmlDType, n: usize, rng: &mut XorShift) -> Vec<u8> {
    let size = ty.type_size();
    let mut bytes = vec![0u8; n * size];
    for chunk in bytes.chunks_mut(8) {
        let r = rng.next().to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    // Q4_0: d, then nibbles (q - 8)·d. Q4_K: d, dmin, 12 bytes of 6-bit
    // scales and mins, then nibbles d·sc·q − dmin·m.
    let (d, dmin) = match ty {
        GgmlDType::Q4K => (
            half::f16::from_f32(0.0002),
            Some(half::f16::from_f32(0.0015)),
        ),
        _ => (half::f16::from_f32(0.0045), None),
    };
    for block in bytes.chunks_mut(size) {
        block[0..2].copy_from_slice(&d.to_le_bytes());
        if let Some(m) = dmin {
            block[2..4].copy_from_slice(&m.to_le_bytes());
        }
    }
    bytes
}

/// A small, fast generator: the synthetic weights need speed, not quality.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// The layers of `cfg` from `lin(rows, cols)` and `ones()`, then `make`
/// builds the transformer from the layers, the final norm and the head.
fn assemble(
    cfg: &ModelConfig,
    mut lin: impl FnMut(usize, usize) -> Result<Linear>,
    ones: impl Fn() -> candle_core::Result<Tensor>,
    make: impl FnOnce(Vec<Layer>, Tensor, Option<Linear>) -> candle_core::Result<Transformer>,
) -> Result<Transformer> {
    let (h, q, kv) = (
        cfg.hidden_size,
        cfg.n_heads * cfg.head_dim,
        cfg.n_kv_heads * cfg.head_dim,
    );
    let mut layers = Vec::new();
    for _ in 0..cfg.n_layers {
        layers.push(Layer {
            attn_norm: ones()?,
            attn: Attention {
                q: lin(q, h)?,
                k: lin(kv, h)?,
                v: lin(kv, h)?,
                o: lin(h, q)?,
            },
            mlp_norm: ones()?,
            mlp: Mlp {
                gate: lin(cfg.intermediate_size, h)?,
                up: lin(cfg.intermediate_size, h)?,
                down: lin(h, cfg.intermediate_size)?,
            },
            gemma: None,
        });
    }
    let head = lin(cfg.vocab_size, h)?;
    Ok(make(layers, ones()?, Some(head))?)
}

fn finish(shape: &str, cfg: &ModelConfig, transformer: Transformer, quantized: bool) -> Model {
    Model {
        transformer,
        codec: None,
        identity: ModelIdentity {
            name: format!("synthetic-{shape}"),
            architecture: "llama".into(),
            n_layers: cfg.n_layers,
            shape: Some(cfg.shape_signature()),
            content_hash: format!("synthetic-{shape}"),
        },
        origin: format!("synthetic {shape} (random weights)"),
        has_quantized: quantized,
        implied_plan: Plan::base(),
    }
}
