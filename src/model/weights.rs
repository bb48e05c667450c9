//! Reading weights from GGUF files and Hugging Face safetensors into the
//! engine's structs. GGUF tensors are dequantized at load (f32 on CPU, bf16
//! on GPU) and the quantized originals are kept for fast decode; a
//! quantized-only load (`KeepWeights::QuantizedOnly`) skips the dense copy
//! of every quantized matrix, for models that do not fit as f32.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use super::config::ModelConfig;
use super::transformer::{Attention, GemmaNorms, Layer, Linear, Mlp, Transformer};
use crate::kernels::QWeight;
use crate::plan::BlockId;

/// One tensor as loaded: dense values, plus the quantized original if any.
/// At least one of the two is set; `dense` is `None` only for a quantized
/// tensor of a quantized-only load.
pub struct Loaded {
    pub dense: Option<Tensor>,
    pub quantized: Option<Arc<QTensor>>,
    /// The tensor exactly as the file stores it (before any requantization
    /// for candle), for the lean decode path's kernels.
    pub original: Option<Arc<QTensor>>,
}

/// The lean path's kernel for a file tensor, zero copy (CPU only; `None`
/// for types the kernels do not handle, which then run the candle path).
fn kernel_of(original: &Option<Arc<QTensor>>) -> Result<Option<Arc<QWeight>>> {
    match original {
        Some(q) if q.device().is_cpu() => Ok(QWeight::from_qtensor(q.clone())?.map(Arc::new)),
        _ => Ok(None),
    }
}

impl Loaded {
    pub fn dense(dense: Tensor) -> Self {
        Self {
            dense: Some(dense),
            quantized: None,
            original: None,
        }
    }

    pub fn dims(&self) -> Vec<usize> {
        match (&self.dense, &self.quantized) {
            (Some(d), _) => d.dims().to_vec(),
            (None, Some(q)) => q.shape().dims().to_vec(),
            (None, None) => Vec::new(),
        }
    }

    /// The dense values, dequantizing the quantized tensor if no dense copy
    /// was kept (for the small tensors: norms, biases, padded matrices).
    pub fn into_dense(self, dtype: DType) -> Result<Tensor> {
        match (self.dense, self.quantized) {
            (Some(d), _) => Ok(d),
            (None, Some(q)) => Ok(q.dequantize(&q.device())?.to_dtype(dtype)?),
            (None, None) => bail!("a tensor with neither dense nor quantized values"),
        }
    }
}

/// Which copies of the quantized matrices a load keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeepWeights {
    /// Dense (f32 / bf16) and quantized: exact paths and fast decode.
    #[default]
    Both,
    /// Only the quantized ones (the file's, or Q8_0 for Q4_1/Q5_x on CPU):
    /// dense values are dequantized when a path needs them.
    QuantizedOnly,
}

/// A tensor as the file stores it: its type there, its shape and the bytes
/// of a strided sample of its elements (or quantization blocks).
pub struct StoredSample {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Where the weights come from; names are Hugging Face names.
pub trait WeightSource {
    fn load(&mut self, hf_name: &str) -> Result<Loaded>;
    /// The tensor's stored form, before any conversion, for the content hash.
    fn stored_sample(&mut self, hf_name: &str) -> Result<StoredSample>;
    /// The tensor's name in the file (for error messages).
    fn file_name(&self, hf_name: &str) -> String {
        hf_name.to_string()
    }
    fn contains(&self, hf_name: &str) -> bool;
    fn device(&self) -> Device;
    fn dtype(&self) -> DType;
    /// Whether Gemma norm weights are stored as the effective `1 + w`
    /// (llama.cpp's converter adds the 1) rather than as the checkpoint's `w`.
    fn gemma_norms_include_one(&self) -> bool {
        false
    }
}

/// HF name -> GGUF name (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`).
pub fn gguf_name(hf: &str) -> String {
    let direct = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(d) = direct {
        return d.to_string();
    }
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        if let Some((layer, tail)) = rest.split_once('.') {
            let mapped = match tail {
                "input_layernorm.weight" => "attn_norm.weight",
                "post_attention_layernorm.weight" => "ffn_norm.weight",
                "self_attn.q_proj.weight" => "attn_q.weight",
                "self_attn.k_proj.weight" => "attn_k.weight",
                "self_attn.v_proj.weight" => "attn_v.weight",
                "self_attn.o_proj.weight" => "attn_output.weight",
                "self_attn.q_proj.bias" => "attn_q.bias",
                "self_attn.k_proj.bias" => "attn_k.bias",
                "self_attn.v_proj.bias" => "attn_v.bias",
                "mlp.gate_proj.weight" => "ffn_gate.weight",
                "mlp.up_proj.weight" => "ffn_up.weight",
                "mlp.down_proj.weight" => "ffn_down.weight",
                other => other,
            };
            return format!("blk.{layer}.{mapped}");
        }
    }
    hf.to_string()
}

