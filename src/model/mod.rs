//! Loading and running a model; nothing here knows about surgery.

pub mod config;
pub mod source;
pub mod synthetic;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

pub use config::{Arch, ModelConfig};
pub use source::{LocalModel, Resolved};
pub use tokenizer::TextCodec;
pub use transformer::{KvCache, Mode, RunOptions, Scales, Transformer};

use crate::plan::{ModelIdentity, Plan, PlanFile};

/// A loaded model: weights, tokenizer (if the files have one) and identity.
pub struct Model {
    pub transformer: Transformer,
    pub codec: Option<TextCodec>,
    pub identity: ModelIdentity,
    pub origin: String,
    /// Whether quantized weights are available for fast decode.
    pub has_quantized: bool,
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

    /// The tokenizer, or a clear error for weight-only folders.
    pub fn codec(&self) -> Result<&TextCodec> {
        self.codec
            .as_ref()
            .context("this model has no tokenizer (no tokenizer.json / GGUF vocabulary); text commands need one")
    }

    /// Opens a resolved model on `device` (f32 on CPU, bf16 on GPU).
    pub fn load(resolved: &Resolved, device: &Device) -> Result<Self> {
        let dtype = if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        };
        Self::load_as(resolved, device, dtype)
    }

    /// Opens a model with weights in `dtype` (f64 serves gradient checks).
    pub fn load_as(resolved: &Resolved, device: &Device, dtype: DType) -> Result<Self> {
        let (cfg, transformer, hash, codec, name) = match &resolved.local {
            LocalModel::Gguf(path) => {
                let mut src = weights::GgufSource::open(path, device, dtype)?;
                let cfg = ModelConfig::from_gguf(&src.content)
                    .with_context(|| format!("cannot use {}", path.display()))?;
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
                let (t, hash) = weights::build_transformer(&cfg, &mut src)
                    .with_context(|| format!("cannot load the weights of {}", path.display()))?;
                (cfg, t, hash, codec, name)
            }
            LocalModel::HfDir(dir) => {
                let cfg_path = dir.join("config.json");
                let text = std::fs::read_to_string(&cfg_path)
                    .with_context(|| format!("cannot read {}", cfg_path.display()))?;
                let cfg = ModelConfig::from_hf_json(&text)
                    .with_context(|| format!("cannot use {}", cfg_path.display()))?;
                let mut src = weights::SafetensorsSource::open(dir, device, dtype)?;
                let (t, hash) = weights::build_transformer(&cfg, &mut src)
                    .with_context(|| format!("cannot load the weights in {}", dir.display()))?;
                let codec = if dir.join("tokenizer.json").exists() {
                    Some(TextCodec::from_hf_dir(dir)?)
                } else {
                    None
                };
                (cfg, t, hash, codec, file_stem(dir))
            }
        };
        let has_quantized = transformer
            .layers
            .first()
            .is_some_and(|l| l.attn.q.quantized.is_some());
        Ok(Self {
            identity: ModelIdentity {
                name,
                architecture: cfg.arch.name().to_string(),
                n_layers: cfg.n_layers,
                content_hash: hash,
            },
            transformer,
            codec,
            origin: resolved.origin.clone(),
            has_quantized,
        })
    }

    /// Loads a plan file and checks it belongs to this model.
    pub fn load_plan(&self, path: &std::path::Path) -> Result<PlanFile> {
        let pf = PlanFile::load(path)?;
        pf.check_model(&self.identity)
            .with_context(|| format!("cannot use plan {}", path.display()))?;
        Ok(pf)
    }

    /// Checks an in-memory plan against this model.
    pub fn check_plan(&self, plan: &Plan) -> Result<()> {
        plan.validate(self.n_layers())
    }
}

fn file_stem(p: &std::path::Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}
