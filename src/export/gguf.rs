//! Writes a pruned model as a llama.cpp `deci` GGUF: the source GGUF's
//! metadata under the `deci.` prefix, per-layer head counts and FFN widths,
//! the skipped blocks' tensors left out, the scales folded into
//! `attn_output` / `ffn_down` (re-quantized to the source's type) and a
//! healed plan's corrections merged into the matrices they touch
//! (re-quantized to 8 bits, `corrected_type`).
//!
//! llama.cpp's `deci` graph handles a skipped attention as zero heads. A
//! zero FFN width, though, `continue`s before the layer's output is kept,
//! which throws away that layer's attention output; so a skipped MLP after
//! a kept attention (or in the last layer) is written as a 256-wide all-zero
//! FFN, which adds exactly nothing.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Seek, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::fold::{fold_factors, FoldFactors};
use crate::model::lowrank;
use crate::plan::{BlockId, BlockKind, Plan};

/// Width of the all-zero FFN that stands in for a skipped MLP.
pub const ZERO_FFN_WIDTH: usize = 256;

/// Parses `--quant` (GGML type names as llama.cpp spells them).
pub fn parse_quant(name: &str) -> Result<GgmlDType> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "f32" => GgmlDType::F32,
        "f16" => GgmlDType::F16,
        "bf16" => GgmlDType::BF16,
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q8_0" => GgmlDType::Q8_0,
        "q2_k" => GgmlDType::Q2K,
        "q3_k" => GgmlDType::Q3K,
        "q4_k" => GgmlDType::Q4K,
        "q5_k" => GgmlDType::Q5K,
        "q6_k" => GgmlDType::Q6K,
        other => bail!(
            "unknown --quant `{other}`; use one of f32 f16 bf16 q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k \
             q4_k q5_k q6_k"
        ),
    })
}

/// What a GGUF export wrote.
#[derive(Debug, Clone)]
pub struct GgufSummary {
    pub tensors: usize,
    pub dropped_tensors: usize,
    pub zero_ffn_layers: Vec<usize>,
}

