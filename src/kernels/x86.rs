//! AVX2 and AVX-512 VNNI kernels (256-bit vectors; VNNI replaces `maddubs`+`madd` by `vpdpbusd`).
//!
//! The 32-element formats run the tiled kernels (`tiled`). The K-quants' kernels here unpack one
//! weight row once per block and dot it with up to `ROW_GROUP` activation rows,
//! each with its own accumulators: a row's arithmetic is the same whatever the group size, which
//! keeps results bit-identical across row counts. Both variants compute the same integers (no
//! saturation is possible at these ranges), so they differ from the portable kernel only in the
//! order of the float additions.
// The kernels index several per-row arrays (accumulators, scales, activation
// blocks) in lockstep; index loops say that more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::acts::Acts;
use super::formats::{scale_min_k4, Format};
use super::quant::ROW_GROUP;
use super::tiles::TileLayout;
use super::Kernel;

/// Runs the SIMD kernel for `format`; false means "use the portable one".
pub(crate) fn dot_rows(
    kernel: Kernel,
    format: Format,
    w: &[u8],
    acts: &Acts,
    r0: usize,
    out: &mut [f32],
) -> bool {
    if TileLayout::of(format).is_some() {
        return false;
    }
    assert!(out.len() <= ROW_GROUP && r0 + out.len() <= acts.rows);
    assert!(w.len() >= acts.in_dim / format.block_elems() * format.block_bytes());
    // SAFETY: the variant is only chosen when `Kernel::available` says the CPU has it; the
    // bounds above cover every load.
    match kernel {
        Kernel::Avx512Vnni => unsafe { vnni_entry(format, w.as_ptr(), acts, r0, out) },
        Kernel::Avx2 => unsafe { avx2_entry(format, w.as_ptr(), acts, r0, out) },
        Kernel::Portable => return false,
    }
    true
}

/// `acc + sum of 4 adjacent u8*i8 products` per i32 lane, and `acc + i16 pair products`.
trait Dot {
    unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i;
    unsafe fn madd_acc(acc: __m256i, a: __m256i, b: __m256i) -> __m256i;
}

