//! Writes a pruned model as a Hugging Face folder in Nemotron-NAS form
//! (`DeciLMForCausalLM` with `block_configs`), which vLLM, SGLang,
//! TensorRT-LLM and MLX load: skipped blocks are `no_op` and have no
//! weights, the scales are folded into `o_proj` / `down_proj`, and q/k are
//! stored in the Hugging Face (rotate-halves) layout.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::json;

use super::fold::fold_transformer;
use crate::model::config::{ffn_mult_to_intermediate, RopeLayout};
use crate::model::Model;
use crate::plan::{BlockId, Plan};

/// Where the Nemotron-NAS modelling code comes from (NVIDIA's repository);
/// `trust_remote_code` loaders fetch it from there, so nothing is copied.
pub const REMOTE_CODE_REPO: &str = "nvidia/Llama-3_3-Nemotron-Super-49B-v1";

/// `ffn_mult` for a width, checked to round-trip through the loaders' rule.
pub fn ffn_mult_for(intermediate: usize, hidden: usize) -> Result<f64> {
    let mult = intermediate as f64 * 3.0 / (2.0 * hidden as f64);
    if ffn_mult_to_intermediate(mult, hidden) != intermediate {
        bail!(
            "the FFN width {intermediate} cannot be written as a Nemotron-NAS ffn_mult \
             (loaders compute int(2·mult·{hidden}/3) rounded up to 256, which gives {})",
            ffn_mult_to_intermediate(mult, hidden)
        );
    }
    Ok(mult)
}

/// The `config.json` for `plan` on `model`.
pub fn config_json(model: &Model, plan: &Plan) -> Result<serde_json::Value> {
    let cfg = model.cfg();
    super::check_architecture(cfg, &super::DECILM)?;
    if cfg.arch != crate::model::Arch::Llama && cfg.arch != crate::model::Arch::Mistral {
        bail!(
            "Nemotron-NAS is a Llama-layer format; `{}` models (attention biases) have no form in it",
            cfg.arch.name()
        );
    }
    if cfg.sliding_window.is_some() {
        bail!("Nemotron-NAS has no sliding-window attention; this model uses one");
    }
    if cfg.head_dim * cfg.n_heads != cfg.hidden_size {
        bail!(
            "Nemotron-NAS assumes head size = hidden / heads; this model has {} × {} ≠ {}",
            cfg.n_heads,
            cfg.head_dim,
            cfg.hidden_size
        );
    }
    let ffn_mult = ffn_mult_for(cfg.intermediate_size, cfg.hidden_size)?;
    let blocks: Vec<serde_json::Value> = (0..cfg.n_layers)
        .map(|i| {
            let attn_noop = plan.skips_attn(i);
            let ffn_noop = plan.skips_mlp(i);
            // llama.cpp's converter ignores `no_op` and reads the nulls.
            json!({
                "attention": {
                    "no_op": attn_noop,
                    "replace_with_linear": false,
                    "n_heads_in_group": if attn_noop { None } else { Some(cfg.gqa_group()) },
                    "sparsify": null,
                },
                "ffn": {
                    "no_op": ffn_noop,
                    "replace_with_linear": false,
                    "ffn_mult": if ffn_noop { None } else { Some(ffn_mult) },
                    "sparsify": null,
                },
            })
        })
        .collect();
    let rope_scaling = cfg.rope_scaling.map(|s| {
        json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        })
    });
    Ok(json!({
        "architectures": ["DeciLMForCausalLM"],
        "model_type": "nemotron-nas",
        "auto_map": {
            "AutoConfig": format!("{REMOTE_CODE_REPO}--configuration_decilm.DeciLMConfig"),
            "AutoModelForCausalLM": format!("{REMOTE_CODE_REPO}--modeling_decilm.DeciLMForCausalLM"),
        },
        "block_configs": blocks,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids.first(),
        "torch_dtype": "float32",
    }))
}

