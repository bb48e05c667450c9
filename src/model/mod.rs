//! Loading and running a model; nothing here knows about surgery.

mod attention;
pub mod config;
mod frozen;
pub mod fused;
pub mod header_check;
pub mod kv;
pub mod lowrank;
pub mod mask;
pub mod memory;
pub mod mixer;
pub mod params;
pub mod pass;
pub mod routing;
pub mod source;
pub mod state;
pub mod synthetic;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

pub use config::{Arch, ModelConfig};
pub use memory::LoadOptions;
pub use params::{ParamValues, ParamsOver, TrainableParams};
pub use pass::{
    AttnExec, LayerPolicy, MlpExec, ParamSource, Pass, Probe, ProbeSource, Projection, Residual,
    TensorScales,
};
pub use source::{LocalModel, Resolved};
pub use state::SeqState;
pub use tokenizer::TextCodec;
pub use transformer::{Mode, RunOptions, Transformer};
pub use weights::KeepWeights;

use crate::plan::{ModelIdentity, Plan, PlanFile};

/// A loaded model: weights, tokenizer (if the files have one) and identity.
pub struct Model {
    pub transformer: Transformer,
    pub codec: Option<TextCodec>,
    pub identity: ModelIdentity,
    pub origin: String,
    /// Whether quantized weights are available for fast decode.
    pub has_quantized: bool,
    /// Blocks the files themselves leave out (a Nemotron-NAS / `deci`
    /// export): the model is its base plus this plan. Empty otherwise.
    pub implied_plan: Plan,
}

impl Model {
    pub fn cfg(&self) -> &ModelConfig {
        &self.transformer.cfg
    }

    pub fn n_layers(&self) -> usize {
        self.transformer.n_layers()
    }

    pub fn device(&self) -> &Device {
        &self.transformer.device
    }

