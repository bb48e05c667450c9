//! Portable kernels: one weight row against activation rows, integer dot products per block.
//!
//! These are the reference the SIMD variants are tested against, and the fallback on CPUs
//! without AVX2. Each output is computed on its own, so a row's result never depends on how many
//! rows or threads share the call.

use super::acts::Acts;
use super::formats::{f16_at, scale_min_k4, Format};

/// y[i] = dot(weight row `w`, activation row `r0 + i`) for i in 0..out.len().
pub(crate) fn dot_rows(format: Format, w: &[u8], acts: &Acts, r0: usize, out: &mut [f32]) {
    for (i, y) in out.iter_mut().enumerate() {
        *y = dot_row(format, w, acts, r0 + i);
    }
}

fn dot_row(format: Format, w: &[u8], acts: &Acts, r: usize) -> f32 {
    let n = acts.in_dim;
    let x = &acts.qs[r * n..(r + 1) * n];
    let bl = format.block_elems();
    let nb = n / bl;
    let d = &acts.d[r * nb..(r + 1) * nb];
    let s16 = &acts.sums16[r * n / 16..(r + 1) * n / 16];
    let blocks = w.chunks_exact(format.block_bytes()).take(nb);
    let mut acc = 0f32;
    for (b, blk) in blocks.enumerate() {
        let xb = &x[b * bl..(b + 1) * bl];
        let sb = &s16[b * bl / 16..(b + 1) * bl / 16];
        // The 32-element formats take the tiled SIMD kernels' exact arithmetic (integer dot, then
        // one fused multiply-add per term), so every variant gives these formats the same bits.
        // Their blocks start with the f16 scale (the K-quants' do not).
        let dwdx = || f16_at(blk, 0) * d[b];
        acc = match format {
            Format::Q4_0 => (q4_dot(&blk[2..18], xb, 8) as f32).mul_add(dwdx(), acc),
            Format::Q4_1 => {
                let acc = (q4_dot(&blk[4..20], xb, 0) as f32).mul_add(dwdx(), acc);
                f16_at(blk, 2).mul_add(acts.dsum[r * nb + b], acc)
            }
            Format::Q5_0 => (q5_dot(&blk[2..6], &blk[6..22], xb, 16) as f32).mul_add(dwdx(), acc),
            Format::Q5_1 => {
                let acc = (q5_dot(&blk[4..8], &blk[8..24], xb, 0) as f32).mul_add(dwdx(), acc);
                f16_at(blk, 2).mul_add(acts.dsum[r * nb + b], acc)
            }
            Format::Q8_0 => {
                let sumi: i32 = blk[2..34]
                    .iter()
                    .zip(xb)
                    .map(|(&w, &x)| w as i8 as i32 * x as i32)
                    .sum();
                (sumi as f32).mul_add(dwdx(), acc)
            }
            Format::Q4K => acc + d[b] * q4k_dot(blk, xb, sb),
            Format::Q5K => acc + d[b] * q5k_dot(blk, xb, sb),
            Format::Q6K => acc + d[b] * q6k_dot(blk, xb),
        };
    }
    acc
}

/// Sum over a 32-block of (nibble - offset) * x; byte j holds elements j (low) and j + 16 (high).
fn q4_dot(qs: &[u8], x: &[i8], offset: i32) -> i32 {
    let mut sum = 0i32;
    for j in 0..16 {
        sum += ((qs[j] & 0xF) as i32 - offset) * x[j] as i32;
        sum += ((qs[j] >> 4) as i32 - offset) * x[j + 16] as i32;
    }
    sum
}

/// As `q4_dot` with the fifth bit of element j in bit j of `qh`.
fn q5_dot(qh: &[u8], qs: &[u8], x: &[i8], offset: i32) -> i32 {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut sum = 0i32;
    for j in 0..16 {
        let lo = (qs[j] & 0xF) as i32 | ((((qh >> j) & 1) as i32) << 4);
        let hi = (qs[j] >> 4) as i32 | ((((qh >> (j + 16)) & 1) as i32) << 4);
        sum += (lo - offset) * x[j] as i32 + (hi - offset) * x[j + 16] as i32;
    }
    sum
}

/// One Q4_K super-block (d, dmin, 12 scale bytes, 128 nibble bytes) against x, unscaled by x's d.
fn q4k_dot(blk: &[u8], x: &[i8], s16: &[i16]) -> f32 {
    let (dd, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
    let scales = &blk[4..16];
    let qs = &blk[16..144];
    let (mut sum, mut mins) = (0i32, 0i32);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, scales);
        let q = &qs[32 * (j / 2)..32 * (j / 2) + 32];
        let shift = 4 * (j % 2);
        let xs = &x[32 * j..32 * j + 32];
        let dot: i32 = q
            .iter()
            .zip(xs)
            .map(|(&q, &x)| ((q >> shift) & 0xF) as i32 * x as i32)
            .sum();
        sum += sc as i32 * dot;
        mins += m as i32 * (s16[2 * j] as i32 + s16[2 * j + 1] as i32);
    }
    dd * sum as f32 - dmin * mins as f32
}

/// One Q5_K super-block (d, dmin, 12 scale bytes, 32 high-bit bytes, 128 nibble bytes).
fn q5k_dot(blk: &[u8], x: &[i8], s16: &[i16]) -> f32 {
    let (dd, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
    let scales = &blk[4..16];
    let qh = &blk[16..48];
    let qs = &blk[48..176];
    let (mut sum, mut mins) = (0i32, 0i32);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, scales);
        let q = &qs[32 * (j / 2)..32 * (j / 2) + 32];
        let shift = 4 * (j % 2);
        let xs = &x[32 * j..32 * j + 32];
        let mut dot = 0i32;
        for l in 0..32 {
            let v = ((q[l] >> shift) & 0xF) as i32 | ((((qh[l] >> j) & 1) as i32) << 4);
            dot += v * xs[l] as i32;
        }
        sum += sc as i32 * dot;
        mins += m as i32 * (s16[2 * j] as i32 + s16[2 * j + 1] as i32);
    }
    dd * sum as f32 - dmin * mins as f32
}

/// One Q6_K super-block (128 low-nibble bytes, 64 high-bit bytes, 16 i8 scales, d).
fn q6k_dot(blk: &[u8], x: &[i8]) -> f32 {
    let ql = &blk[0..128];
    let qh = &blk[128..192];
    let sc = &blk[192..208];
    let dd = f16_at(blk, 208);
    let mut sums = [0i32; 16];
    for n in 0..2 {
        let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
        for l in 0..32 {
            let q = [
                (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (k, &q) in q.iter().enumerate() {
                let e = 128 * n + 32 * k + l;
                sums[e / 16] += (q as i32 - 32) * x[e] as i32;
            }
        }
    }
    let total: i32 = sums.iter().zip(sc).map(|(&s, &c)| s * c as i8 as i32).sum();
    dd * total as f32
}
