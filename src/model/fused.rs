//! Fused CPU kernels for the fast path.
//!
//! candle runs each op as its own pass over memory with a fresh allocation,
//! and its `exp` is the scalar libm call. On a small model that overhead is a
//! large share of the time (measured with `perf`: attention softmax, the mask
//! add, log-softmax over the vocabulary and SiLU·mul were ~30% of `eval`).
//! These ops do the same work in one pass each, with a vectorised `exp`.
//! On other devices, and in the differentiable mode, the plain candle ops run
//! instead; tests hold both paths equal.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Rows per rayon task: enough work to amortise the hand-off.
const MIN_ROW_ELEMS: usize = 16 * 1024;

/// `exp` for every element, in place. Cephes' single-precision algorithm
/// (range reduction by ln 2, degree-5 polynomial), branch-free so the loop
/// vectorises; relative error below 2e-7 over the whole f32 range, 0 for
/// inputs below -87.3 (where the true value is subnormal or zero).
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
pub fn exp_in_place(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = exp_approx(*x);
    }
}

#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so `x - n·ln2` keeps full precision.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let underflow = x < -87.336_55;
    let x = x.clamp(-87.336_55, 88.376_26);
    // n = round(x·log2 e): adding 1.5·2^23 leaves n in the low mantissa bits,
    // which (unlike `as i32`, a scalar saturating cast) vectorises.
    const SHIFT: f32 = 12_582_912.0;
    let shifted = x * LOG2E + SHIFT;
    let n = shifted - SHIFT;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    let exponent = shifted
        .to_bits()
        .wrapping_sub(SHIFT.to_bits())
        .wrapping_add(127);
    let scale = f32::from_bits(exponent << 23);
    if underflow {
        0.0
    } else {
        e * scale
    }
}

const LANES: usize = 16;

/// Sum with f64 partial sums, 16 interleaved so the loop vectorises. A
/// running f32 sum drops the many tiny terms of a softmax over a large
/// vocabulary once it nears 1 (that biased perplexity by 1e-4 relative).
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn sum(xs: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().map(|&x| f64::from(x)).sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f64::from(x);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Σ e·(x − y) with f64 partial sums.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn weighted_difference(e: &[f32], x: &[f32], y: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let mut i = 0;
    while i + LANES <= e.len() {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f64::from(e[i + l] * (x[i + l] - y[i + l]));
        }
        i += LANES;
    }
    let tail: f64 = (i..e.len()).map(|j| f64::from(e[j] * (x[j] - y[j]))).sum();
    acc.iter().sum::<f64>() + tail
}

/// Maximum, lane by lane so it vectorises (no NaNs expected in logits).
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// `dst = softmax(src)`.
fn softmax_into(src: &[f32], dst: &mut [f32]) {
    let max = max(src);
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s - max;
    }
    exp_in_place(dst);
    let inv = (1.0 / sum(dst)) as f32;
    for d in dst.iter_mut() {
        *d *= inv;
    }
}

/// Row `r` of the scores is query `first + (r / per_position) % queries`
/// of a mask's ranges; it sees keys `ranges[q].0 - key_offset ..
/// ranges[q].1 - key_offset` of the scores' columns.
pub(crate) struct RangeSoftmax {
    pub ranges: std::sync::Arc<Vec<(u32, u32)>>,
    pub first: usize,
    pub queries: usize,
    pub per_position: usize,
    pub key_offset: usize,
}

impl CustomOp1 for RangeSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout)?;
        let keys = layout.dims().last().copied().unwrap_or(1);
        let mut dst = vec![0f32; src.len()];
        let rows_per_task = (MIN_ROW_ELEMS / keys).max(1);
        dst.par_chunks_mut(rows_per_task * keys)
            .zip(src.par_chunks(rows_per_task * keys))
            .enumerate()
            .for_each(|(chunk, (rows, src_rows))| {
                let src_rows = src_rows.chunks(keys);
                for (k, (row, src)) in rows.chunks_mut(keys).zip(src_rows).enumerate() {
                    let r = chunk * rows_per_task + k;
                    let q = self.first + (r / self.per_position) % self.queries;
                    let (lo, hi) = self.ranges[q];
                    let lo = (lo as usize).saturating_sub(self.key_offset).min(keys);
                    let hi = (hi as usize).saturating_sub(self.key_offset).min(keys);
                    if lo < hi {
                        softmax_into(&src[lo..hi], &mut row[lo..hi]);
                    }
                }
            });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// What one scored position contributes to perplexity, KL and agreement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowScore {
    /// −log p_plan(target).
    pub nll: f64,
    /// KL(base ‖ plan) in nats; 0 without a base row.
    pub kl: f64,
    /// The base and the plan have the same most likely token.
    pub agree: bool,
}