/// HF name -> GGUF name for a Gemma 3 file: its sandwich norms take the
/// names llama.cpp gives them (`post_attention_layernorm` is the attention
/// block's output norm there, not the MLP's input norm as for Llama).
pub fn gemma3_gguf_name(hf: &str) -> String {
    if let Some((layer, tail)) = hf
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once('.'))
    {
        let mapped = match tail {
            "post_attention_layernorm.weight" => Some("post_attention_norm.weight"),
            "pre_feedforward_layernorm.weight" => Some("ffn_norm.weight"),
            "post_feedforward_layernorm.weight" => Some("post_ffw_norm.weight"),
            "self_attn.q_norm.weight" => Some("attn_q_norm.weight"),
            "self_attn.k_norm.weight" => Some("attn_k_norm.weight"),
            _ => None,
        };
        if let Some(m) = mapped {
            return format!("blk.{layer}.{m}");
        }
    }
    gguf_name(hf)
}

pub struct GgufSource {
    path: PathBuf,
    /// A Gemma 3 file (its own tensor names and norm convention).
    gemma: bool,
    reader: BufReader<File>,
    pub content: gguf_file::Content,
    device: Device,
    dtype: DType,
    keep: KeepWeights,
}

impl GgufSource {
    /// Which copies `load` keeps (both by default).
    pub fn keep(mut self, keep: KeepWeights) -> Self {
        self.keep = keep;
        self
    }

    pub fn open(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let file_len = file.metadata()?.len();
        let mut reader = BufReader::new(file);
        let content = read_gguf_header(&mut reader)
            .with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
        // A truncated download passes the header but not the data: say so up front.
        for (name, info) in &content.tensor_infos {
            let elems = info
                .shape
                .dims()
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
            let end = elems
                .map(|n| {
                    n / info.ggml_dtype.block_size() as u64 * info.ggml_dtype.type_size() as u64
                })
                .and_then(|bytes| {
                    content
                        .tensor_data_offset
                        .checked_add(info.offset)?
                        .checked_add(bytes)
                })
                .unwrap_or(u64::MAX);
            if end > file_len {
                bail!(
                    "{} is truncated: tensor `{name}` ends at byte {end} but the file has {file_len} \
                     bytes; download it again",
                    path.display()
                );
            }
        }
        let gemma = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .is_some_and(|a| a == "gemma3");
        Ok(Self {
            path: path.to_path_buf(),
            gemma,
            reader,
            content,
            device: device.clone(),
            dtype,
            keep: KeepWeights::Both,
        })
    }

    /// llama.cpp's `rope_freqs.weight` (Llama-3.1 RoPE scaling), if present.
    pub fn rope_freq_factors(&mut self) -> Result<Option<Vec<f32>>> {
        if !self.content.tensor_infos.contains_key(ROPE_FREQS) {
            return Ok(None);
        }
        let q = self
            .content
            .tensor(&mut self.reader, ROPE_FREQS, &Device::Cpu)
            .with_context(|| format!("cannot read `{ROPE_FREQS}` from {}", self.path.display()))?;
        let values = q
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Some(values))
    }
}

/// The GGUF tensor of RoPE frequency factors (no Hugging Face counterpart).
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// candle's GGUF reader trusts some length fields: the header is checked first.
fn read_gguf_header(reader: &mut BufReader<File>) -> Result<gguf_file::Content> {
    super::header_check::read_gguf_content(reader)
}

