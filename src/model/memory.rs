//! How much memory a load will need, estimated from the tensor shapes and
//! types before anything is allocated, and how much the process may use:
//! a load that cannot fit is refused with both numbers and what to do,
//! instead of aborting half-way with an allocation failure.

use anyhow::{bail, Result};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};

use super::config::ModelConfig;
use super::weights::KeepWeights;

/// What a load is for: which copies it keeps and how long a sequence (and
/// how many at once) it must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    pub keep: KeepWeights,
    /// Longest sequence (prompt and new tokens) the command runs.
    pub context_tokens: usize,
    /// Sequences held at once (`eval` runs one window per thread).
    pub sequences: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            keep: KeepWeights::Both,
            context_tokens: DEFAULT_CONTEXT,
            sequences: 1,
        }
    }
}

/// The context assumed when a command names none (the CLI's eval window).
pub const DEFAULT_CONTEXT: usize = 512;

/// One tensor as stored: its element count and stored type.
#[derive(Debug, Clone, Copy)]
pub struct StoredTensor {
    pub elems: u64,
    pub stored: Stored,
}

#[derive(Debug, Clone, Copy)]
pub enum Stored {
    /// A plain float tensor of this many bytes per element.
    Float,
    Quantized(GgmlDType),
}

/// The parts of a load's estimated peak, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryNeed {
    /// Quantized matrices as kept for decode.
    pub quantized: u64,
    /// Dense (f32 / bf16) tensors: every float tensor, plus the copies of
    /// the quantized ones when they are kept.
    pub dense: u64,
    /// candle's x86 CPU kernels keep a repacked copy of each Q4_K, Q6_K
    /// and Q8_0 matrix after its first matmul (as large as the matrix), and
    /// the lean path's kernels an interleaved copy of each Q4_0, Q4_1, Q5_0,
    /// Q5_1 and Q8_0 matrix (`kernels::QWeight::tiled_bytes`).
    pub repacked: u64,
    /// The largest temporary of the load itself (one tensor dequantized).
    pub load_transient: u64,
    pub kv_cache: u64,
    pub activations: u64,
}

/// Program, tokenizer, RoPE tables and allocator slack.
const BASE_OVERHEAD: u64 = 256 << 20;

impl MemoryNeed {
    pub fn total(&self) -> u64 {
        self.quantized
            + self.dense
            + self.repacked
            + self.load_transient
            + self.kv_cache
            + self.activations
            + BASE_OVERHEAD
    }

    /// The weights alone (what `Transformer::weight_bytes` counts).
    pub fn weights(&self) -> u64 {
        self.quantized + self.dense
    }

    pub fn describe(&self) -> String {
        format!(
            "{} weights ({} quantized + {} f32/bf16), {} kernels' repacked copies, {} KV cache, \
             {} activations, {} while loading",
            gib(self.weights()),
            gib(self.quantized),
            gib(self.dense),
            gib(self.repacked),
            gib(self.kv_cache),
            gib(self.activations),
            gib(self.load_transient),
        )
    }
}

/// The type a quantized matrix is kept in on `device` (the loader turns
/// Q4_1 / Q5_x into Q8_0 on the CPU, where candle has a fast kernel for it).
fn kept_type(dtype: GgmlDType, device: &Device) -> GgmlDType {
    match dtype {
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 if device.is_cpu() => GgmlDType::Q8_0,
        other => other,
    }
}

/// Whether the lean path's kernels keep an interleaved copy of a `dtype` matrix.
fn tiled_on(dtype: GgmlDType, device: &Device) -> bool {
    cfg!(target_arch = "x86_64")
        && device.is_cpu()
        && matches!(
            dtype,
            GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_0
        )
}

/// Whether candle's CPU matmul keeps a repacked copy of a `dtype` matrix.
fn repacked_on(dtype: GgmlDType, device: &Device) -> bool {
    cfg!(target_arch = "x86_64")
        && device.is_cpu()
        && matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K | GgmlDType::Q8_0)
}

fn quantized_bytes(elems: u64, dtype: GgmlDType) -> u64 {
    elems / dtype.block_size() as u64 * dtype.type_size() as u64
}