/// VNNI through inline assembly: its intrinsics and target feature need rustc 1.89, above the
/// crate's minimum Rust version; the instructions are only reached after runtime detection.
struct Vnni;
impl Dot for Vnni {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot(mut acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        std::arch::asm!(
            "vpdpbusd {acc}, {u}, {s}",
            acc = inout(ymm_reg) acc, u = in(ymm_reg) u, s = in(ymm_reg) s,
            options(pure, nomem, nostack, preserves_flags)
        );
        acc
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn madd_acc(mut acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        std::arch::asm!(
            "vpdpwssd {acc}, {a}, {b}",
            acc = inout(ymm_reg) acc, a = in(ymm_reg) a, b = in(ymm_reg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
        acc
    }
}

struct Avx2;
impl Dot for Avx2 {
    #[inline(always)]
    unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        let pairs = _mm256_maddubs_epi16(u, s);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
    #[inline(always)]
    unsafe fn madd_acc(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn vnni_entry(format: Format, w: *const u8, acts: &Acts, r0: usize, out: &mut [f32]) {
    dispatch::<Vnni>(format, w, acts, r0, out)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_entry(format: Format, w: *const u8, acts: &Acts, r0: usize, out: &mut [f32]) {
    dispatch::<Avx2>(format, w, acts, r0, out)
}

/// Calls the kernel instantiated for `n` activation rows (1..=8).
macro_rules! by_rows {
    ($f:ident :: <$d:ty, $($p:ty),*> ($($a:expr),*), $n:expr) => {
        match $n {
            1 => $f::<$d, $($p,)* 1>($($a),*),
            2 => $f::<$d, $($p,)* 2>($($a),*),
            3 => $f::<$d, $($p,)* 3>($($a),*),
            4 => $f::<$d, $($p,)* 4>($($a),*),
            5 => $f::<$d, $($p,)* 5>($($a),*),
            6 => $f::<$d, $($p,)* 6>($($a),*),
            7 => $f::<$d, $($p,)* 7>($($a),*),
            8 => $f::<$d, $($p,)* 8>($($a),*),
            _ => unreachable!("row groups are 1..=8"),
        }
    };
}

// After `by_rows!`, which it uses.
pub(crate) mod tiled;

#[inline(always)]
unsafe fn dispatch<D: Dot>(format: Format, w: *const u8, acts: &Acts, r0: usize, out: &mut [f32]) {
    let n = out.len();
    match format {
        // Tiled (`tiled`); their odd rows take the portable kernel, which is bit-identical.
        Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 | Format::Q8_0 => {
            unreachable!("declined in dot_rows")
        }
        Format::Q4K => by_rows!(q45k::<D, Q4K>(w, acts, r0, out), n),
        Format::Q5K => by_rows!(q45k::<D, Q5K>(w, acts, r0, out), n),
        Format::Q6K => by_rows!(q6k::<D, Q6K>(w, acts, r0, out), n),
    }
}

#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*p, *p.add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[inline(always)]
unsafe fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// Q4_K / Q5_K: 256-element super-blocks of 8 sub-blocks with 6-bit scales and mins.
trait BlockK45 {
    const BYTES: usize;
    const QS: usize;
    /// The 32 values of sub-blocks 2c (low) and 2c+1 (high).
    unsafe fn values(blk: *const u8, c: usize) -> (__m256i, __m256i);
}

struct Q4K;
impl BlockK45 for Q4K {
    const BYTES: usize = 144;
    const QS: usize = 16;
    #[inline(always)]
    unsafe fn values(blk: *const u8, c: usize) -> (__m256i, __m256i) {
        let raw = _mm256_loadu_si256(blk.add(Self::QS + 32 * c) as *const __m256i);
        let m = _mm256_set1_epi8(0x0F);
        (
            _mm256_and_si256(raw, m),
            _mm256_and_si256(_mm256_srli_epi16(raw, 4), m),
        )
    }
}

struct Q5K;
impl BlockK45 for Q5K {
    const BYTES: usize = 176;
    const QS: usize = 48;
    #[inline(always)]
    unsafe fn values(blk: *const u8, c: usize) -> (__m256i, __m256i) {
        let (lo, hi) = Q4K::values(blk.add(Self::QS - Q4K::QS), c);
        let qh = _mm256_loadu_si256(blk.add(16) as *const __m256i);
        let bit = _mm256_set1_epi8(0x10);
        // Bit j of qh[l] is the fifth bit of element l of sub-block j; move it to bit 4.
        let (hl, hh) = match c {
            0 => (_mm256_slli_epi16(qh, 4), _mm256_slli_epi16(qh, 3)),
            1 => (_mm256_slli_epi16(qh, 2), _mm256_slli_epi16(qh, 1)),
            2 => (qh, _mm256_srli_epi16(qh, 1)),
            _ => (_mm256_srli_epi16(qh, 2), _mm256_srli_epi16(qh, 3)),
        };
        (
            _mm256_or_si256(lo, _mm256_and_si256(hl, bit)),
            _mm256_or_si256(hi, _mm256_and_si256(hh, bit)),
        )
    }
}

#[inline(always)]
unsafe fn q45k<D: Dot, B: BlockK45, const R: usize>(
    w: *const u8,
    acts: &Acts,
    r0: usize,
    out: &mut [f32],
) {
    let n = acts.in_dim;
    let nb = n / 256;
    let mut acc = [0f32; R];
    for i in 0..nb {
        let blk = w.add(i * B::BYTES);
        let (d, dmin) = (f16_at(blk), f16_at(blk.add(2)));
        let scales = std::slice::from_raw_parts(blk.add(4), 12);
        let mut sc = [0i16; 8];
        let mut mins = [0i16; 16];
        for j in 0..8 {
            let (s, m) = scale_min_k4(j, scales);
            sc[j] = s as i16;
            mins[2 * j] = m as i16;
            mins[2 * j + 1] = m as i16;
        }
        let mut sumi = [_mm256_setzero_si256(); R];
        for c in 0..4 {
            let (lo, hi) = B::values(blk, c);
            let (sl, sh) = (
                _mm256_set1_epi16(sc[2 * c]),
                _mm256_set1_epi16(sc[2 * c + 1]),
            );
            for r in 0..R {
                let x = acts.qs.as_ptr().add((r0 + r) * n + i * 256 + 64 * c);
                let xl = _mm256_loadu_si256(x as *const __m256i);
                let xh = _mm256_loadu_si256(x.add(32) as *const __m256i);
                sumi[r] = D::madd_acc(sumi[r], _mm256_maddubs_epi16(lo, xl), sl);
                sumi[r] = D::madd_acc(sumi[r], _mm256_maddubs_epi16(hi, xh), sh);
            }
        }
        let mins = _mm256_loadu_si256(mins.as_ptr() as *const __m256i);
        for r in 0..R {
            let row_block = (r0 + r) * nb + i;
            let bsums =
                _mm256_loadu_si256(acts.sums16.as_ptr().add(row_block * 16) as *const __m256i);
            let m = hsum_epi32(_mm256_madd_epi16(mins, bsums));
            let dx = acts.d[row_block];
            acc[r] += d * dx * hsum_epi32(sumi[r]) as f32 - dmin * dx * m as f32;
        }
    }
    out[..R].copy_from_slice(&acc);
}

struct Q6K;

/// Q6_K: 256-element super-blocks, 6-bit values (offset 32) with 16 i8 scales of 16 elements.
#[inline(always)]
// `B` is unused: `by_rows!` passes every kernel a format marker type.
#[allow(clippy::extra_unused_type_parameters)]
unsafe fn q6k<D: Dot, B, const R: usize>(w: *const u8, acts: &Acts, r0: usize, out: &mut [f32]) {
    const BYTES: usize = 210;
    let n = acts.in_dim;
    let nb = n / 256;
    let mut acc = [0f32; R];
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(0x30);
    for i in 0..nb {
        let blk = w.add(i * BYTES);
        let d = f16_at(blk.add(208));
        let sc_bytes = _mm_loadu_si128(blk.add(192) as *const __m128i);
        let scales16 = _mm256_cvtepi8_epi16(sc_bytes);
        let mut sumi = [_mm256_setzero_si256(); R];
        for half in 0..2 {
            let l0 = _mm256_loadu_si256(blk.add(64 * half) as *const __m256i);
            let l1 = _mm256_loadu_si256(blk.add(64 * half + 32) as *const __m256i);
            let h = _mm256_loadu_si256(blk.add(128 + 32 * half) as *const __m256i);
            let q = [
                _mm256_or_si256(
                    _mm256_and_si256(l0, m4),
                    _mm256_and_si256(_mm256_slli_epi16(h, 4), m2),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(l1, m4),
                    _mm256_and_si256(_mm256_slli_epi16(h, 2), m2),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                    _mm256_and_si256(h, m2),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                    _mm256_and_si256(_mm256_srli_epi16(h, 2), m2),
                ),
            ];
            for (k, &qk) in q.iter().enumerate() {
                // Scales of groups g and g+1 (16 elements each) over the 16 i16 pair sums.
                let g = (8 * half + 2 * k) as i8;
                let pick = _mm_set_epi8(
                    g + 1,
                    g + 1,
                    g + 1,
                    g + 1,
                    g + 1,
                    g + 1,
                    g + 1,
                    g + 1,
                    g,
                    g,
                    g,
                    g,
                    g,
                    g,
                    g,
                    g,
                );
                let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc_bytes, pick));
                for r in 0..R {
                    let x = acts
                        .qs
                        .as_ptr()
                        .add((r0 + r) * n + i * 256 + 128 * half + 32 * k);
                    let x = _mm256_loadu_si256(x as *const __m256i);
                    sumi[r] = D::madd_acc(sumi[r], _mm256_maddubs_epi16(qk, x), sc);
                }
            }
        }
        for r in 0..R {
            let row_block = (r0 + r) * nb + i;
            let bsums =
                _mm256_loadu_si256(acts.sums16.as_ptr().add(row_block * 16) as *const __m256i);
            // The values are stored +32: subtract 32 * sum_g scale_g * sum(x in g).
            let offset = _mm256_slli_epi32(_mm256_madd_epi16(scales16, bsums), 5);
            let total = hsum_epi32(_mm256_sub_epi32(sumi[r], offset));
            acc[r] += d * acts.d[row_block] * total as f32;
        }
    }
    out[..R].copy_from_slice(&acc);
}