impl GgufSource {
    fn name_of(&self, hf_name: &str) -> String {
        if self.gemma {
            gemma3_gguf_name(hf_name)
        } else {
            gguf_name(hf_name)
        }
    }
}

impl WeightSource for GgufSource {
    fn load(&mut self, hf_name: &str) -> Result<Loaded> {
        let name = self.name_of(hf_name);
        let q = self
            .content
            .tensor(&mut self.reader, &name, &self.device)
            .with_context(|| format!("cannot read tensor `{name}` from {}", self.path.display()))?;
        let is_float = matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        let keep_dense = is_float || self.keep == KeepWeights::Both;
        let dense = if keep_dense {
            Some(q.dequantize(&self.device)?.to_dtype(self.dtype)?)
        } else {
            None
        };
        let q = Arc::new(q);
        let original = (!is_float).then(|| q.clone());
        let quantized = match q.dtype() {
            _ if is_float => None,
            // candle has no SIMD CPU kernel for these (a scalar loop runs
            // instead, ~10x slower): keep the decode copy as Q8_0, which has one
            // and represents their 16/32 levels per block almost exactly.
            GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 if self.device.is_cpu() => {
                let f32_weights = q.dequantize(&self.device)?;
                Some(Arc::new(QTensor::quantize(&f32_weights, GgmlDType::Q8_0)?))
            }
            _ => Some(q),
        };
        Ok(Loaded {
            dense,
            quantized,
            original,
        })
    }

    fn stored_sample(&mut self, hf_name: &str) -> Result<StoredSample> {
        let name = self.name_of(hf_name);
        let info = self
            .content
            .tensor_infos
            .get(&name)
            .with_context(|| format!("{} has no tensor `{name}`", self.path.display()))?;
        let (block_bytes, block_elems) =
            (info.ggml_dtype.type_size(), info.ggml_dtype.block_size());
        let start = self.content.tensor_data_offset + info.offset;
        let mut bytes = Vec::new();
        let mut block = vec![0u8; block_bytes];
        for i in sample_indices(info.shape.elem_count() / block_elems) {
            self.reader
                .seek(SeekFrom::Start(start + (i * block_bytes) as u64))
                .and_then(|_| self.reader.read_exact(&mut block))
                .with_context(|| {
                    format!("cannot read tensor `{name}` from {}", self.path.display())
                })?;
            bytes.extend_from_slice(&block);
        }
        Ok(StoredSample {
            dtype: format!("{:?}", info.ggml_dtype),
            shape: info.shape.dims().to_vec(),
            bytes,
        })
    }

    fn file_name(&self, hf_name: &str) -> String {
        self.name_of(hf_name)
    }

    fn contains(&self, hf_name: &str) -> bool {
        self.content
            .tensor_infos
            .contains_key(&self.name_of(hf_name))
    }

    fn gemma_norms_include_one(&self) -> bool {
        self.gemma
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}

pub struct SafetensorsSource {
    tensors: candle_core::safetensors::MmapedSafetensors,
    names: std::collections::HashSet<String>,
    device: Device,
    dtype: DType,
}

impl SafetensorsSource {
    /// Opens `model.safetensors` or the shards listed in `model.safetensors.index.json`.
    pub fn open(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let files = safetensors_files(dir)?;
        // SAFETY: the files are memory-mapped read-only; scalpel never writes them while loaded.
        let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .with_context(|| {
                format!(
                    "cannot read the safetensors weights in {} (corrupt or truncated?)",
                    dir.display()
                )
            })?;
        let names = tensors.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Self {
            tensors,
            names,
            device: device.clone(),
            dtype,
        })
    }
}

pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{} has no weight_map", index.display()))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        for f in &files {
            super::header_check::check_shard_name(f)?;
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    bail!(
        "{} has neither model.safetensors nor model.safetensors.index.json",
        dir.display()
    )
}

impl SafetensorsSource {
    /// Every tensor's element count, for the memory estimate (all dense).
    pub fn stored_tensors(&self) -> Vec<super::memory::StoredTensor> {
        self.tensors
            .tensors()
            .into_iter()
            .map(|(_, view)| super::memory::StoredTensor {
                elems: view.shape().iter().product::<usize>() as u64,
                stored: super::memory::Stored::Float,
            })
            .collect()
    }
}