/// Scores rows of logits (rows × vocab, row-major) against their target
/// tokens, and against the base model's logits when given, in two passes
/// over each row and no row-sized temporaries: log-sum-exp from the max and
/// a sum of exps; KL(base ‖ plan) = Σ p_b (x_b − x_p) + lse_p − lse_b.
pub fn score_rows(plan: &[f32], base: Option<&[f32]>, targets: &[u32]) -> Vec<RowScore> {
    let vocab = plan.len() / targets.len().max(1);
    targets
        .par_iter()
        .enumerate()
        .map(|(r, &target)| {
            let xp = &plan[r * vocab..(r + 1) * vocab];
            let ((max_p, sum_p), _) = exp_moments(xp, None);
            let lse_p = f64::from(max_p) + sum_p.ln();
            let nll = lse_p - f64::from(xp[target as usize]);
            let Some(base) = base else {
                return RowScore {
                    nll,
                    kl: 0.0,
                    agree: true,
                };
            };
            let xb = &base[r * vocab..(r + 1) * vocab];
            let ((max_b, sum_b), weighted) = exp_moments(xb, Some(xp));
            let lse_b = f64::from(max_b) + sum_b.ln();
            RowScore {
                nll,
                kl: weighted / sum_b + lse_p - lse_b,
                agree: argmax(xb) == argmax(xp),
            }
        })
        .collect()
}

/// ((max, Σ exp(x − max)), Σ exp(x − max)·(x − other)) for one row, the
/// exps computed a block at a time on the stack.
fn exp_moments(xs: &[f32], other: Option<&[f32]>) -> ((f32, f64), f64) {
    const BLOCK: usize = 1024;
    let max = max(xs);
    let mut buf = [0f32; BLOCK];
    let (mut total, mut weighted) = (0.0, 0.0);
    for (i, chunk) in xs.chunks(BLOCK).enumerate() {
        let e = &mut buf[..chunk.len()];
        for (e, x) in e.iter_mut().zip(chunk) {
            *e = x - max;
        }
        exp_in_place(e);
        total += sum(e);
        if let Some(other) = other {
            let o = &other[i * BLOCK..i * BLOCK + chunk.len()];
            weighted += weighted_difference(e, chunk, o);
        }
    }
    ((max, total), weighted)
}

/// Index of the first largest value.
fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Runs `f` on a tensor's f32 values when they are contiguous in CPU
/// memory, without copying them; `None` otherwise.
pub fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) => {
            Some(f(&v[start..end]))
        }
        _ => None,
    }
}

/// `silu(gate) · up`, the gated MLP's activation, in one pass.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !gate.device().is_cpu() || gate.dtype() != DType::F32 {
        return gate.silu()? * up;
    }
    gate.contiguous()?
        .apply_op2_no_bwd(&up.contiguous()?, &SiluMul)
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if gate_layout.shape() != up_layout.shape() {
            candle_core::bail!(
                "silu-mul: gate {:?} and up {:?} differ in shape",
                gate_layout.shape(),
                up_layout.shape()
            );
        }
        let gate = contiguous_f32(gate, gate_layout)?;
        let up = contiguous_f32(up, up_layout)?;
        // exp(-g) first, vectorised, then g / (1 + exp(-g)) · up.
        let mut dst: Vec<f32> = gate.iter().map(|g| -g).collect();
        dst.par_chunks_mut(MIN_ROW_ELEMS)
            .zip(gate.par_chunks(MIN_ROW_ELEMS))
            .zip(up.par_chunks(MIN_ROW_ELEMS))
            .for_each(|((d, g), u)| {
                exp_in_place(d);
                for ((d, g), u) in d.iter_mut().zip(g).zip(u) {
                    *d = g / (1.0 + *d) * u;
                }
            });
        Ok((CpuStorage::F32(dst), gate_layout.shape().clone()))
    }
}

/// `x · Wᵀ` for `x` (..., in) and `weight` (out, in). candle's matmul
/// zero-fills its output before the product overwrites it (a `memset` of
/// every activation, ~4% of `eval`); this writes the product straight into
/// fresh memory.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (out, inp) = weight.dims2()?;
    let fused = x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32;
    if !fused || x.dim(D::Minus1)? != inp {
        return x.broadcast_matmul(&weight.t()?);
    }
    let mut dims = x.dims().to_vec();
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x
        .reshape((rows, inp))?
        .contiguous()?
        .apply_op2_no_bwd(&weight.contiguous()?, &Linear)?;
    if let Some(last) = dims.last_mut() {
        *last = out;
    }
    y.reshape(dims)
}

struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = x_layout.shape().dims2()?;
        let (n, _) = w_layout.shape().dims2()?;
        let x = contiguous_f32(x, x_layout)?;
        let w = contiguous_f32(w, w_layout)?;
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        let mut dst: Vec<f32> = Vec::with_capacity(m * n);
        // SAFETY: x is m×k row-major, w is n×k row-major (read as the k×n
        // matrix Wᵀ through its strides), dst has room for m×n values, and
        // with `read_dst = false` gemm writes every one of them before the
        // length is set.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
            dst.set_len(m * n);
        }
        Ok((CpuStorage::F32(dst), Shape::from((m, n))))
    }
}