/// Reads `source` (a `llama` GGUF), applies `plan` and writes the `deci`
/// GGUF to `out` (which the caller makes atomic).
pub fn write_deci_gguf(
    source: &Path,
    plan: &Plan,
    quant: Option<GgmlDType>,
    extra_metadata: &[(String, String)],
    out: &mut (impl Write + Seek),
) -> Result<GgufSummary> {
    let file = File::open(source).with_context(|| format!("cannot open {}", source.display()))?;
    let mut reader = BufReader::new(file);
    let ct = gguf_file::Content::read(&mut reader)
        .with_context(|| format!("{} is not a readable GGUF file", source.display()))?;
    let arch = ct
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    match arch.as_str() {
        "llama" => {}
        "gemma3" => bail!(
            "a gguf (llama.cpp deci) export cannot express Gemma 3 (gemma3): `deci` extends \
             `llama`, which has no sandwich or q/k norms, GELU MLP or local/global layers"
        ),
        "deci" => bail!(
            "{} is already a pruned `deci` export; export from the original model instead",
            source.display()
        ),
        other => bail!(
            "GGUF export writes llama.cpp's `deci` architecture, which extends `llama`; this model \
             is `{other}` (its attention biases / RoPE layout have no `deci` form)"
        ),
    }
    let md = &ct.metadata;
    let get_u = |key: &str| -> Result<usize> {
        md.get(&format!("llama.{key}"))
            .and_then(|v| {
                v.to_u32()
                    .ok()
                    .or_else(|| v.to_u64().ok().map(|x| x as u32))
            })
            .map(|v| v as usize)
            .with_context(|| format!("the source GGUF lacks `llama.{key}`"))
    };
    let n_layers = get_u("block_count")?;
    let n_head = get_u("attention.head_count")?;
    let n_head_kv = get_u("attention.head_count_kv").unwrap_or(n_head);
    let n_ff = get_u("feed_forward_length")?;
    let hidden = get_u("embedding_length")?;
    let head_dim = get_u("rope.dimension_count").unwrap_or(hidden / n_head.max(1));
    let factors = fold_factors(plan, n_layers)?;

    // Per-layer shape: skipped attention = zero heads; skipped MLP = zero
    // width, or the all-zero stand-in where llama.cpp needs one.
    let mut zero_ffn_layers = Vec::new();
    let mut heads = Vec::new();
    let mut heads_kv = Vec::new();
    let mut ffn = Vec::new();
    for i in 0..n_layers {
        let attn_kept = !plan.skips_attn(i);
        heads.push(if attn_kept { n_head } else { 0 });
        heads_kv.push(if attn_kept { n_head_kv } else { 0 });
        ffn.push(if !plan.skips_mlp(i) {
            n_ff
        } else if attn_kept || i + 1 == n_layers {
            zero_ffn_layers.push(i);
            ZERO_FFN_WIDTH
        } else {
            0
        });
    }

    let mut metadata: BTreeMap<String, Value> = BTreeMap::new();
    for (k, v) in md {
        if k == "general.alignment" {
            continue; // the writer uses its own (32)
        }
        let key = match k.strip_prefix("llama.") {
            Some(rest) => format!("deci.{rest}"),
            None => k.clone(),
        };
        metadata.insert(key, v.clone());
    }
    let array = |v: &[usize]| Value::Array(v.iter().map(|x| Value::I32(*x as i32)).collect());
    metadata.insert("general.architecture".into(), Value::String("deci".into()));
    metadata.insert("deci.attention.head_count".into(), array(&heads));
    metadata.insert("deci.attention.head_count_kv".into(), array(&heads_kv));
    metadata.insert("deci.feed_forward_length".into(), array(&ffn));
    // llama.cpp derives the head size from layer 0's head count unless told.
    metadata.insert(
        "deci.attention.key_length".into(),
        Value::U32(head_dim as u32),
    );
    metadata.insert(
        "deci.attention.value_length".into(),
        Value::U32(head_dim as u32),
    );
    for (k, v) in extra_metadata {
        metadata.insert(k.clone(), Value::String(v.clone()));
    }

    // Tensors in file order; dropped, rescaled, re-typed or copied as-is.
    let mut infos: Vec<(&String, &gguf_file::TensorInfo)> = ct.tensor_infos.iter().collect();
    infos.sort_by_key(|(_, info)| info.offset);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut dropped = 0;
    for (name, _) in infos {
        let block = block_of(name);
        if let Some(b) = block {
            if plan.is_skipped(b)
                && !(b.kind == BlockKind::Mlp && zero_ffn_layers.contains(&b.layer))
            {
                dropped += 1;
                continue;
            }
        }
        let q = ct
            .tensor(&mut reader, name, &Device::Cpu)
            .with_context(|| format!("cannot read tensor `{name}`"))?;
        let q = match block {
            Some(b) if plan.is_skipped(b) => {
                // The all-zero stand-in FFN of a skipped MLP.
                match zero_ffn_tensor(name, hidden)? {
                    Some(t) => t,
                    None => q, // ffn_norm stays as it was
                }
            }
            _ => {
                let factor = fold_factor(name, &factors);
                let delta = correction(name, plan, &q)?;
                retype(q, factor, delta, quant).with_context(|| format!("tensor `{name}`"))?
            }
        };
        tensors.push((name.clone(), q));
    }

    let md_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(out, &md_refs, &t_refs).context("writing the GGUF file")?;
    Ok(GgufSummary {
        tensors: tensors.len(),
        dropped_tensors: dropped,
        zero_ffn_layers,
    })
}

/// The block a `blk.N.*` tensor belongs to.
fn block_of(name: &str) -> Option<BlockId> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if tail.starts_with("attn_") {
        Some(BlockId::attn(layer))
    } else if tail.starts_with("ffn_") {
        Some(BlockId::mlp(layer))
    } else {
        None
    }
}

fn fold_factor(name: &str, factors: &[FoldFactors]) -> f64 {
    let Some(rest) = name.strip_prefix("blk.") else {
        return 1.0;
    };
    let Some((layer, tail)) = rest.split_once('.') else {
        return 1.0;
    };
    let Some(f) = layer.parse::<usize>().ok().and_then(|l| factors.get(l)) else {
        return 1.0;
    };
    match tail {
        "attn_output.weight" => f.o_proj,
        "ffn_down.weight" => f.down_proj,
        _ => 1.0,
    }
}