impl WeightSource for SafetensorsSource {
    fn load(&mut self, hf_name: &str) -> Result<Loaded> {
        let t = self
            .tensors
            .load(hf_name, &self.device)
            .with_context(|| format!("cannot read tensor `{hf_name}`"))?;
        Ok(Loaded::dense(t.to_dtype(self.dtype)?))
    }

    fn stored_sample(&mut self, hf_name: &str) -> Result<StoredSample> {
        let view = self
            .tensors
            .get(hf_name)
            .with_context(|| format!("cannot read tensor `{hf_name}`"))?;
        let data = view.data();
        let elems: usize = view.shape().iter().product();
        let elem_bytes = data.len() / elems.max(1);
        let mut bytes = Vec::new();
        for i in sample_indices(elems) {
            bytes.extend_from_slice(&data[i * elem_bytes..(i + 1) * elem_bytes]);
        }
        Ok(StoredSample {
            dtype: format!("{:?}", view.dtype()),
            shape: view.shape().to_vec(),
            bytes,
        })
    }

    fn contains(&self, hf_name: &str) -> bool {
        self.names.contains(hf_name)
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}

/// Loads every tensor, checks shapes against the config and builds the
/// transformer. Also returns a content hash over the stored tensors.
pub fn build_transformer(
    cfg: &ModelConfig,
    src: &mut dyn WeightSource,
) -> Result<(Transformer, String)> {
    build_transformer_with_noops(cfg, src, &BTreeSet::new(), &BTreeMap::new())
}

/// As [`build_transformer`], for a pruned (Nemotron-NAS / `deci`) model.
/// Its `noops` blocks have no weights: they get all-zero weights, which
/// compute exactly what skipping them does (the caller skips them for
/// speed). Its `narrow_ffn` layers (layer -> stored width; llama.cpp
/// exports write a tiny all-zero FFN for a skipped MLP) are zero-padded to
/// the config's width, which is exact too. Any other shape is refused.
pub fn build_transformer_with_noops(
    cfg: &ModelConfig,
    src: &mut dyn WeightSource,
    noops: &BTreeSet<BlockId>,
    narrow_ffn: &BTreeMap<usize, usize>,
) -> Result<(Transformer, String)> {
    let mut hasher = Sha256::new();
    hasher.update(cfg.arch.name());
    let mut shapes: HashMap<&str, Vec<usize>> = HashMap::new();
    let h = cfg.hidden_size;
    let (q_dim, kv_dim) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
    shapes.insert("q_proj", vec![q_dim, h]);
    shapes.insert("k_proj", vec![kv_dim, h]);
    shapes.insert("v_proj", vec![kv_dim, h]);
    shapes.insert("o_proj", vec![h, q_dim]);
    shapes.insert("gate_proj", vec![cfg.intermediate_size, h]);
    shapes.insert("up_proj", vec![cfg.intermediate_size, h]);
    shapes.insert("down_proj", vec![h, cfg.intermediate_size]);

    if src.contains(ROPE_FREQS) {
        hash_stored(&mut hasher, ROPE_FREQS, &src.stored_sample(ROPE_FREQS)?);
    }
    let gemma = cfg.gemma3.is_some();
    // Gemma's RMSNorm multiplies by 1 + w; the engine's by its weight.
    let norm_offset = if gemma && !src.gemma_norms_include_one() {
        1.0
    } else {
        0.0
    };
    let device = src.device();
    let dtype = src.dtype();
    let mut get = |name: &str, expect: &[usize]| -> Result<Loaded> {
        if !src.contains(name) {
            if let Some(fill) = noop_placeholder(name, noops) {
                let (dense, label) = match fill {
                    Placeholder::Zeros => (Tensor::zeros(expect, DType::F32, &device)?, "zeros"),
                    Placeholder::Ones => (Tensor::ones(expect, DType::F32, &device)?, "ones"),
                };
                hash_placeholder(&mut hasher, name, expect, label);
                return Ok(Loaded::dense(dense.to_dtype(src.dtype())?));
            }
            bail!("the weights lack `{name}` (expected for this architecture)");
        }
        hash_stored(&mut hasher, name, &src.stored_sample(name)?);
        let t = src.load(name)?;
        let dims = t.dims();
        if dims == expect {
            return Ok(t);
        }
        if is_narrow_ffn(name, &dims, expect, narrow_ffn) {
            let dense = t.into_dense(src.dtype())?;
            if let Some(padded) = pad_narrow_ffn(name, &dense, expect, narrow_ffn)? {
                return Ok(Loaded::dense(padded));
            }
            bail!("tensor `{name}` could not be padded to {expect:?}");
        }
        let file_name = src.file_name(name);
        let also = if file_name == name {
            String::new()
        } else {
            format!(" ({name})")
        };
        bail!(
            "tensor `{file_name}`{also} has shape {:?} in the file, but the model's config \
             expects {expect:?}: the weights do not match their config (a mismatched or \
             corrupt file)",
            dims
        )
    };

    let mlp_norm_name = if gemma {
        "pre_feedforward_layernorm"
    } else {
        "post_attention_layernorm"
    };
    let embed = get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let p = format!("model.layers.{i}");
        let mut linear = |proj: &str, group: &str, bias: bool| -> Result<Linear> {
            let w = get(&format!("{p}.{group}.{proj}.weight"), &shapes[proj])?;
            let bias = if bias {
                Some(
                    get(&format!("{p}.{group}.{proj}.bias"), &shapes[proj][..1])?
                        .into_dense(dtype)?,
                )
            } else {
                None
            };
            Ok(Linear {
                weight: w.dense,
                bias,
                quantized: w.quantized.map(QMatMul::from_arc).transpose()?,
                kernel: kernel_of(&w.original)?,
                lora: None,
            })
        };
        let ab = cfg.attention_bias;
        let attn = Attention {
            q: linear("q_proj", "self_attn", ab)?,
            k: linear("k_proj", "self_attn", ab)?,
            v: linear("v_proj", "self_attn", ab)?,
            o: linear("o_proj", "self_attn", false)?,
        };
        let mlp = Mlp {
            gate: linear("gate_proj", "mlp", false)?,
            up: linear("up_proj", "mlp", false)?,
            down: linear("down_proj", "mlp", false)?,
        };
        let mut norm = |name: &str, width: usize| -> Result<Tensor> {
            let w = get(&format!("{p}.{name}.weight"), &[width])?.into_dense(dtype)?;
            plus_offset(w, norm_offset)
        };
        let attn_norm = norm("input_layernorm", h)?;
        let mlp_norm = norm(mlp_norm_name, h)?;
        let gemma_norms = if gemma {
            Some(GemmaNorms {
                q_norm: norm("self_attn.q_norm", cfg.head_dim)?,
                k_norm: norm("self_attn.k_norm", cfg.head_dim)?,
                post_attn_norm: norm("post_attention_layernorm", h)?,
                post_mlp_norm: norm("post_feedforward_layernorm", h)?,
            })
        } else {
            None
        };
        layers.push(Layer {
            attn_norm,
            attn,
            mlp_norm,
            mlp,
            gemma: gemma_norms,
        });
    }
    let norm = plus_offset(
        get("model.norm.weight", &[h])?.into_dense(dtype)?,
        norm_offset,
    )?;
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        let w = get("lm_head.weight", &[cfg.vocab_size, h])?;
        Some(Linear {
            weight: w.dense,
            bias: None,
            quantized: w.quantized.map(QMatMul::from_arc).transpose()?,
            kernel: kernel_of(&w.original)?,
            lora: None,
        })
    };
    // The quantized embeddings serve the tied output projection, and the
    // token lookup of a quantized-only load.
    let embed_q = match embed.quantized {
        Some(q) if cfg.tie_word_embeddings || embed.dense.is_none() => Some(QMatMul::from_arc(q)?),
        _ => None,
    };
    let embed_kernel = match cfg.tie_word_embeddings {
        true => kernel_of(&embed.original)?,
        false => None,
    };
    let mut t =
        Transformer::with_embeddings(cfg.clone(), embed.dense, embed_q, layers, norm, lm_head)?;
    t.embed_kernel = embed_kernel;
    Ok((t, format!("{:x}", hasher.finalize())))
}