    /// A prompt's ids: the chat template around it, or BOS first where the
    /// model's metadata says so.
    pub fn prompt_ids(&self, text: &str, chat: bool) -> Result<Vec<u32>> {
        let codec = self.codec()?;
        let text = if chat {
            codec.chat_prompt(text)?
        } else {
            text.to_string()
        };
        let mut ids = codec.encode_with_specials(&text)?;
        if self.cfg().add_bos && !chat {
            if let Some(bos) = self.cfg().bos_token_id {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// The prompt through the chat template when the model has one, else as
    /// plain text (what the workbench and the report's drafts use).
    pub fn prompt_ids_preferring_chat(&self, text: &str) -> Result<Vec<u32>> {
        self.prompt_ids(text, true)
            .or_else(|_| self.prompt_ids(text, false))
    }

    /// The tokenizer, or a clear error for weight-only folders.
    pub fn codec(&self) -> Result<&TextCodec> {
        self.codec
            .as_ref()
            .context("this model has no tokenizer (no tokenizer.json / GGUF vocabulary); text commands need one")
    }

    /// Opens a resolved model on `device` (f32 on CPU, bf16 on GPU).
    pub fn load(resolved: &Resolved, device: &Device) -> Result<Self> {
        Self::load_as(resolved, device, default_dtype(device))
    }

    /// As `load`, keeping the copies and checking the memory `opts` says.
    pub fn load_for(resolved: &Resolved, device: &Device, opts: &LoadOptions) -> Result<Self> {
        Self::load_with(resolved, device, default_dtype(device), opts)
    }

    /// Opens a model with weights in `dtype` (f64 serves gradient checks).
    pub fn load_as(resolved: &Resolved, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(resolved, device, dtype, &LoadOptions::default())
    }

    /// Opens a model as `opts` says (which copies of the weights to keep,
    /// and the context its memory estimate allows for). The estimate is
    /// checked against the memory available before any tensor is read.
    pub fn load_with(
        resolved: &Resolved,
        device: &Device,
        dtype: DType,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let (cfg, transformer, hash, codec, name, noops) = match &resolved.local {
            LocalModel::Gguf(path) => {
                let src = weights::GgufSource::open(path, device, dtype)?;
                let mut cfg = ModelConfig::from_gguf(&src.content)
                    .with_context(|| format!("cannot use {}", path.display()))?;
                check_memory(&path.display().to_string(), device, opts, |o| {
                    memory::estimate(&cfg, gguf_tensors(&src.content), device, dtype, o)
                })?;
                let mut src = src.keep(opts.keep);
                if let Some(factors) = src.rope_freq_factors()? {
                    cfg.set_rope_freq_factors(factors)
                        .with_context(|| format!("cannot use {}", path.display()))?;
                }
                let codec = match TextCodec::from_gguf(&src.content) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        eprintln!("scalpel: warning: {e:#}");
                        None
                    }
                };
                let name = src
                    .content
                    .metadata
                    .get("general.name")
                    .and_then(|v| v.to_string().ok().cloned())
                    .unwrap_or_else(|| file_stem(path));
                let noops = config::deci_noop_blocks_gguf(&src.content)?;
                let narrow = config::deci_narrow_ffn_gguf(&src.content, cfg.intermediate_size);
                let (t, hash) =
                    weights::build_transformer_with_noops(&cfg, &mut src, &noops, &narrow)
                        .with_context(|| {
                            format!("cannot load the weights of {}", path.display())
                        })?;
                let mut noops = noops;
                if src
                    .content
                    .metadata
                    .get("general.architecture")
                    .and_then(|v| v.to_string().ok())
                    .map(String::as_str)
                    == Some("deci")
                {
                    noops.extend(zero_mlp_blocks(&t)?);
                }
                (cfg, t, hash, codec, name, noops)
            }
            LocalModel::HfDir(dir) => {
                let cfg_path = dir.join("config.json");
                let text = std::fs::read_to_string(&cfg_path)
                    .with_context(|| format!("cannot read {}", cfg_path.display()))?;
                let mut cfg = ModelConfig::from_hf_json(&text)
                    .with_context(|| format!("cannot use {}", cfg_path.display()))?;
                let codec = if dir.join("tokenizer.json").exists() {
                    Some(TextCodec::from_hf_dir(dir)?)
                } else {
                    None
                };
                if let Some(bos) = tokenizer::hf_dir_bos(dir, codec.as_ref()) {
                    cfg.add_bos = bos.add;
                    cfg.bos_token_id = bos.id.or(cfg.bos_token_id);
                }
                let noops = config::deci_noop_blocks_hf(&text)?;
                let mut src = weights::SafetensorsSource::open(dir, device, dtype)?;
                let tensors = src.stored_tensors();
                check_memory(&dir.display().to_string(), device, opts, |o| {
                    memory::estimate(&cfg, tensors.iter().copied(), device, dtype, o)
                })?;
                let (t, hash) = weights::build_transformer_with_noops(
                    &cfg,
                    &mut src,
                    &noops,
                    &Default::default(),
                )
                .with_context(|| format!("cannot load the weights in {}", dir.display()))?;
                let name = source::hub_id_of_snapshot(dir).unwrap_or_else(|| file_stem(dir));
                (cfg, t, hash, codec, name, noops)
            }
        };
        let has_quantized = transformer
            .layers
            .iter()
            .any(|l| l.attn.q.quantized.is_some() || l.mlp.up.quantized.is_some());
        Ok(Self {
            identity: ModelIdentity {
                name,
                architecture: cfg.arch.name().to_string(),
                n_layers: cfg.n_layers,
                shape: Some(cfg.shape_signature()),
                content_hash: hash,
            },
            transformer,
            codec,
            origin: resolved.origin.clone(),
            has_quantized,
            implied_plan: Plan::with_skips(noops),
        })
    }

    /// Loads a plan file and checks it can run on this model; warns (on
    /// stderr) when it was made on other weights of the same shapes.
    pub fn load_plan(&self, path: &std::path::Path) -> Result<PlanFile> {
        let pf = PlanFile::load(path)?;
        let warning = pf
            .check_model(&self.identity)
            .with_context(|| format!("cannot use plan {}", path.display()))?;
        if let Some(w) = warning {
            eprintln!("scalpel: warning: plan {}: {w}", path.display());
        }
        for note in &pf.notes {
            eprintln!("scalpel: {}: {note}", path.display());
        }
        Ok(pf)
    }

    /// A plan on top of the blocks this model's files already leave out.
    pub fn with_implied(&self, plan: &Plan) -> Plan {
        let mut p = plan.clone();
        p.skip.extend(self.implied_plan.skip.iter().copied());
        p
    }

    /// Checks an in-memory plan against this model.
    pub fn check_plan(&self, plan: &Plan) -> Result<()> {
        plan.validate(self.n_layers())
    }
}

/// f32 on CPU, bf16 on GPU.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// The tensors of a GGUF file as the memory estimate sees them.
fn gguf_tensors(
    content: &candle_core::quantized::gguf_file::Content,
) -> impl Iterator<Item = memory::StoredTensor> + '_ {
    use candle_core::quantized::GgmlDType;
    content
        .tensor_infos
        .values()
        .map(|info| memory::StoredTensor {
            elems: info.shape.elem_count() as u64,
            stored: match info.ggml_dtype {
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => memory::Stored::Float,
                q => memory::Stored::Quantized(q),
            },
        })
}

/// Refuses a load of `what` whose estimate (`estimate(opts)`) exceeds the
/// memory available, suggesting the quantized-only load where it helps.
/// Only host memory is checked: on a GPU the weights live on the device.
pub fn check_memory(
    what: &str,
    device: &Device,
    opts: &LoadOptions,
    estimate: impl Fn(&LoadOptions) -> memory::MemoryNeed,
) -> Result<()> {
    if !device.is_cpu() {
        return Ok(());
    }
    let need = estimate(opts);
    let quantized_only = LoadOptions {
        keep: KeepWeights::QuantizedOnly,
        ..*opts
    };
    let alt = estimate(&quantized_only);
    let alt = (alt.weights() < need.weights()).then_some(alt);
    memory::check(&format!("loading {what}"), &need, alt.as_ref(), opts)
}

/// MLP blocks whose down projection is all zero (llama.cpp `deci` exports
/// write a skipped MLP that way): they contribute nothing, so skip them.
fn zero_mlp_blocks(t: &Transformer) -> Result<Vec<crate::plan::BlockId>> {
    let mut out = Vec::new();
    for (i, layer) in t.layers.iter().enumerate() {
        let max = layer
            .mlp
            .down
            .dense_weight()?
            .abs()?
            .max_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        if max == 0.0 {
            out.push(crate::plan::BlockId::mlp(i));
        }
    }
    Ok(out)
}

fn file_stem(p: &std::path::Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}
