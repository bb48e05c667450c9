//! Weight rows interleaved in tiles of `TILE_ROWS`, for the SIMD kernels of the 32-element formats
//! (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
//!
//! ggml stores a matrix row after row, so a kernel that reads one row at a time needs a horizontal
//! sum per block and per activation row. Interleaving 8 rows four bytes at a time (llama.cpp's
//! "repack" idea) lets one `vpdpbusd` against a broadcast group of four activation bytes advance
//! all 8 rows' dot products in its 8 lanes, and one multiply-add scales all 8 at once. Nothing is
//! widened: Q4 stays 4 bits (the nibbles move with their bytes) and the scales stay f16.
//!
//! Per tile (8 rows) and block (32 elements), in this order:
//! - `d`: 8 f16 scales, row j at bytes 2j..2j+2;
//! - `m`: 8 f16 minimums (Q4_1, Q5_1);
//! - `qh`: 8 little-endian u32 of fifth bits (Q5_0, Q5_1), row j at bytes 4j..4j+4, bit e for
//!   element e;
//! - the values in 32-byte chunks: chunk i, bytes 4j..4j+4 are row j's bytes 4i..4i+4 of the
//!   block's values. For Q4 (16 bytes per row: byte l holds element l low and l + 16 high) that is
//!   4 chunks: the low nibbles of chunk i are elements 4i..4i+4, the high ones 16+4i..16+4i+4
//!   (Q5 the same, with the fifth bits in `qh`).
//!   For Q8_0 (32 signed bytes per row) it is 8 chunks, chunk i holding elements 4i..4i+4.

use super::formats::Format;

/// Weight rows per tile: one per 32-bit lane of a 256-bit register.
pub(crate) const TILE_ROWS: usize = 8;

/// A matrix's full tiles (rows beyond the last multiple of `TILE_ROWS` are not in it).
pub(crate) struct Tiles {
    bytes: Vec<u8>,
    /// Bytes of one tile-block (8 rows x 32 elements).
    pub(crate) block_bytes: usize,
    /// Blocks per row.
    pub(crate) blocks: usize,
    /// Number of tiles.
    pub(crate) tiles: usize,
}

/// The byte layout of one format's tile-block.
#[derive(Clone, Copy)]
pub(crate) struct TileLayout {
    /// Offset of the 8 minimums (Q4_1, Q5_1), if any.
    pub(crate) mins: Option<usize>,
    /// Offset of the 8 rows' fifth bits (Q5_0, Q5_1), if any.
    pub(crate) high_bits: Option<usize>,
    /// Offset of the value chunks.
    pub(crate) values: usize,
    /// Number of 32-byte value chunks.
    pub(crate) chunks: usize,
}

pub(crate) const Q4_0_TILE: TileLayout = TileLayout {
    mins: None,
    high_bits: None,
    values: 16,
    chunks: 4,
};
pub(crate) const Q4_1_TILE: TileLayout = TileLayout {
    mins: Some(16),
    high_bits: None,
    values: 32,
    chunks: 4,
};
pub(crate) const Q5_0_TILE: TileLayout = TileLayout {
    mins: None,
    high_bits: Some(16),
    values: 48,
    chunks: 4,
};
pub(crate) const Q5_1_TILE: TileLayout = TileLayout {
    mins: Some(16),
    high_bits: Some(32),
    values: 64,
    chunks: 4,
};
pub(crate) const Q8_0_TILE: TileLayout = TileLayout {
    mins: None,
    high_bits: None,
    values: 16,
    chunks: 8,
};

impl TileLayout {
    pub(crate) fn of(format: Format) -> Option<TileLayout> {
        match format {
            Format::Q4_0 => Some(Q4_0_TILE),
            Format::Q4_1 => Some(Q4_1_TILE),
            Format::Q5_0 => Some(Q5_0_TILE),
            Format::Q5_1 => Some(Q5_1_TILE),
            Format::Q8_0 => Some(Q8_0_TILE),
            _ => None,
        }
    }

    pub(crate) const fn block_bytes(self) -> usize {
        self.values + 32 * self.chunks
    }
}

/// Where a row's parts sit in its ggml block.
struct GgmlParts {
    scale: usize,
    min: Option<usize>,
    high_bits: Option<usize>,
    values: usize,
}

fn ggml_parts(format: Format) -> GgmlParts {
    let (min, high_bits, values) = match format {
        Format::Q4_0 | Format::Q8_0 => (None, None, 2),
        Format::Q4_1 => (Some(2), None, 4),
        Format::Q5_0 => (None, Some(2), 6),
        Format::Q5_1 => (Some(2), Some(4), 8),
        _ => unreachable!("only formats with a TileLayout are tiled"),
    };
    GgmlParts {
        scale: 0,
        min,
        high_bits,
        values,
    }
}

