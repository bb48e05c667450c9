//! The activation rows quantized once per call to 8-bit blocks.

use super::formats::ActKind;

/// `rows` activation rows quantized symmetrically to i8 with one f32 scale per block.
#[derive(Default)]
pub(crate) struct Acts {
    pub(crate) rows: usize,
    pub(crate) in_dim: usize,
    /// rows x in_dim quantized values, row-major.
    pub(crate) qs: Vec<i8>,
    /// One scale per block (32 or 256 elements), rows x blocks.
    pub(crate) d: Vec<f32>,
    /// B32: per 32-block, `d * sum(q)` (Q4_1/Q5_1's min term). B256: unused.
    pub(crate) dsum: Vec<f32>,
    /// Per block, `sum(q)` (the offsets of Q4_0, Q5_0 and the tiled Q8_0, taken in integers).
    pub(crate) qsum: Vec<i32>,
    /// Sum of q per 16 elements, rows x (in_dim / 16) (the K-quants' min and offset terms).
    pub(crate) sums16: Vec<i16>,
}

impl Acts {
    /// Quantizes `x` (rows x in_dim) in place of the previous contents.
    pub(crate) fn quantize(&mut self, x: &[f32], rows: usize, in_dim: usize, kind: ActKind) {
        let bl = block_len(kind);
        debug_assert_eq!(in_dim % bl, 0);
        let nb = in_dim / bl;
        self.rows = rows;
        self.in_dim = in_dim;
        self.qs.resize(rows * in_dim, 0);
        self.d.resize(rows * nb, 0.0);
        self.dsum.resize(rows * nb, 0.0);
        self.qsum.resize(rows * nb, 0);
        self.sums16.resize(rows * in_dim / 16, 0);
        for (b, (xb, qb)) in x[..rows * in_dim]
            .chunks_exact(bl)
            .zip(self.qs.chunks_exact_mut(bl))
            .enumerate()
        {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            for (q, v) in qb.iter_mut().zip(xb) {
                *q = round_small(v * id) as i8;
            }
            let mut total = 0i32;
            for (s, q16) in self.sums16[b * bl / 16..(b + 1) * bl / 16]
                .iter_mut()
                .zip(qb.chunks_exact(16))
            {
                let s16: i32 = q16.iter().map(|&q| q as i32).sum();
                *s = s16 as i16;
                total += s16;
            }
            self.d[b] = d;
            self.dsum[b] = d * total as f32;
            self.qsum[b] = total;
        }
    }
}

/// `v` (|v| <= 2^22) rounded to the nearest integer, ties to even, in a form the compiler
/// vectorises: `f32::round` is a libm call per element (3% of a decode step).
#[inline(always)]
fn round_small(v: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: its ulp is 1, so the sum is rounded.
    (v + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32
}

pub(crate) fn block_len(kind: ActKind) -> usize {
    match kind {
        ActKind::B32 => 32,
        ActKind::B256 => 256,
    }
}

#[cfg(test)]
mod tests {
    use super::round_small;

    #[test]
    fn round_small_rounds_to_nearest_with_ties_to_even() {
        for (v, want) in [
            (0.0, 0),
            (0.49, 0),
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (-126.7, -127),
            (126.6, 127),
            (-3.2, -3),
        ] {
            assert_eq!(round_small(v), want, "{v}");
        }
    }
}