/// `w + offset` (Gemma checkpoints' norm weights: offset 1).
fn plus_offset(w: Tensor, offset: f64) -> Result<Tensor> {
    if offset == 0.0 {
        return Ok(w);
    }
    Ok(w.affine(1.0, offset)?)
}

enum Placeholder {
    Zeros,
    Ones,
}

/// What stands in for a missing tensor of a no-op block (norm weights are
/// ones so the block stays a harmless zero contribution if ever run).
fn noop_placeholder(hf_name: &str, noops: &BTreeSet<BlockId>) -> Option<Placeholder> {
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (block, fill) = if tail.starts_with("self_attn.") {
        (BlockId::attn(layer), Placeholder::Zeros)
    } else if tail == "input_layernorm.weight" {
        (BlockId::attn(layer), Placeholder::Ones)
    } else if tail.starts_with("mlp.") {
        (BlockId::mlp(layer), Placeholder::Zeros)
    } else if tail == "post_attention_layernorm.weight" {
        (BlockId::mlp(layer), Placeholder::Ones)
    } else {
        return None;
    };
    noops.contains(&block).then_some(fill)
}

/// Whether `hf_name` is the FFN weight of a `narrow_ffn` layer, stored with
/// the declared width (so `pad_narrow_ffn` applies).
fn is_narrow_ffn(
    hf_name: &str,
    dims: &[usize],
    expect: &[usize],
    narrow_ffn: &BTreeMap<usize, usize>,
) -> bool {
    let Some((layer, proj)) = hf_name
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once(".mlp."))
    else {
        return false;
    };
    let known = matches!(
        proj,
        "gate_proj.weight" | "up_proj.weight" | "down_proj.weight"
    );
    let narrow = layer.parse::<usize>().ok().and_then(|l| narrow_ffn.get(&l));
    known && narrow.is_some() && dims.len() == 2 && expect.len() == 2
}

