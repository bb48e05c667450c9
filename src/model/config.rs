//! Typed hyper-parameters, read from a Hugging Face `config.json` or from
//! GGUF metadata. Only architectures whose forward pass we implement are
//! accepted; anything else is refused by name.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::plan::{BlockId, ShapeSignature};

/// The Llama-family variants the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Mistral,
    /// Gemma 3 text models: sandwich norms, q/k norms, GELU, local and
    /// global layers (see [`Gemma3Params`]).
    Gemma3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Mistral => "mistral",
            Arch::Gemma3 => "gemma3",
        }
    }

    fn from_name(name: &str) -> Result<Self> {
        Ok(match name.to_ascii_lowercase().as_str() {
            // Nemotron-NAS / llama.cpp `deci`: Llama layers, some of them no-ops.
            "llama" | "llamaforcausallm" | "smollm" | "deci" | "decilmforcausallm"
            | "nemotron-nas" => Arch::Llama,
            "qwen2" | "qwen2forcausallm" => Arch::Qwen2,
            "mistral" | "mistralforcausallm" => Arch::Mistral,
            "gemma3" | "gemma3_text" | "gemma3forcausallm" => Arch::Gemma3,
            "gemma3forconditionalgeneration" => bail!(
                "`Gemma3ForConditionalGeneration` is the multimodal Gemma 3 checkpoint; scalpel \
                 runs the text-only one (`Gemma3ForCausalLM`, model_type `gemma3_text`) or a \
                 Gemma 3 GGUF"
            ),
            "gemma"
            | "gemmaforcausallm"
            | "gemma2"
            | "gemma2forcausallm"
            | "gemma3n"
            | "gemma3nforcausallm"
            | "gemma3nforconditionalgeneration"
            | "gemma3n_text" => bail!(
                "unsupported architecture `{}`: of the Gemma family scalpel runs Gemma 3 \
                 (text) only; Gemma 1/2 and Gemma 3n differ in their layers (soft-capping, \
                 per-layer embeddings)",
                name.to_ascii_lowercase()
            ),
            other => bail!(
                "unsupported architecture `{other}`: scalpel runs llama, qwen2 and mistral \
                 (Llama-family) and gemma3 models"
            ),
        })
    }
}

/// Llama-3.1 style frequency-dependent RoPE scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// How rotary embeddings pair up dimensions. HF checkpoints rotate the two
/// halves of each head; llama.cpp's converter permutes q/k so that GGUF
/// files rotate adjacent pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    Halves,
    Interleaved,
}

