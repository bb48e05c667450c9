//! The lean path's row operations on plain f32 slices: no tensors, no
//! allocation. Each works row by row, so a row's result never depends on
//! how many rows a pass carries (a decode step and a speculative verify
//! compute each row alike).

pub use crate::kernels::Shared;
use crate::model::config::RopeLayout;
use crate::model::fused::exp_in_place;

const LANES: usize = 16;

/// Σ a·b, in 16 interleaved partial sums so the loop vectorises.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_body(a, b)
}

#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    // A tree, not a running sum: 15 dependent adds per call made the
    // attention scores latency-bound (45% of a decode step at 2k context).
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0] + tail
}

/// `y += a·x`.
#[inline(always)]
fn axpy_body(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Rows of `q.len()` values in `m`, row `i` at `start + i · stride`.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub m: &'a [f32],
    pub start: usize,
    pub stride: usize,
}

impl<'a> Strided<'a> {
    #[inline(always)]
    fn row(&self, i: usize, len: usize) -> &'a [f32] {
        &self.m[self.start + i * self.stride..][..len]
    }
}

/// `s[i] = dot(q, keys row i) · scale` for every i of `s`: one dispatch for all
/// keys (a call per key cost as much as its 64-element dot), the same bits as
/// `dot` per key.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
pub fn scaled_dots(q: &[f32], keys: Strided, scale: f32, s: &mut [f32]) {
    for (i, si) in s.iter_mut().enumerate() {
        *si = dot_body(q, keys.row(i, q.len())) * scale;
    }
}

/// `o += Σ p[i] · values row i`, one row after another.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
pub fn weighted_sum(o: &mut [f32], p: &[f32], values: Strided) {
    let len = o.len();
    for (i, &pi) in p.iter().enumerate() {
        axpy_body(o, pi, values.row(i, len));
    }
}

/// RMSNorm of each row of `x` (rows of `w.len()`) into `out`, as candle's
/// `rms_norm`: x / sqrt(mean(x²) + eps) · w.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let m = rms(xr, eps);
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v / m * g;
        }
    }
}

/// `rms_norm` in place: each run of `w.len()` values (a row, or a head of
/// a row) scaled by its RMS and by `w`.
pub fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    for xr in x.chunks_exact_mut(w.len()) {
        let m = rms(xr, eps);
        for (v, &g) in xr.iter_mut().zip(w) {
            *v = *v / m * g;
        }
    }
}

/// sqrt(mean(x²) + eps).
fn rms(x: &[f32], eps: f32) -> f32 {
    (dot(x, x) / x.len() as f32 + eps).sqrt()
}

/// Rotary embedding in place of `heads` heads of `head_dim` per row of `x`
/// (rows of `heads · head_dim`), row `r` at `positions[r]`; `cos`/`sin` are
/// the model's tables, `head_dim / 2` values per position.
pub fn rope(
    x: &mut [f32],
    positions: &[u32],
    head_dim: usize,
    layout: RopeLayout,
    cos: &[f32],
    sin: &[f32],
) {
    let half = head_dim / 2;
    let row = x.len() / positions.len().max(1);
    for (xr, &p) in x.chunks_exact_mut(row).zip(positions) {
        let at = p as usize * half;
        let (c, s) = (&cos[at..at + half], &sin[at..at + half]);
        for h in xr.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (a, b) = match layout {
                    RopeLayout::Halves => (i, i + half),
                    RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                };
                let (x0, x1) = (h[a], h[b]);
                h[a] = x0 * c[i] - x1 * s[i];
                h[b] = x0 * s[i] + x1 * c[i];
            }
        }
    }
}

/// `gate = silu(gate) · up`, as `fused::silu_mul`: g · sigmoid(g).
pub fn silu_mul_in_place(gate: &mut [f32], up: &[f32], scratch: &mut [f32]) {
    sigmoid_gate_mul(gate, up, scratch, |g| g)
}

/// `gate = gelu_tanh(gate) · up`, GELU's tanh approximation written as
/// g · sigmoid(2u), u = √(2/π)(g + 0.044715 g³) (0.5(1 + tanh u) = sigmoid(2u)).
pub fn gelu_tanh_mul_in_place(gate: &mut [f32], up: &[f32], scratch: &mut [f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    sigmoid_gate_mul(gate, up, scratch, |g| {
        2.0 * SQRT_2_OVER_PI * (g + 0.044_715 * g * g * g)
    })
}

/// `gate = g · sigmoid(arg(g)) · up`: exp(-arg) vectorised into `scratch`
/// (as long as `gate`), then g / (1 + exp(-arg)) · up.
#[inline(always)]
fn sigmoid_gate_mul(gate: &mut [f32], up: &[f32], scratch: &mut [f32], arg: impl Fn(f32) -> f32) {
    for (e, &g) in scratch.iter_mut().zip(gate.iter()) {
        *e = -arg(g);
    }
    exp_in_place(scratch);
    for ((g, u), e) in gate.iter_mut().zip(up).zip(scratch.iter()) {
        *g = *g / (1.0 + e) * u;
    }
}

/// `x = b·block + s·x`, the scaled residual, with the candle path's
/// arithmetic (a scale of 1 multiplies nothing).
pub fn residual(x: &mut [f32], block: &[f32], b: f32, s: f32) {
    for (x, &a) in x.iter_mut().zip(block) {
        let a = if b == 1.0 { a } else { a * b };
        let v = if s == 1.0 { *x } else { *x * s };
        *x = a + v;
    }
}

/// `x = s·x` (a skipped block's residual).
pub fn scale(x: &mut [f32], s: f32) {
    if s != 1.0 {
        x.iter_mut().for_each(|v| *v *= s);
    }
}

/// Adds `bias` to every row of `y`.
pub fn add_bias(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// Softmax in place, with the f64 sum of `fused`'s kernel.
pub fn softmax_in_place(s: &mut [f32]) {
    let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    s.iter_mut().for_each(|v| *v -= m);
    exp_in_place(s);
    let sum: f64 = s.iter().map(|&v| f64::from(v)).sum();
    let inv = (1.0 / sum) as f32;
    s.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_a_plain_sum_on_odd_lengths() {
        for n in [1, 15, 16, 17, 64, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(x * y)).sum();
            assert!((f64::from(dot(&a, &b)) - plain).abs() < 1e-5, "n = {n}");
        }
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut s = vec![1.0, 3.0, 2.0, -50.0];
        softmax_in_place(&mut s);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(s[1] > s[2] && s[2] > s[0] && s[0] > s[3]);
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_keeps_norms() {
        let hd = 8;
        let (cos, sin): (Vec<f32>, Vec<f32>) = (0..2 * hd / 2)
            .map(|i| {
                let a = (i / (hd / 2)) as f32 * 0.3 * (1 + i % (hd / 2)) as f32;
                (a.cos(), a.sin())
            })
            .unzip();
        for layout in [RopeLayout::Halves, RopeLayout::Interleaved] {
            let x: Vec<f32> = (0..2 * hd).map(|i| i as f32 - 3.0).collect();
            let mut at0 = x.clone();
            rope(&mut at0, &[0, 0], hd, layout, &cos, &sin);
            assert_eq!(at0, x);
            let mut at1 = x.clone();
            rope(&mut at1, &[1, 1], hd, layout, &cos, &sin);
            assert_ne!(at1, x);
            let norm = |v: &[f32]| dot(v, v);
            assert!((norm(&at1) - norm(&x)).abs() < 1e-3);
        }
    }
}