/// Zero-pads the FFN weight of a `narrow_ffn` layer whose stored width is
/// the declared one; `None` for every other tensor or shape.
fn pad_narrow_ffn(
    hf_name: &str,
    t: &Tensor,
    expect: &[usize],
    narrow_ffn: &BTreeMap<usize, usize>,
) -> Result<Option<Tensor>> {
    let Some((layer, proj)) = hf_name
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once(".mlp."))
    else {
        return Ok(None);
    };
    let Some(&width) = layer.parse::<usize>().ok().and_then(|l| narrow_ffn.get(&l)) else {
        return Ok(None);
    };
    // gate/up are (width, hidden), down is (hidden, width).
    let axis = match proj {
        "gate_proj.weight" | "up_proj.weight" => 0,
        "down_proj.weight" => 1,
        _ => return Ok(None),
    };
    let dims = t.dims();
    if dims.len() != 2 || expect.len() != 2 || dims[1 - axis] != expect[1 - axis] {
        return Ok(None);
    }
    if dims[axis] != width || width >= expect[axis] {
        return Ok(None);
    }
    Ok(Some(t.pad_with_zeros(axis, 0, expect[axis] - width)?))
}

/// Up to this many elements (or quantization blocks) of each tensor are
/// hashed: cheap for big models, yet any re-quantization or edit shows.
const HASH_SAMPLE: usize = 64;

/// Evenly strided indices of the hashed sample out of `n`.
fn sample_indices(n: usize) -> impl Iterator<Item = usize> {
    let take = n.min(HASH_SAMPLE);
    let stride = (n / take.max(1)).max(1);
    (0..take).map(move |i| i * stride)
}

/// Hashes a tensor's name, stored type, shape and sampled stored bytes, so
/// the identity is a property of the file alone.
fn hash_stored(hasher: &mut Sha256, name: &str, s: &StoredSample) {
    hasher.update(name.as_bytes());
    hasher.update(s.dtype.as_bytes());
    for d in &s.shape {
        hasher.update((*d as u64).to_le_bytes());
    }
    hasher.update(&s.bytes);
}

/// Hashes a stand-in for a tensor the file leaves out.
fn hash_placeholder(hasher: &mut Sha256, name: &str, shape: &[usize], fill: &str) {
    hasher.update(name.as_bytes());
    hasher.update(fill.as_bytes());
    for d in shape {
        hasher.update((*d as u64).to_le_bytes());
    }
}