/// What Gemma 3 adds to the Llama-family hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma3Params {
    /// Per layer: whether it attends globally (every key, RoPE base
    /// `rope_theta`) rather than locally (the sliding window, RoPE base
    /// `rope_local_theta`).
    pub global_layers: Vec<bool>,
    pub rope_local_theta: f64,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2`.
    pub query_pre_attn_scalar: f64,
}

impl Gemma3Params {
    /// Transformers' and llama.cpp's default: every `pattern`-th layer is global.
    pub fn with_pattern(n_layers: usize, pattern: usize, rope_local_theta: f64, qpas: f64) -> Self {
        Self {
            global_layers: (0..n_layers)
                .map(|i| pattern > 0 && (i + 1) % pattern == 0)
                .collect(),
            rope_local_theta,
            query_pre_attn_scalar: qpas,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// llama.cpp's `rope_freqs.weight` (how Llama-3.1 GGUFs carry their RoPE
    /// scaling): each base frequency is divided by its factor. Wins over
    /// `rope_scaling`.
    pub rope_freq_factors: Option<Vec<f32>>,
    pub rope_layout: RopeLayout,
    pub max_position_embeddings: usize,
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Whether text should start with BOS (GGUF `add_bos_token`; HF: llama yes).
    pub add_bos: bool,
    /// Gemma 3's layer kinds and scalars; `None` for the Llama family.
    pub gemma3: Option<Gemma3Params>,
}

impl ModelConfig {
    /// A Llama-family layer stack (no Gemma sandwich norms, q/k norms or
    /// per-layer RoPE bases): what specialised paths may assume.
    pub fn is_plain_llama(&self) -> bool {
        self.gemma3.is_none()
    }

    /// The sliding window of `layer`'s attention: Gemma 3's global layers
    /// have none, every other layer has the model's.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        match &self.gemma3 {
            Some(g) if g.global_layers.get(layer).copied().unwrap_or(false) => None,
            _ => self.sliding_window,
        }
    }

    /// Gemma 3 scores attention by 1/√query_pre_attn_scalar instead of
    /// 1/√head_dim: the factor the queries are multiplied by (attention code
    /// divides by √head_dim), or `None` where the two agree.
    pub fn query_scale(&self) -> Option<f64> {
        let hd = self.head_dim as f64;
        self.gemma3
            .as_ref()
            .filter(|g| g.query_pre_attn_scalar != hd)
            .map(|g| (hd / g.query_pre_attn_scalar).sqrt())
    }

    /// Gemma 3 scales its embeddings by √hidden.
    pub fn embed_scale(&self) -> Option<f64> {
        self.gemma3
            .as_ref()
            .map(|_| f64::from((self.hidden_size as f32).sqrt()))
    }

    /// The RoPE inverse frequencies of Gemma 3's local layers (base
    /// `rope_local_theta`, no scaling); `None` for other models.
    pub fn rope_local_inv_freq(&self) -> Option<Vec<f32>> {
        let g = self.gemma3.as_ref()?;
        let d = self.head_dim;
        Some(
            (0..d / 2)
                .map(|i| (1.0 / g.rope_local_theta.powf(2.0 * i as f64 / d as f64)) as f32)
                .collect(),
        )
    }

    /// The RoPE inverse frequencies, with the file's frequency factors or
    /// Llama-3.1 scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let base = 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64);
                if let Some(factors) = &self.rope_freq_factors {
                    return (base / f64::from(factors[i])) as f32;
                }
                let Some(s) = self.rope_scaling else {
                    return base as f32;
                };
                let old = s.original_max_position_embeddings as f64;
                let low_wavelen = old / s.low_freq_factor;
                let high_wavelen = old / s.high_freq_factor;
                let wavelen = 2.0 * std::f64::consts::PI / base;
                let f = if wavelen < high_wavelen {
                    base
                } else if wavelen > low_wavelen {
                    base / s.factor
                } else {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * base / s.factor + smooth * base
                };
                f as f32
            })
            .collect()
    }

    /// Sets llama.cpp-style RoPE frequency factors (one per rotated pair).
    pub fn set_rope_freq_factors(&mut self, factors: Vec<f32>) -> Result<()> {
        if factors.len() != self.head_dim / 2 {
            bail!(
                "`rope_freqs.weight` has {} values; a head dimension of {} needs {}",
                factors.len(),
                self.head_dim,
                self.head_dim / 2
            );
        }
        if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
            bail!("`rope_freqs.weight` holds {bad}; RoPE frequency factors must be positive");
        }
        self.rope_freq_factors = Some(factors);
        Ok(())
    }

    /// The shapes a plan depends on (see [`ShapeSignature`]).
    pub fn shape_signature(&self) -> ShapeSignature {
        ShapeSignature {
            hidden_size: self.hidden_size,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            intermediate_size: self.intermediate_size,
            vocab_size: self.vocab_size,
        }
    }

    pub fn gqa_group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Parameter counts of one attention and one MLP block (for FLOP shares).
    pub fn block_params(&self) -> (usize, usize) {
        let h = self.hidden_size;
        let q = self.n_heads * self.head_dim;
        let kv = self.n_kv_heads * self.head_dim;
        let attn = h * q + 2 * h * kv + q * h;
        let mlp = 3 * h * self.intermediate_size;
        (attn, mlp)
    }

    fn check(&self) -> Result<()> {
        self.check_sizes()?;
        if self.n_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            bail!("model config has zero layers, hidden size or vocabulary");
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            bail!(
                "model config has {} attention heads and {} KV heads; heads must be a multiple",
                self.n_heads,
                self.n_kv_heads
            );
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            bail!(
                "head dimension {} is zero or odd; RoPE needs an even one",
                self.head_dim
            );
        }
        Ok(())
    }

    /// Refuses sizes no real model has: the engine allocates from them
    /// (rotary tables, zero blocks for no-op layers) before any weight
    /// could contradict them, and their products must not overflow.
    fn check_sizes(&self) -> Result<()> {
        let fits = |what: &str, v: Option<usize>, max: usize| -> Result<usize> {
            match v {
                Some(v) if v <= max => Ok(v),
                _ => bail!(
                    "model config: {what} is {}, more than scalpel supports ({max}); \
                     the config is corrupt",
                    v.map_or("beyond any integer".into(), |v| v.to_string())
                ),
            }
        };
        const MAX_WIDTH: usize = 1 << 20;
        fits("the hidden size", Some(self.hidden_size), MAX_WIDTH)?;
        fits("the FFN width", Some(self.intermediate_size), MAX_WIDTH)?;
        fits("the vocabulary", Some(self.vocab_size), 1 << 24)?;
        fits("the layer count", Some(self.n_layers), 1 << 12)?;
        fits("the head dimension", Some(self.head_dim), 1 << 12)?;
        fits("the attention head count", Some(self.n_heads), 1 << 16)?;
        let q = self.n_heads.checked_mul(self.head_dim);
        fits("heads × head dimension", q, MAX_WIDTH)?;
        fits(
            "KV heads × head dimension",
            self.n_kv_heads.checked_mul(self.head_dim),
            MAX_WIDTH,
        )?;
        // Rotary tables hold context × head_dim / 2 entries: Qwen2.5-1M's
        // 1,010,000 positions of 128 fit; 2^26 entries are 512 MB of cos and sin.
        let rope = self.max_position_embeddings.checked_mul(self.head_dim / 2);
        fits(
            "the rotary table (context length × head dimension / 2)",
            rope,
            1 << 26,
        )?;
        Ok(())
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(text).context("config.json is not valid JSON")?;
        let arch_name = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or(raw.model_type.clone())
            .context("config.json names no architecture (`architectures` / `model_type`)")?;
        let arch = Arch::from_name(&arch_name)?;
        let deci = raw.block_configs.as_deref().map(deci_shape).transpose()?;
        let n_heads = raw.num_attention_heads;
        let head_dim = raw.head_dim.unwrap_or(if arch == Arch::Gemma3 {
            256
        } else {
            raw.hidden_size / n_heads.max(1)
        });
        let gemma3 = if arch == Arch::Gemma3 {
            Some(gemma3_from_hf(text, raw.num_hidden_layers)?)
        } else {
            None
        };
        let rope_block = match &gemma3 {
            // Gemma's `rope_parameters` is keyed by layer kind: read above.
            Some(g) => g.rope_scaling.as_ref(),
            None => raw.rope_scaling.as_ref().or(raw.rope_parameters.as_ref()),
        };
        let rope_scaling = match rope_block {
            Some(r) if r.rope_type.as_deref() == Some("llama3") => Some(Llama3RopeScaling {
                factor: r.factor.context("llama3 rope scaling without `factor`")?,
                low_freq_factor: r.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: r.high_freq_factor.unwrap_or(4.0),
                original_max_position_embeddings: r
                    .original_max_position_embeddings
                    .context("llama3 rope scaling without `original_max_position_embeddings`")?,
            }),
            Some(r) if !matches!(r.rope_type.as_deref(), None | Some("default")) => bail!(
                "RoPE scaling type `{}` is not supported (default and llama3 are)",
                r.rope_type.as_deref().unwrap_or("?")
            ),
            _ => None,
        };
        let rope_theta = match &gemma3 {
            Some(g) => g.rope_theta,
            None => raw
                .rope_theta
                .or(raw.rope_parameters.as_ref().and_then(|r| r.rope_theta))
                .unwrap_or(10_000.0),
        };
        let eos_token_ids = match raw.eos_token_id {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            _ => vec![],
        };
        let sliding_window = if raw.use_sliding_window == Some(false) && arch == Arch::Qwen2 {
            None
        } else {
            raw.sliding_window
        };
        let cfg = Self {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: match deci {
                Some(d) => ffn_mult_to_intermediate(d.ffn_mult, raw.hidden_size),
                None => raw
                    .intermediate_size
                    .context("config.json lacks `intermediate_size`")?,
            },
            n_layers: raw.num_hidden_layers,
            n_heads,
            n_kv_heads: match deci {
                Some(d) => n_heads / d.n_heads_in_group.max(1),
                None => raw.num_key_value_heads.unwrap_or(n_heads),
            },
            head_dim,
            rms_norm_eps: raw
                .rms_norm_eps
                .unwrap_or(if gemma3.is_some() { 1e-6 } else { 1e-5 }),
            rope_theta,
            rope_scaling,
            rope_freq_factors: None,
            rope_layout: RopeLayout::Halves,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            sliding_window,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(gemma3.is_some()),
            attention_bias: arch == Arch::Qwen2 || raw.attention_bias.unwrap_or(false),
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
            add_bos: arch != Arch::Qwen2,
            gemma3: gemma3.map(|g| g.params),
        };
        if arch == Arch::Gemma3 {
            let act = raw
                .hidden_activation
                .as_deref()
                .or(raw.hidden_act.as_deref());
            if act.is_some_and(|a| !matches!(a, "gelu_pytorch_tanh" | "gelu_tanh")) {
                bail!(
                    "Gemma 3 activation `{}` is not supported (gelu_pytorch_tanh is)",
                    act.unwrap_or_default()
                );
            }
        } else if raw.hidden_act.as_deref().is_some_and(|a| a != "silu") {
            bail!(
                "activation `{}` is not supported (silu is)",
                raw.hidden_act.unwrap_or_default()
            );
        }
        cfg.check()?;
        Ok(cfg)
    }

    /// Reads GGUF metadata (`general.architecture` and its prefixed keys).
    /// For a `deci` file, see also [`deci_noop_blocks_gguf`].
    pub fn from_gguf(ct: &candle_core::quantized::gguf_file::Content) -> Result<Self> {
        let md = &ct.metadata;
        let arch_name = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .context("GGUF file has no `general.architecture`")?
            .clone();
        let arch = Arch::from_name(&arch_name)?;
        let get = |key: &str| md.get(&format!("{arch_name}.{key}"));
        // `deci` files give head counts and FFN widths per layer: the engine
        // runs the widest layer's shape, and narrower layers are no-ops.
        let get_u = |key: &str| -> Result<usize> {
            let v = get(key).with_context(|| format!("GGUF metadata lacks `{arch_name}.{key}`"))?;
            match v.to_vec() {
                Ok(items) => Ok(items.iter().filter_map(gguf_uint).max().unwrap_or(0)),
                Err(_) => gguf_uint(v).with_context(|| {
                    format!("GGUF metadata `{arch_name}.{key}` is not an integer")
                }),
            }
        };
        let get_f = |key: &str| -> Option<f64> {
            get(key).and_then(|v| v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok())
        };
        let hidden_size = get_u("embedding_length")?;
        let n_heads = get_u("attention.head_count")?;
        let gemma = arch == Arch::Gemma3;
        // Gemma's heads are wider than hidden / heads; its files say so in
        // `attention.key_length` (and carry no rope.dimension_count).
        let head_dim = if gemma {
            get_u("attention.key_length")?
        } else {
            get_u("rope.dimension_count").unwrap_or(hidden_size / n_heads.max(1))
        };
        let n_layers = get_u("block_count")?;
        let tokens = md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok());
        let vocab_size = get_u("vocab_size")
            .ok()
            .or(tokens.map(|t| t.len()))
            .context("GGUF metadata gives no vocabulary size")?;
        let tok_u32 = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
        let tok_bool = |key: &str| md.get(key).and_then(|v| v.to_bool().ok());
        let has_output = ct.tensor_infos.contains_key("output.weight");
        let cfg = Self {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: get_u("feed_forward_length")?,
            n_layers,
            n_heads,
            n_kv_heads: get_u("attention.head_count_kv").unwrap_or(n_heads),
            head_dim,
            rms_norm_eps: get_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: get_f("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling: None,
            // Set from the `rope_freqs.weight` tensor, where the file has one.
            rope_freq_factors: None,
            // llama.cpp's converter permutes llama/mistral q/k into adjacent
            // pairs; qwen2 and gemma3 keep the HF halves layout (NEOX rope).
            rope_layout: if matches!(arch, Arch::Qwen2 | Arch::Gemma3) {
                RopeLayout::Halves
            } else {
                RopeLayout::Interleaved
            },
            max_position_embeddings: get_u("context_length").unwrap_or(4096),
            sliding_window: if gemma {
                Some(get_u("attention.sliding_window")?)
            } else {
                None
            },
            tie_word_embeddings: !has_output,
            attention_bias: ct.tensor_infos.contains_key("blk.0.attn_q.bias"),
            bos_token_id: tok_u32("tokenizer.ggml.bos_token_id"),
            eos_token_ids: tok_u32("tokenizer.ggml.eos_token_id").into_iter().collect(),
            add_bos: tok_bool("tokenizer.ggml.add_bos_token").unwrap_or(arch != Arch::Qwen2),
            gemma3: gemma.then(|| {
                gemma3_from_gguf(n_layers, hidden_size, n_heads, head_dim, |k| get_u(k).ok())
            }),
        };
        cfg.check()?;
        Ok(cfg)
    }
}

#[derive(Deserialize)]
struct HfRope {
    rope_type: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

#[derive(Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: Option<usize>,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<HfRope>,
    rope_parameters: Option<HfRope>,
    max_position_embeddings: Option<usize>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<serde_json::Value>,
    block_configs: Option<Vec<DeciBlock>>,
}

/// Gemma 3's layer kinds and scalars for a GGUF file. llama.cpp's files
/// carry neither the layer pattern nor the local RoPE base: like llama.cpp,
/// every 6th layer is global, local layers rotate with base 10,000, and the
/// attention scale is 1/√head_dim (1/√(hidden / heads) for the 62-layer 27B).
fn gemma3_from_gguf(
    n_layers: usize,
    hidden: usize,
    n_heads: usize,
    head_dim: usize,
    get_u: impl Fn(&str) -> Option<usize>,
) -> Gemma3Params {
    let pattern = get_u("attention.sliding_window_pattern").unwrap_or(6);
    let qpas = if n_layers == 62 {
        hidden / n_heads.max(1)
    } else {
        head_dim
    };
    Gemma3Params::with_pattern(n_layers, pattern, 10_000.0, qpas as f64)
}

/// Gemma 3's own `config.json` keys, in their older (`sliding_window_pattern`,
/// `rope_local_base_freq`) and newer (`layer_types`, `rope_parameters`
/// keyed by layer kind) forms.
#[derive(Deserialize)]
struct HfGemma3 {
    query_pre_attn_scalar: Option<f64>,
    sliding_window_pattern: Option<usize>,
    layer_types: Option<Vec<String>>,
    rope_theta: Option<f64>,
    rope_local_base_freq: Option<f64>,
    rope_scaling: Option<HfRope>,
    rope_parameters: Option<serde_json::Value>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    head_dim: Option<usize>,
}

struct Gemma3Hf {
    params: Gemma3Params,
    rope_theta: f64,
    rope_scaling: Option<HfRope>,
}

fn gemma3_from_hf(text: &str, n_layers: usize) -> Result<Gemma3Hf> {
    let raw: HfGemma3 = serde_json::from_str(text).context("config.json is not valid JSON")?;
    if raw.final_logit_softcapping.is_some() || raw.attn_logit_softcapping.is_some() {
        bail!("this Gemma config soft-caps logits (a Gemma 2 feature); Gemma 3 does not and scalpel does not implement it");
    }
    let per_kind = |kind: &str| -> Option<HfRope> {
        let v = raw.rope_parameters.as_ref()?.get(kind)?;
        serde_json::from_value(v.clone()).ok()
    };
    let (global, local) = (per_kind("full_attention"), per_kind("sliding_attention"));
    let rope_theta = global
        .as_ref()
        .and_then(|r| r.rope_theta)
        .or(raw.rope_theta)
        .unwrap_or(1_000_000.0);
    let rope_local_theta = local
        .as_ref()
        .and_then(|r| r.rope_theta)
        .or(raw.rope_local_base_freq)
        .unwrap_or(10_000.0);
    let qpas = raw
        .query_pre_attn_scalar
        .unwrap_or(raw.head_dim.unwrap_or(256) as f64);
    let params = match &raw.layer_types {
        Some(types) => {
            if types.len() != n_layers {
                bail!(
                    "config.json lists {} `layer_types` for {n_layers} layers",
                    types.len()
                );
            }
            let global_layers = types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(true),
                    "sliding_attention" => Ok(false),
                    other => bail!("unknown Gemma 3 layer type `{other}` in `layer_types`"),
                })
                .collect::<Result<Vec<_>>>()?;
            Gemma3Params {
                global_layers,
                rope_local_theta,
                query_pre_attn_scalar: qpas,
            }
        }
        None => Gemma3Params::with_pattern(
            n_layers,
            raw.sliding_window_pattern.unwrap_or(6),
            rope_local_theta,
            qpas,
        ),
    };
    if local
        .as_ref()
        .is_some_and(|r| !matches!(r.rope_type.as_deref(), None | Some("default")))
    {
        bail!("RoPE scaling on Gemma 3's local layers is not supported");
    }
    Ok(Gemma3Hf {
        params,
        rope_theta,
        rope_scaling: global.or(raw.rope_scaling),
    })
}

/// One entry of a Nemotron-NAS `block_configs` list.
#[derive(Deserialize, Debug, Clone)]
pub struct DeciBlock {
    pub attention: DeciAttention,
    pub ffn: DeciFfn,
}

#[derive(Deserialize, Debug, Clone)]
pub struct DeciAttention {
    #[serde(default)]
    pub no_op: bool,
    #[serde(default)]
    pub replace_with_linear: bool,
    pub n_heads_in_group: Option<usize>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct DeciFfn {
    #[serde(default)]
    pub no_op: bool,
    #[serde(default)]
    pub replace_with_linear: bool,
    pub ffn_mult: Option<f64>,
}

/// The one attention grouping and FFN width shared by a Nemotron-NAS
/// model's real blocks (the engine runs uniform layers plus no-ops).
#[derive(Debug, Clone, Copy)]
struct DeciShape {
    n_heads_in_group: usize,
    ffn_mult: f64,
}

fn deci_shape(blocks: &[DeciBlock]) -> Result<DeciShape> {
    if blocks
        .iter()
        .any(|b| b.attention.replace_with_linear || b.ffn.replace_with_linear)
    {
        bail!("this Nemotron-NAS model replaces blocks with linear layers; scalpel runs only no-op and full blocks");
    }
    let mut groups: Vec<usize> = blocks
        .iter()
        .filter(|b| !b.attention.no_op)
        .filter_map(|b| b.attention.n_heads_in_group)
        .collect();
    groups.dedup();
    let mut mults: Vec<f64> = blocks
        .iter()
        .filter(|b| !b.ffn.no_op)
        .filter_map(|b| b.ffn.ffn_mult)
        .collect();
    mults.dedup();
    if groups.len() > 1 || mults.len() > 1 {
        bail!(
            "this Nemotron-NAS model has layers of different widths (n_heads_in_group {groups:?},              ffn_mult {mults:?}); scalpel runs models whose real blocks share one shape"
        );
    }
    Ok(DeciShape {
        n_heads_in_group: groups.first().copied().unwrap_or(1),
        ffn_mult: mults.first().copied().unwrap_or(0.0),
    })
}

/// vLLM's and NVIDIA's rule: `int(2·mult·hidden/3)` rounded up to 256.
pub fn ffn_mult_to_intermediate(ffn_mult: f64, hidden: usize) -> usize {
    let raw = (2.0 * ffn_mult * hidden as f64 / 3.0) as usize;
    // Saturates for a corrupt ffn_mult; `check_sizes` then refuses it.
    raw.div_ceil(256).saturating_mul(256)
}

/// The blocks a Nemotron-NAS `config.json` marks as no-ops (empty for
/// other architectures).
pub fn deci_noop_blocks_hf(text: &str) -> Result<BTreeSet<BlockId>> {
    let raw: HfConfig = serde_json::from_str(text).context("config.json is not valid JSON")?;
    let mut out = BTreeSet::new();
    for (i, b) in raw.block_configs.iter().flatten().enumerate() {
        if b.attention.no_op {
            out.insert(BlockId::attn(i));
        }
        if b.ffn.no_op {
            out.insert(BlockId::mlp(i));
        }
    }
    Ok(out)
}

/// The blocks a llama.cpp `deci` GGUF leaves out: zero attention heads or
/// a zero FFN width (empty for other architectures). MLPs written as tiny
/// all-zero FFNs are found from their weights at load.
pub fn deci_noop_blocks_gguf(
    ct: &candle_core::quantized::gguf_file::Content,
) -> Result<BTreeSet<BlockId>> {
    let mut out = BTreeSet::new();
    let arch = ct
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok());
    if arch.map(String::as_str) != Some("deci") {
        return Ok(out);
    }
    let per_layer = |key: &str| -> Vec<usize> {
        ct.metadata
            .get(&format!("deci.{key}"))
            .and_then(|v| v.to_vec().ok())
            .map(|items| items.iter().map(|v| gguf_uint(v).unwrap_or(0)).collect())
            .unwrap_or_default()
    };
    for (i, heads) in per_layer("attention.head_count").into_iter().enumerate() {
        if heads == 0 {
            out.insert(BlockId::attn(i));
        }
    }
    for (i, ff) in per_layer("feed_forward_length").into_iter().enumerate() {
        if ff == 0 {
            out.insert(BlockId::mlp(i));
        }
    }
    Ok(out)
}

/// Layers whose FFN a llama.cpp `deci` GGUF declares narrower than
/// `intermediate_size` (but not zero): layer -> declared width. Their
/// weights are zero-padded at load, which computes exactly the same.
pub fn deci_narrow_ffn_gguf(
    ct: &candle_core::quantized::gguf_file::Content,
    intermediate_size: usize,
) -> BTreeMap<usize, usize> {
    let is_deci = ct
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .is_some_and(|a| a == "deci");
    let widths = ct
        .metadata
        .get("deci.feed_forward_length")
        .and_then(|v| v.to_vec().ok());
    match widths {
        Some(items) if is_deci => items
            .iter()
            .enumerate()
            .filter_map(|(i, v)| Some((i, gguf_uint(v)?)))
            .filter(|&(_, w)| w > 0 && w < intermediate_size)
            .collect(),
        _ => BTreeMap::new(),
    }
}

fn gguf_uint(v: &candle_core::quantized::gguf_file::Value) -> Option<usize> {
    use candle_core::quantized::gguf_file::Value as V;
    Some(match v {
        V::U8(x) => *x as usize,
        V::U16(x) => *x as usize,
        V::U32(x) => *x as usize,
        V::U64(x) => *x as usize,
        V::I8(x) => usize::try_from(*x).ok()?,
        V::I16(x) => usize::try_from(*x).ok()?,
        V::I32(x) => usize::try_from(*x).ok()?,
        V::I64(x) => usize::try_from(*x).ok()?,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_no_model_has_are_refused_by_name() {
        let config = |set: &[(&str, u64)]| {
            let mut v = serde_json::json!({"architectures": ["LlamaForCausalLM"],
                "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 2, "num_attention_heads": 2});
            for (key, value) in set {
                v[*key] = (*value).into();
            }
            v.to_string()
        };
        ModelConfig::from_hf_json(&config(&[("head_dim", 4)])).unwrap();
        for (set, named) in [
            // heads × head_dim overflowed usize in the weight shapes (a panic).
            (
                &[("head_dim", 1 << 40), ("num_attention_heads", 1 << 30)][..],
                "head dimension",
            ),
            (&[("num_attention_heads", 1 << 42)], "attention head count"),
            (
                &[("num_attention_heads", 1 << 12), ("head_dim", 1 << 12)],
                "heads × head",
            ),
            (&[("num_attention_heads", 16)], "head dimension 0"),
            (&[("max_position_embeddings", 1 << 40)], "rotary table"),
            (&[("num_hidden_layers", 1_000_000)], "layer count"),
        ] {
            let err = ModelConfig::from_hf_json(&config(set))
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{set:?}: {err}");
        }
        // A corrupt Nemotron-NAS ffn_mult overflowed the width rounding (a panic).
        let deci = r#"{"architectures":["DeciLMForCausalLM"],"vocab_size":10,"hidden_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"block_configs":[{"attention":
            {"n_heads_in_group":1},"ffn":{"ffn_mult":1e300}}]}"#;
        let err = ModelConfig::from_hf_json(deci).unwrap_err().to_string();
        assert!(err.contains("FFN width"), "{err}");
    }

    #[test]
    fn unknown_architecture_is_named() {
        let json = r#"{"architectures":["GPTNeoXForCausalLM"],"vocab_size":10,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":2,"num_attention_heads":2}"#;
        let err = ModelConfig::from_hf_json(json).unwrap_err().to_string();
        assert!(
            err.contains("GPTNeoXForCausalLM".to_ascii_lowercase().as_str()),
            "{err}"
        );
    }
}
