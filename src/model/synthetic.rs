//! Models of real shapes with random weights, generated on the device, for
//! speed measurements where the real weights are not at hand (an 8B model on
//! a GPU machine that cannot download it). Their outputs mean nothing.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use super::config::{Arch, Llama3RopeScaling, ModelConfig, RopeLayout};
use super::transformer::{Attention, Layer, Linear, Mlp, Transformer};
use super::Model;
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

/// Builds a random model of `shape` on `device` (bf16 on GPU, f32 on CPU).
pub fn build(shape: &str, device: &Device) -> Result<Model> {
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
    let lin = |rows, cols| -> Result<Linear> {
        Ok(Linear {
            weight: rand(rows, cols)?,
            bias: None,
            quantized: None,
        })
    };
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
    let embed = rand(cfg.vocab_size, h)?;
    let head = lin(cfg.vocab_size, h)?;
    let transformer = Transformer::new(cfg.clone(), embed, None, layers, ones()?, Some(head))?;
    Ok(Model {
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
        has_quantized: false,
        implied_plan: Plan::base(),
    })
}