/// The estimate for loading `tensors` of a model `cfg` on `device` in
/// `dtype` as `opts` says.
pub fn estimate(
    cfg: &ModelConfig,
    tensors: impl IntoIterator<Item = StoredTensor>,
    device: &Device,
    dtype: DType,
    opts: &LoadOptions,
) -> MemoryNeed {
    let elem = dtype.size_in_bytes() as u64;
    let mut need = MemoryNeed::default();
    for t in tensors {
        match t.stored {
            Stored::Float => {
                need.dense += t.elems * elem;
                // Read as stored, then converted: the f32 copy is transient.
                need.load_transient = need.load_transient.max(t.elems * 4);
            }
            Stored::Quantized(q) => {
                let kept = kept_type(q, device);
                need.quantized += quantized_bytes(t.elems, kept);
                if repacked_on(kept, device) {
                    need.repacked += quantized_bytes(t.elems, kept);
                }
                if kept != q && device.is_cpu() {
                    // The file's own copy, which the lean path's kernels read.
                    need.quantized += quantized_bytes(t.elems, q);
                }
                if tiled_on(q, device) {
                    need.repacked += quantized_bytes(t.elems, q);
                }
                let read = quantized_bytes(t.elems, q);
                let dequantized = opts.keep == KeepWeights::Both || kept != q;
                let temp = read + if dequantized { t.elems * 4 } else { 0 };
                need.load_transient = need.load_transient.max(temp);
                if opts.keep == KeepWeights::Both {
                    need.dense += t.elems * elem;
                }
            }
        }
    }
    let (kv, act) = runtime_bytes(cfg, dtype, opts);
    need.kv_cache = kv;
    need.activations = act;
    need
}

/// KV cache and activations for `opts.sequences` sequences of
/// `opts.context_tokens`, in `dtype`.
fn runtime_bytes(cfg: &ModelConfig, dtype: DType, opts: &LoadOptions) -> (u64, u64) {
    let elem = dtype.size_in_bytes() as u64;
    let t = opts.context_tokens.max(1) as u64;
    let seqs = opts.sequences.max(1) as u64;
    let kv_dim = (cfg.n_kv_heads * cfg.head_dim) as u64;
    let kv = cfg.n_layers as u64 * 2 * kv_dim * t * elem * seqs;
    // One layer's live tensors at a time: q/k/v/o and the residual, three
    // FFN-wide tensors, the attention scores and their softmax (f32), then
    // the logits and their log-softmax. Doubled for candle's temporaries.
    let q_dim = (cfg.n_heads * cfg.head_dim) as u64;
    let hidden = cfg.hidden_size as u64;
    let layer = t * (2 * hidden + q_dim + 2 * kv_dim) * elem
        + 3 * t * cfg.intermediate_size as u64 * elem
        + 2 * cfg.n_heads as u64 * t * t * 4;
    let logits = 2 * t * cfg.vocab_size as u64 * 4;
    (kv, 2 * (layer + logits) * seqs)
}

/// The estimate for a synthetic model of `cfg` (no file: shapes only).
pub fn estimate_synthetic(
    cfg: &ModelConfig,
    quant_type: impl Fn(usize) -> GgmlDType,
    device: &Device,
    dtype: DType,
    opts: &LoadOptions,
) -> MemoryNeed {
    let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
    let mut mats = vec![(cfg.vocab_size, h), (cfg.vocab_size, h)];
    for _ in 0..cfg.n_layers {
        mats.extend([
            (q, h),
            (kv, h),
            (kv, h),
            (h, q),
            (inter, h),
            (inter, h),
            (h, inter),
        ]);
    }
    let tensors = mats.into_iter().map(|(rows, cols)| StoredTensor {
        elems: (rows * cols) as u64,
        stored: match opts.keep {
            KeepWeights::QuantizedOnly => Stored::Quantized(quant_type(cols)),
            KeepWeights::Both => Stored::Float,
        },
    });
    let norms = (0..2 * cfg.n_layers + 1).map(|_| StoredTensor {
        elems: h as u64,
        stored: Stored::Float,
    });
    let mut need = estimate(cfg, tensors.chain(norms), device, dtype, opts);
    // Random blocks are written straight into place: no dequantized temporary.
    if opts.keep == KeepWeights::QuantizedOnly {
        need.load_transient = quantized_bytes((cfg.vocab_size * h) as u64, quant_type(h));
    }
    need
}

/// Memory this process may still use, and what limits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Available {
    pub bytes: u64,
    pub source: String,
}

/// The environment variable that sets the limit (bytes, or with a K/M/G
/// suffix) in place of what the system reports: for tests.
pub const LIMIT_ENV: &str = "SCALPEL_MEMORY_LIMIT";

/// The tightest of: `SCALPEL_MEMORY_LIMIT` (alone, when set), the cgroup's
/// limit less what it uses, the address-space limit (`ulimit -v`) less what
/// is mapped, and the kernel's `MemAvailable`. `None` when none is known.
pub fn available() -> Result<Option<Available>> {
    if let Ok(v) = std::env::var(LIMIT_ENV) {
        let bytes = parse_size(&v).ok_or_else(|| {
            anyhow::anyhow!("{LIMIT_ENV}={v} is not a size (bytes, or a number with K, M or G)")
        })?;
        return Ok(Some(Available {
            bytes,
            source: format!("{LIMIT_ENV}={v}"),
        }));
    }
    let candidates = [
        cgroup_available().map(|b| (b, "the cgroup memory limit less its use")),
        address_space_available().map(|b| (b, "the address-space limit (ulimit -v) less its use")),
        meminfo_available().map(|b| (b, "MemAvailable in /proc/meminfo")),
    ];
    Ok(candidates
        .into_iter()
        .flatten()
        .min_by_key(|(b, _)| *b)
        .map(|(bytes, source)| Available {
            bytes,
            source: source.into(),
        }))
}