impl Tiles {
    /// The full tiles of `out_dim` rows of `row_bytes` ggml bytes each; None for formats without
    /// a tile layout or matrices of fewer than `TILE_ROWS` rows.
    pub(crate) fn build(
        format: Format,
        data: &[u8],
        out_dim: usize,
        row_bytes: usize,
    ) -> Option<Tiles> {
        let layout = TileLayout::of(format)?;
        let tiles = out_dim / TILE_ROWS;
        if tiles == 0 {
            return None;
        }
        let (bb, blocks) = (format.block_bytes(), row_bytes / format.block_bytes());
        let parts = ggml_parts(format);
        let value_bytes = 4 * layout.chunks; // per row and block
        let tb = layout.block_bytes();
        let mut bytes = vec![0u8; tiles * blocks * tb];
        for (t, tile) in bytes.chunks_exact_mut(blocks * tb).enumerate() {
            for (b, out) in tile.chunks_exact_mut(tb).enumerate() {
                for j in 0..TILE_ROWS {
                    let src = &data[(t * TILE_ROWS + j) * row_bytes + b * bb..][..bb];
                    let d = parts.scale;
                    out[2 * j..2 * j + 2].copy_from_slice(&src[d..d + 2]);
                    if let (Some(m_out), Some(m_in)) = (layout.mins, parts.min) {
                        out[m_out + 2 * j..m_out + 2 * j + 2].copy_from_slice(&src[m_in..m_in + 2]);
                    }
                    if let (Some(h_out), Some(h_in)) = (layout.high_bits, parts.high_bits) {
                        out[h_out + 4 * j..h_out + 4 * j + 4].copy_from_slice(&src[h_in..h_in + 4]);
                    }
                    let qs = parts.values;
                    for i in 0..value_bytes / 4 {
                        let at = layout.values + 32 * i + 4 * j;
                        out[at..at + 4].copy_from_slice(&src[qs + 4 * i..qs + 4 * i + 4]);
                    }
                }
            }
        }
        Some(Tiles {
            bytes,
            block_bytes: tb,
            blocks,
            tiles,
        })
    }

    /// The blocks of tile `t`, block after block.
    pub(crate) fn tile(&self, t: usize) -> &[u8] {
        let len = self.blocks * self.block_bytes;
        &self.bytes[t * len..(t + 1) * len]
    }

    /// Bytes held (for memory accounting).
    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte of every row lands where the layout says, and nothing else is written.
    #[test]
    fn tiles_hold_each_rows_bytes_where_the_layout_says() {
        for format in [
            Format::Q4_0,
            Format::Q4_1,
            Format::Q5_0,
            Format::Q5_1,
            Format::Q8_0,
        ] {
            let (bb, blocks, out_dim) = (format.block_bytes(), 3, 19);
            let row_bytes = bb * blocks;
            let data: Vec<u8> = (0..out_dim * row_bytes)
                .map(|i| (i * 7 + i / 13) as u8)
                .collect();
            let tiles = Tiles::build(format, &data, out_dim, row_bytes).unwrap();
            let layout = TileLayout::of(format).unwrap();
            assert_eq!(tiles.tiles, 2, "19 rows make 2 full tiles");
            let parts = ggml_parts(format);
            let mut covered = 0;
            for t in 0..2 {
                for b in 0..blocks {
                    let tb = &tiles.tile(t)[b * layout.block_bytes()..][..layout.block_bytes()];
                    for j in 0..TILE_ROWS {
                        let src = &data[(t * 8 + j) * row_bytes + b * bb..][..bb];
                        assert_eq!(&tb[2 * j..2 * j + 2], &src[parts.scale..parts.scale + 2]);
                        covered += 2;
                        if let (Some(mo), Some(mi)) = (layout.mins, parts.min) {
                            assert_eq!(&tb[mo + 2 * j..mo + 2 * j + 2], &src[mi..mi + 2]);
                            covered += 2;
                        }
                        if let (Some(ho), Some(hi)) = (layout.high_bits, parts.high_bits) {
                            assert_eq!(&tb[ho + 4 * j..ho + 4 * j + 4], &src[hi..hi + 4]);
                            covered += 4;
                        }
                        for e in 0..4 * layout.chunks {
                            let (chunk, byte) = (e / 4, e % 4);
                            assert_eq!(
                                tb[layout.values + 32 * chunk + 4 * j + byte],
                                src[parts.values + e]
                            );
                            covered += 1;
                        }
                    }
                }
            }
            assert_eq!(
                covered,
                tiles.len(),
                "{format:?}: every tile byte is a row's byte"
            );
        }
    }

    #[test]
    fn formats_without_a_layout_and_short_matrices_get_no_tiles() {
        assert!(Tiles::build(Format::Q4K, &[0; 144 * 8], 8, 144).is_none());
        assert!(Tiles::build(Format::Q4_1, &[0; 20 * 7], 7, 20).is_none());
    }
}