/// The f32 elements of a contiguous tensor's storage.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(d) => d.as_slice(),
        s => candle_core::bail!("fused kernel: expected f32, got {:?}", s.dtype()),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fused kernel: input is not contiguous"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Device;

    fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / y.abs().max(1e-30))
            .fold(0.0, f32::max)
    }

    #[test]
    fn exp_matches_libm_over_the_f32_range() {
        let xs: Vec<f32> = (0..200_001)
            .map(|i| -87.0 + i as f32 * 1e-3 * 0.8)
            .collect();
        let mut ours = xs.clone();
        exp_in_place(&mut ours);
        let want: Vec<f32> = xs.iter().map(|x| x.exp()).collect();
        assert!(
            max_rel_err(&ours, &want) < 3e-7,
            "{}",
            max_rel_err(&ours, &want)
        );
        let mut edge = vec![f32::NEG_INFINITY, -1000.0, -87.4, 0.0, 88.0];
        exp_in_place(&mut edge);
        assert_eq!(&edge[..4], &[0.0, 0.0, 0.0, 1.0]);
        assert!((edge[4] / 88f32.exp() - 1.0).abs() < 1e-6);
    }

    fn random(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 3.0, shape, &Device::Cpu).unwrap()
    }

    /// Panics unless `a` and `b` differ by less than `tol` everywhere.
    pub(crate) fn assert_close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < tol, "max abs diff {d}");
    }

    #[test]
    fn linear_matches_matmul() {
        let w = random(&[70, 33]);
        for x in [
            random(&[2, 5, 33]),
            random(&[1, 33]),
            random(&[33, 4]).t().unwrap(),
        ] {
            let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
            assert_close(&linear(&x, &w).unwrap(), &want, 1e-4);
        }
    }

    #[test]
    fn scores_keep_the_tiny_terms_of_a_large_vocabulary() {
        // One dominant logit and 49,151 small ones: each small term is far
        // below half an ulp of an f32 running sum near 1, so a naive sum
        // drops them all.
        let mut row = vec![-12f32; 49_152];
        row[0] = 5.0;
        let got = score_rows(&row, None, &[0])[0].nll;
        let want = (1.0 + 49_151.0 * (-17f64).exp()).ln();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn scores_match_candle_log_softmax() {
        let (rows, vocab) = (5, 3000);
        let plan = random(&[rows, vocab]);
        let base = random(&[rows, vocab]);
        let targets: Vec<u32> = vec![0, 17, 2999, 1500, 3];
        let lp = candle_nn::ops::log_softmax(&plan, D::Minus1).unwrap();
        let lb = candle_nn::ops::log_softmax(&base, D::Minus1).unwrap();
        let lp2: Vec<Vec<f32>> = lp.to_vec2().unwrap();
        let kl: Vec<f32> = (lb.exp().unwrap() * (&lb - &lp).unwrap())
            .unwrap()
            .sum(D::Minus1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let am_p: Vec<u32> = plan.argmax(D::Minus1).unwrap().to_vec1().unwrap();
        let am_b: Vec<u32> = base.argmax(D::Minus1).unwrap().to_vec1().unwrap();
        let got = with_cpu_f32(&plan, |p| {
            with_cpu_f32(&base, |b| score_rows(p, Some(b), &targets)).unwrap()
        })
        .unwrap();
        for r in 0..rows {
            let nll = -f64::from(lp2[r][targets[r] as usize]);
            assert!(
                (got[r].nll - nll).abs() < 1e-4,
                "row {r}: {} vs {nll}",
                got[r].nll
            );
            assert!((got[r].kl - f64::from(kl[r])).abs() < 1e-4, "row {r} kl");
            assert_eq!(got[r].agree, am_p[r] == am_b[r]);
        }
        // A plan scored against itself: no divergence, full agreement.
        let same = with_cpu_f32(&plan, |p| score_rows(p, Some(p), &targets)).unwrap();
        assert!(same.iter().all(|s| s.kl.abs() < 1e-9 && s.agree));
        // A strided view is not contiguous: the caller must fall back.
        assert!(with_cpu_f32(&plan.t().unwrap(), |_| ()).is_none());
    }

    #[test]
    fn silu_mul_matches_candle() {
        let (g, u) = (random(&[3, 40_000]), random(&[3, 40_000]));
        let want = (g.silu().unwrap() * &u).unwrap();
        assert_close(&silu_mul(&g, &u).unwrap(), &want, 1e-5);
        // A strided input is made contiguous first.
        let gt = random(&[40, 30]).t().unwrap();
        let ut = random(&[30, 40]);
        let want = (gt.silu().unwrap() * &ut).unwrap();
        assert_close(&silu_mul(&gt, &ut).unwrap(), &want, 1e-5);
        assert_eq!(silu_mul(&gt, &ut).unwrap().dtype(), DType::F32);
    }
}