/// The GGUF names of `lowrank::PROJECTIONS`, in order.
const GGUF_PROJECTIONS: [&str; 7] = [
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
];

/// A healed plan's dense update `B·A` for tensor `name` (scalpel runs a
/// GGUF's q/k in the file's own layout, so the factors apply as they are).
fn correction(name: &str, plan: &Plan, q: &QTensor) -> Result<Option<Tensor>> {
    if plan.tensors.is_none() {
        return Ok(None);
    }
    let Some((layer, tail)) = name.strip_prefix("blk.").and_then(|r| r.split_once('.')) else {
        return Ok(None);
    };
    let (Ok(layer), Some(proj)) = (
        layer.parse::<usize>(),
        GGUF_PROJECTIONS.iter().position(|p| *p == tail),
    ) else {
        return Ok(None);
    };
    let shape = q.shape().dims2()?;
    lowrank::lookup(plan, layer, proj, shape)?
        .map(|c| c.delta())
        .transpose()
        .map_err(Into::into)
}

/// gate/up are (width, hidden), down is (hidden, width); all zero, f32.
fn zero_ffn_tensor(name: &str, hidden: usize) -> Result<Option<QTensor>> {
    let shape = if name.ends_with("ffn_gate.weight") || name.ends_with("ffn_up.weight") {
        (ZERO_FFN_WIDTH, hidden)
    } else if name.ends_with("ffn_down.weight") {
        (hidden, ZERO_FFN_WIDTH)
    } else {
        return Ok(None);
    };
    let zeros = Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu)?;
    Ok(Some(QTensor::quantize(&zeros, GgmlDType::F32)?))
}

/// Adds a heal's update, applies a fold factor and the target type
/// (re-quantizing); untouched tensors keep their bytes.
fn retype(
    q: QTensor,
    factor: f64,
    delta: Option<Tensor>,
    quant: Option<GgmlDType>,
) -> Result<QTensor> {
    let is_matrix = q.shape().dims().len() == 2;
    let target = match quant {
        Some(t) if is_matrix => t,
        // A heal's update is small next to a 4-bit step: re-quantized to
        // the source's 4-bit grid it would be mostly rounded away (and a
        // fresh rounding of the whole matrix added), so corrected
        // matrices keep 8 bits (measured in tests/heal.rs).
        _ if delta.is_some() => corrected_type(q.dtype()),
        _ => q.dtype(),
    };
    if factor == 1.0 && target == q.dtype() && delta.is_none() {
        return Ok(q);
    }
    let dense = q.dequantize(&Device::Cpu)?;
    let dense = match delta {
        Some(d) => (dense + d.to_device(&Device::Cpu)?)?,
        None => dense,
    };
    let dense = if factor == 1.0 {
        dense
    } else {
        dense.affine(factor, 0.0)?
    };
    let cols = *dense.dims().last().unwrap_or(&0);
    if !cols.is_multiple_of(target.block_size()) {
        bail!(
            "{target:?} needs rows that are a multiple of {} values, this tensor's are {cols}; \
             pick another --quant",
            target.block_size()
        );
    }
    Ok(QTensor::quantize(&dense, target)?)
}

/// The type a corrected matrix is written in: its own when it has 8 bits
/// or more, else Q8_0.
pub fn corrected_type(source: GgmlDType) -> GgmlDType {
    match source {
        GgmlDType::F32
        | GgmlDType::F16
        | GgmlDType::BF16
        | GgmlDType::Q8_0
        | GgmlDType::Q8_1
        | GgmlDType::Q8K => source,
        _ => GgmlDType::Q8_0,
    }
}

/// Names the source's tensor types, for the summary (e.g. "Q4_1 ×182, F32 ×61").
pub fn describe_types(source: &Path) -> Result<String> {
    let mut reader = BufReader::new(File::open(source)?);
    let ct = gguf_file::Content::read(&mut reader)?;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for info in ct.tensor_infos.values() {
        *counts.entry(format!("{:?}", info.ggml_dtype)).or_default() += 1;
    }
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort_by_key(|b| std::cmp::Reverse(b.1));
    Ok(v.iter()
        .map(|(k, n)| format!("{k} ×{n}"))
        .collect::<Vec<_>>()
        .join(", "))
}