/// Undoes llama.cpp's q/k permutation (adjacent pairs -> rotate halves).
fn unpermute(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / n_heads;
    Ok(w.reshape((n_heads, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

/// The folded weights under Hugging Face names, f32, without no-op blocks.
pub fn folded_tensors(model: &Model, plan: &Plan) -> Result<HashMap<String, Tensor>> {
    let t = fold_transformer(&model.transformer, plan)?;
    let cfg = &t.cfg;
    let f32 = |x: &Tensor| -> Result<Tensor> { Ok(x.to_dtype(DType::F32)?.contiguous()?) };
    let mut out = HashMap::new();
    out.insert(
        "model.embed_tokens.weight".to_string(),
        f32(t.embed_weight()?.as_ref())?,
    );
    out.insert("model.norm.weight".to_string(), f32(&t.norm)?);
    if let Some(head) = &t.lm_head {
        out.insert(
            "lm_head.weight".to_string(),
            f32(head.dense_weight()?.as_ref())?,
        );
    }
    let interleaved = cfg.rope_layout == RopeLayout::Interleaved;
    for (i, layer) in t.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        if !plan.is_skipped(BlockId::attn(i)) {
            let (q, k) = if interleaved {
                (
                    unpermute(layer.attn.q.dense_weight()?.as_ref(), cfg.n_heads)?,
                    unpermute(layer.attn.k.dense_weight()?.as_ref(), cfg.n_kv_heads)?,
                )
            } else {
                (
                    layer.attn.q.dense_weight()?.into_owned(),
                    layer.attn.k.dense_weight()?.into_owned(),
                )
            };
            out.insert(
                format!("{p}.input_layernorm.weight"),
                f32(&layer.attn_norm)?,
            );
            out.insert(format!("{p}.self_attn.q_proj.weight"), f32(&q)?);
            out.insert(format!("{p}.self_attn.k_proj.weight"), f32(&k)?);
            out.insert(
                format!("{p}.self_attn.v_proj.weight"),
                f32(layer.attn.v.dense_weight()?.as_ref())?,
            );
            out.insert(
                format!("{p}.self_attn.o_proj.weight"),
                f32(layer.attn.o.dense_weight()?.as_ref())?,
            );
        }
        if !plan.is_skipped(BlockId::mlp(i)) {
            out.insert(
                format!("{p}.post_attention_layernorm.weight"),
                f32(&layer.mlp_norm)?,
            );
            out.insert(
                format!("{p}.mlp.gate_proj.weight"),
                f32(layer.mlp.gate.dense_weight()?.as_ref())?,
            );
            out.insert(
                format!("{p}.mlp.up_proj.weight"),
                f32(layer.mlp.up.dense_weight()?.as_ref())?,
            );
            out.insert(
                format!("{p}.mlp.down_proj.weight"),
                f32(layer.mlp.down.dense_weight()?.as_ref())?,
            );
        }
    }
    Ok(out)
}

/// Fills `dir` (empty) with config, weights, tokenizer and model card.
pub fn write_folder(model: &Model, plan: &Plan, card: &str, dir: &Path) -> Result<()> {
    if model.cfg().rope_freq_factors.is_some() {
        // transformers would rebuild the frequencies from `rope_scaling`,
        // which a GGUF with `rope_freqs.weight` does not carry: refuse
        // rather than write a folder that computes other positions.
        anyhow::bail!(
            "this model's RoPE frequencies come from the GGUF's `rope_freqs.weight`, which a \
             Nemotron-NAS folder cannot express; export --format gguf instead"
        );
    }
    let config = config_json(model, plan)?;
    let write_json = |name: &str, v: &serde_json::Value| -> Result<()> {
        let mut text = serde_json::to_string_pretty(v)?;
        text.push('\n');
        std::fs::write(dir.join(name), text).with_context(|| format!("writing {name}"))
    };
    write_json("config.json", &config)?;
    let cfg = model.cfg();
    write_json(
        "generation_config.json",
        &json!({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids.first()}),
    )?;
    let tensors = folded_tensors(model, plan)?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))
        .context("writing model.safetensors")?;
    if let Some(codec) = &model.codec {
        codec
            .tokenizer
            .save(dir.join("tokenizer.json"), false)
            .map_err(|e| anyhow!("writing tokenizer.json: {e}"))?;
        write_json(
            "tokenizer_config.json",
            &json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": codec.bos_token,
                "eos_token": codec.eos_token,
                "chat_template": codec.chat_template,
                "add_bos_token": cfg.add_bos,
            }),
        )?;
    }
    std::fs::write(dir.join("README.md"), card).context("writing README.md")?;
    Ok(())
}
