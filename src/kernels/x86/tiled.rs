//! The tiled kernels (layout in `kernels::tiles`): 8 weight rows per 256-bit register, one 32-bit
//! lane each, against activation bytes broadcast four at a time.
//!
//! Per weight row, activation row and block the arithmetic is the portable kernel's: an exact
//! integer dot product (offsets subtracted in integers), then `acc = fma(isum, dw * dx, acc)` and,
//! for Q4_1, `acc = fma(m, dx * sum(x), acc)`. So the lanes give bit for bit what the portable
//! kernel gives for each row, whatever the tiling, the row count or the thread count.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{Avx2, Dot, Vnni};
use crate::kernels::acts::Acts;
use crate::kernels::formats::Format;
use crate::kernels::quant::ROW_GROUP;
use crate::kernels::tiles::{
    TileLayout, Q4_0_TILE, Q4_1_TILE, Q5_0_TILE, Q5_1_TILE, Q8_0_TILE, TILE_ROWS,
};
use crate::kernels::Kernel;

/// out[r][j] = dot(row j of the tile, activation row r0 + r); false: no tiled kernel for this.
pub(crate) fn tile_rows(
    kernel: Kernel,
    format: Format,
    tile: &[u8],
    acts: &Acts,
    r0: usize,
    out: &mut [[f32; TILE_ROWS]],
) -> bool {
    let Some(layout) = TileLayout::of(format) else {
        return false;
    };
    assert!(out.len() <= ROW_GROUP && r0 + out.len() <= acts.rows);
    assert!(
        acts.in_dim.is_multiple_of(32) && tile.len() >= acts.in_dim / 32 * layout.block_bytes()
    );
    let t = tile.as_ptr();
    // SAFETY: the variant is only chosen when `Kernel::available` says the CPU has it; the bounds
    // above cover every load.
    match kernel {
        Kernel::Avx512Vnni => unsafe { vnni_entry(format, t, acts, r0, out) },
        Kernel::Avx2 => unsafe { avx2_entry(format, t, acts, r0, out) },
        Kernel::Portable => return false,
    }
    true
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn vnni_entry(format: Format, t: *const u8, acts: &Acts, r0: usize, out: &mut [[f32; 8]]) {
    dispatch::<Vnni>(format, t, acts, r0, out)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_entry(format: Format, t: *const u8, acts: &Acts, r0: usize, out: &mut [[f32; 8]]) {
    dispatch::<Avx2>(format, t, acts, r0, out)
}

#[inline(always)]
unsafe fn dispatch<D: TileDot>(
    format: Format,
    t: *const u8,
    acts: &Acts,
    r0: usize,
    out: &mut [[f32; 8]],
) {
    let n = out.len();
    match format {
        Format::Q4_0 => by_rows!(tiled::<D, Q4_0>(t, acts, r0, out), n),
        Format::Q4_1 => by_rows!(tiled::<D, Q4_1>(t, acts, r0, out), n),
        Format::Q5_0 => by_rows!(tiled::<D, Q5_0>(t, acts, r0, out), n),
        Format::Q5_1 => by_rows!(tiled::<D, Q5_1>(t, acts, r0, out), n),
        Format::Q8_0 => by_rows!(tiled::<D, Q8_0>(t, acts, r0, out), n),
        _ => unreachable!("only formats with a TileLayout reach the tiled kernels"),
    }
}

/// The weight operand of a dot product and how it is taken, per instruction set.
trait TileDot: Dot {
    /// Q8_0's signed weights as the unsigned operand: VNNI adds 128 (undone in integers by
    /// `SIGNED_OFFSET`), AVX2 takes |w| and moves the sign onto the activations (its 16-bit
    /// pair sums would saturate on 255 * 127 * 2).
    const SIGNED_OFFSET: i32;
    unsafe fn signed_operand(w: __m256i) -> __m256i;
    unsafe fn signed_dot(acc: __m256i, operand: __m256i, w: __m256i, x: __m256i) -> __m256i;
}

impl TileDot for Vnni {
    const SIGNED_OFFSET: i32 = 128;
    #[inline(always)]
    unsafe fn signed_operand(w: __m256i) -> __m256i {
        _mm256_xor_si256(w, _mm256_set1_epi8(-128))
    }
    #[inline(always)]
    unsafe fn signed_dot(acc: __m256i, operand: __m256i, _: __m256i, x: __m256i) -> __m256i {
        Self::dot(acc, operand, x)
    }
}

impl TileDot for Avx2 {
    const SIGNED_OFFSET: i32 = 0;
    #[inline(always)]
    unsafe fn signed_operand(w: __m256i) -> __m256i {
        _mm256_abs_epi8(w)
    }
    #[inline(always)]
    unsafe fn signed_dot(acc: __m256i, operand: __m256i, w: __m256i, x: __m256i) -> __m256i {
        Self::dot(acc, operand, _mm256_sign_epi8(x, w))
    }
}

/// A tiled format: its tile-block, and its 8 value registers (element groups 4k..4k+4).
trait TileFormat {
    const LAYOUT: TileLayout;
    /// Values minus `offset` (in integers): 8 for Q4_0, 16 for Q5_0.
    const OFFSET: i32 = 0;
    const SIGNED: bool = false;
}

struct Q4_0;
impl TileFormat for Q4_0 {
    const LAYOUT: TileLayout = Q4_0_TILE;
    const OFFSET: i32 = 8;
}

struct Q4_1;
impl TileFormat for Q4_1 {
    const LAYOUT: TileLayout = Q4_1_TILE;
}

struct Q5_0;
impl TileFormat for Q5_0 {
    const LAYOUT: TileLayout = Q5_0_TILE;
    const OFFSET: i32 = 16;
}

struct Q5_1;
impl TileFormat for Q5_1 {
    const LAYOUT: TileLayout = Q5_1_TILE;
}

struct Q8_0;
impl TileFormat for Q8_0 {
    const LAYOUT: TileLayout = Q8_0_TILE;
    const SIGNED: bool = true;
}

/// The 8 value registers of one tile-block: raw chunks (Q8_0) or nibbles split (Q4, Q5 with their
/// fifth bits). Plain loops, no closures: a closure would not inherit the caller's target
/// features, and its intrinsics would become calls.
#[inline(always)]
unsafe fn values<F: TileFormat>(blk: *const u8) -> [__m256i; 8] {
    let v = blk.add(F::LAYOUT.values) as *const __m256i;
    let mut out = [_mm256_setzero_si256(); 8];
    if F::SIGNED {
        for k in 0..8 {
            out[k] = _mm256_loadu_si256(v.add(k));
        }
        return out;
    }
    let m = _mm256_set1_epi8(0x0F);
    for i in 0..4 {
        let c = _mm256_loadu_si256(v.add(i));
        out[i] = _mm256_and_si256(c, m);
        out[i + 4] = _mm256_and_si256(_mm256_srli_epi16(c, 4), m);
    }
    if let Some(at) = F::LAYOUT.high_bits {
        let qh = _mm256_loadu_si256(blk.add(at) as *const __m256i);
        for k in 0..8 {
            out[k] = _mm256_or_si256(out[k], fifth_bits(qh, k));
        }
    }
    out
}

/// 0x10 in byte t of lane j where bit 4k + t of lane j of `qh` is set: the fifth bits of value
/// register k (elements 4k..4k+4 of each row).
#[inline(always)]
unsafe fn fifth_bits(qh: __m256i, k: usize) -> __m256i {
    // Byte k / 2 of each 32-bit lane into all four of its bytes ...
    let lane_base = _mm256_setr_epi8(
        0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12, 0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12,
        12, 12, 12,
    );
    let pick = _mm256_add_epi8(lane_base, _mm256_set1_epi8((k / 2) as i8));
    let bytes = _mm256_shuffle_epi8(qh, pick);
    // ... then byte t keeps bit t of its nibble.
    let bit = _mm256_set1_epi32((0x0804_0201u32 << (4 * (k % 2))) as i32);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

#[inline(always)]
unsafe fn tiled<D: TileDot, F: TileFormat, const R: usize>(
    t: *const u8,
    acts: &Acts,
    r0: usize,
    out: &mut [[f32; 8]],
) {
    let n = acts.in_dim;
    let nb = n / 32;
    let bytes = F::LAYOUT.block_bytes();
    let offset = if F::SIGNED {
        D::SIGNED_OFFSET
    } else {
        F::OFFSET
    };
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let blk = t.add(b * bytes);
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
        let mw = match F::LAYOUT.mins {
            Some(at) => _mm256_cvtph_ps(_mm_loadu_si128(blk.add(at) as *const __m128i)),
            None => _mm256_setzero_ps(),
        };
        let raw = values::<F>(blk);
        let mut w = raw;
        if F::SIGNED {
            for k in 0..8 {
                w[k] = D::signed_operand(raw[k]);
            }
        }
        for r in 0..R {
            let row_block = (r0 + r) * nb + b;
            let x = acts.qs.as_ptr().add(row_block * 32) as *const i32;
            let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for k in (0..8).step_by(2) {
                let x0 = _mm256_set1_epi32(x.add(k).read_unaligned());
                let x1 = _mm256_set1_epi32(x.add(k + 1).read_unaligned());
                if F::SIGNED {
                    s0 = D::signed_dot(s0, w[k], raw[k], x0);
                    s1 = D::signed_dot(s1, w[k + 1], raw[k + 1], x1);
                } else {
                    s0 = D::dot(s0, w[k], x0);
                    s1 = D::dot(s1, w[k + 1], x1);
                }
            }
            let mut isum = _mm256_add_epi32(s0, s1);
            if offset != 0 {
                let qsum = *acts.qsum.get_unchecked(row_block);
                isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(offset * qsum));
            }
            let dwdx = _mm256_mul_ps(dw, _mm256_set1_ps(*acts.d.get_unchecked(row_block)));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), dwdx, acc[r]);
            if F::LAYOUT.mins.is_some() {
                let dsum = _mm256_set1_ps(*acts.dsum.get_unchecked(row_block));
                acc[r] = _mm256_fmadd_ps(mw, dsum, acc[r]);
            }
        }
    }
    for r in 0..R {
        _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
    }
}