/// Refuses a load whose estimate exceeds what is available. `quantized_only`
/// is the estimate without dense copies, to suggest when it would fit.
pub fn check(
    what: &str,
    need: &MemoryNeed,
    quantized_only: Option<&MemoryNeed>,
    opts: &LoadOptions,
) -> Result<()> {
    let Some(avail) = available()? else {
        return Ok(());
    };
    if need.total() <= avail.bytes {
        return Ok(());
    }
    let mut advice = Vec::new();
    if let Some(q) = quantized_only {
        if opts.keep == KeepWeights::Both {
            let fits = if q.total() <= avail.bytes {
                "fits"
            } else {
                "does not fit either"
            };
            advice.push(format!(
                "use --weights quantized (no f32 copies: about {}, {fits})",
                gib(q.total())
            ));
        }
    }
    if need.kv_cache + need.activations > avail.bytes / 8 {
        advice.push(format!(
            "use a smaller context (now {} tokens × {} sequence(s); --window, --context, -n, --threads)",
            opts.context_tokens, opts.sequences
        ));
    }
    advice.push("or run on a machine with more memory".into());
    bail!(
        "{what} needs about {} of memory ({}), but only {} is available ({}); {}",
        gib(need.total()),
        need.describe(),
        gib(avail.bytes),
        avail.source,
        advice.join(", ")
    )
}

/// `12G`, `512M`, `1048576`, `1.5G` (binary units).
pub fn parse_size(s: &str) -> Option<u64> {
    // `512MiB`, `512MB` and `512M` alike.
    let s = s
        .trim()
        .trim_end_matches(['B', 'b'])
        .trim_end_matches(['i', 'I']);
    let (num, mult) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return None,
            };
            (s[..i].trim(), mult)
        }
        _ => (s, 1),
    };
    let n: f64 = num.parse().ok()?;
    (n.is_finite() && n >= 0.0).then_some((n * mult as f64) as u64)
}

pub fn gib(bytes: u64) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if g >= 1.0 {
        format!("{g:.1} GiB")
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// A `key: value kB` line of a /proc file, in bytes.
fn proc_kb(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..]
        .trim_start_matches(':')
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn meminfo_available() -> Option<u64> {
    proc_kb(&read("/proc/meminfo")?, "MemAvailable")
}

/// cgroup v2: `memory.max` less the anonymous memory in use (page cache
/// is reclaimable).
fn cgroup_available() -> Option<u64> {
    let max: u64 = read("/sys/fs/cgroup/memory.max")?.trim().parse().ok()?;
    let used = read("/sys/fs/cgroup/memory.stat")
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("anon ").and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or(0u64);
    Some(max.saturating_sub(used))
}

/// `ulimit -v`: the address-space limit less what is mapped now.
fn address_space_available() -> Option<u64> {
    let limits = read("/proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))?;
    let soft = line.split_whitespace().nth(3)?;
    let limit: u64 = soft.parse().ok()?; // "unlimited" does not parse
    let mapped = proc_kb(&read("/proc/self/status")?, "VmSize").unwrap_or(0);
    Some(limit.saturating_sub(mapped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("12G"), Some(12 << 30));
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("1.5k"), Some(1536));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("-1G"), None);
    }

    #[test]
    fn quantized_only_drops_the_dense_copies() {
        let cfg = crate::model::synthetic::config("llama-8b").unwrap();
        let q4k = |_: usize| GgmlDType::Q4K;
        let both = LoadOptions::default();
        let qonly = LoadOptions {
            keep: KeepWeights::QuantizedOnly,
            ..both
        };
        let a = estimate_synthetic(&cfg, q4k, &Device::Cpu, DType::F32, &both);
        let b = estimate_synthetic(&cfg, q4k, &Device::Cpu, DType::F32, &qonly);
        // 8.0e9 parameters: ~30 GiB as f32; Q4_K is 4.5 bits a weight (~4.2 GiB).
        assert!((29.0..31.0).contains(&(a.weights() as f64 / (1u64 << 30) as f64)));
        let q = b.weights() as f64 / (1u64 << 30) as f64;
        assert!((4.0..4.5).contains(&q), "{q}");
        assert_eq!(a.kv_cache, b.kv_cache);
    }
}
