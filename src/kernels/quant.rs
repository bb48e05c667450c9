//! `QWeight`: a zero-copy view of a quantized weight matrix and its matmul driver.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};

use super::acts::Acts;
use super::formats::Format;
use super::pool::{pool, Pool};
use super::tiles::{Tiles, TILE_ROWS};
use super::{active_kernel, scalar, Kernel};

/// Activation rows one kernel call handles against each weight row (one accumulator each).
pub(crate) const ROW_GROUP: usize = 8;

/// The least work (weight bytes times activation rows) worth handing to another thread.
const MIN_TASK_BYTES: usize = 16 * 1024;

/// A quantized weight matrix (out_dim x in_dim) borrowed from a candle CPU `QTensor`.
pub struct QWeight {
    /// Keeps the bytes `data` points into alive.
    _tensor: Arc<QTensor>,
    data: *const u8,
    len: usize,
    format: Format,
    out_dim: usize,
    in_dim: usize,
    row_bytes: usize,
    /// The rows interleaved for the SIMD kernels (formats with a tile layout, on CPUs with AVX2).
    tiles: Option<Tiles>,
}

// SAFETY: `data` points into the immutable storage of the `QTensor` held by `_tensor`.
unsafe impl Send for QWeight {}
unsafe impl Sync for QWeight {}

thread_local! {
    /// The caller's reusable activation buffers (no allocation per call once warm).
    static ACTS: RefCell<Acts> = RefCell::new(Acts::default());
}

impl std::fmt::Debug for QWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QWeight({:?}, {}x{})",
            self.format, self.out_dim, self.in_dim
        )
    }
}

impl QWeight {
    /// Zero-copy over candle's CPU QTensor (QTensor::data() borrows on CPU). Ok(None) when the
    /// format has no kernel here or the tensor is not on the CPU (callers fall back to candle).
    pub fn from_qtensor(q: Arc<QTensor>) -> candle_core::Result<Option<QWeight>> {
        let Some(format) = Format::from_dtype(q.dtype()) else {
            return Ok(None);
        };
        if !q.device().is_cpu() {
            return Ok(None);
        }
        let dims = q.shape().dims();
        let Some((&in_dim, outer)) = dims.split_last() else {
            return Ok(None);
        };
        let out_dim: usize = outer.iter().product();
        if in_dim == 0 || out_dim == 0 || in_dim % format.block_elems() != 0 {
            return Ok(None);
        }
        let row_bytes = in_dim / format.block_elems() * format.block_bytes();
        let (data, len) = match q.data()? {
            std::borrow::Cow::Borrowed(b) => (b.as_ptr(), b.len()),
            std::borrow::Cow::Owned(_) => return Ok(None),
        };
        if len != row_bytes * out_dim {
            candle_core::bail!(
                "quantized tensor {dims:?} ({:?}) holds {len} bytes, expected {}",
                q.dtype(),
                row_bytes * out_dim
            );
        }
        // SAFETY: `data` and `len` come from the borrowed storage of `q`, alive here.
        let bytes = unsafe { std::slice::from_raw_parts(data, len) };
        let tiles = Kernel::Avx2
            .available()
            .then(|| Tiles::build(format, bytes, out_dim, row_bytes))
            .flatten();
        Ok(Some(QWeight {
            _tensor: q,
            data,
            len,
            format,
            out_dim,
            in_dim,
            row_bytes,
            tiles,
        }))
    }

    /// Rows of the weight matrix (output features).
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Columns (input features).
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    pub fn dtype(&self) -> GgmlDType {
        self.format.dtype()
    }

    /// Bytes of the interleaved copy the SIMD kernels read (0 where there is none).
    pub fn tiled_bytes(&self) -> usize {
        self.tiles.as_ref().map_or(0, Tiles::len)
    }

    /// y (rows x out_dim, row-major) = x (rows x in_dim, row-major) * W^T.
    /// The weights are streamed once for all `rows`. Row r's result is bit-identical whatever
    /// `rows` is and whatever the thread count. Uses the global pool.
    pub fn matmul(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        self.matmul_with(pool(), active_kernel(), x, rows, 0..self.out_dim, y);
    }

    /// As matmul, only output features `outs` (y is rows x outs.len()).
    pub fn matmul_range(&self, x: &[f32], rows: usize, outs: Range<usize>, y: &mut [f32]) {
        self.matmul_with(pool(), active_kernel(), x, rows, outs, y);
    }

    /// As `matmul_range` on a given pool and kernel variant (tests, benches). A variant this CPU
    /// cannot run is replaced by the portable one.
    pub fn matmul_with(
        &self,
        pool: &Pool,
        kernel: Kernel,
        x: &[f32],
        rows: usize,
        outs: Range<usize>,
        y: &mut [f32],
    ) {
        assert!(
            outs.start <= outs.end && outs.end <= self.out_dim,
            "matmul_range: outputs {outs:?} outside 0..{}",
            self.out_dim
        );
        assert_eq!(
            x.len(),
            rows * self.in_dim,
            "matmul: x must be rows x in_dim = {rows} x {}",
            self.in_dim
        );
        let n_out = outs.len();
        assert_eq!(
            y.len(),
            rows * n_out,
            "matmul: y must be rows x outputs = {rows} x {n_out}"
        );
        if rows == 0 || n_out == 0 {
            return;
        }
        let kernel = if kernel.available() {
            kernel
        } else {
            Kernel::Portable
        };
        let kind = self.format.act_kind();
        ACTS.with(|cell| match cell.try_borrow_mut() {
            Ok(mut acts) => {
                acts.quantize(x, rows, self.in_dim, kind);
                self.run(pool, kernel, &acts, outs, y)
            }
            Err(_) => {
                // Re-entered on this thread (a matmul inside a pool task): a fresh buffer.
                let mut acts = Acts::default();
                acts.quantize(x, rows, self.in_dim, kind);
                self.run(pool, kernel, &acts, outs, y)
            }
        });
    }

    /// Splits the output features into chunks over the pool, at multiples of the tile height
    /// (counted from row 0, so a range that starts mid-tile keeps its later tiles whole).
    fn run(&self, pool: &Pool, kernel: Kernel, acts: &Acts, outs: Range<usize>, y: &mut [f32]) {
        let n_out = outs.len();
        let rows = acts.rows;
        // Equal chunks, a multiple of the thread count where the matrix is big enough to share
        // (a task of less than `MIN_TASK_BYTES` of weights does not pay for its hand-off).
        let threads = pool.threads().max(1);
        let share = (n_out * self.row_bytes.max(1) * rows.max(1) / MIN_TASK_BYTES).max(1);
        let wanted = if share >= threads {
            (threads * 4).min(share) / threads * threads
        } else {
            share
        };
        let chunk = n_out.div_ceil(wanted).next_multiple_of(TILE_ROWS);
        let base = outs.start - outs.start % TILE_ROWS;
        let tasks = (outs.end - base).div_ceil(chunk);
        let y_ptr = SendPtr(y.as_mut_ptr());
        let task = |t: usize| {
            let lo = (base + t * chunk).max(outs.start);
            let hi = (base + (t + 1) * chunk).min(outs.end);
            // SAFETY: tasks write disjoint columns of y.
            let y = unsafe { std::slice::from_raw_parts_mut(y_ptr.get(), rows * n_out) };
            self.chunk(kernel, acts, lo..hi, lo - outs.start, n_out, y);
        };
        pool.for_each(tasks, &task);
    }

    /// Weight rows `ws` into y's columns col0.., for every activation row: whole tiles through
    /// the tiled kernel, other rows one at a time (the same bits either way).
    fn chunk(
        &self,
        kernel: Kernel,
        acts: &Acts,
        ws: Range<usize>,
        col0: usize,
        n_out: usize,
        y: &mut [f32],
    ) {
        let rows = acts.rows;
        let mut o = ws.start;
        while o < ws.end {
            let col = col0 + o - ws.start;
            if self.whole_tile_at(kernel, o, ws.end) {
                let mut out = [[0f32; TILE_ROWS]; ROW_GROUP];
                let mut r0 = 0;
                while r0 < rows {
                    let nr = (rows - r0).min(ROW_GROUP);
                    self.tile_rows(kernel, o / TILE_ROWS, acts, r0, &mut out[..nr]);
                    for (k, vals) in out[..nr].iter().enumerate() {
                        let at = (r0 + k) * n_out + col;
                        y[at..at + TILE_ROWS].copy_from_slice(vals);
                    }
                    r0 += nr;
                }
                o += TILE_ROWS;
                continue;
            }
            let mut out = [0f32; ROW_GROUP];
            let w = self.row(o);
            let mut r0 = 0;
            while r0 < rows {
                let nr = (rows - r0).min(ROW_GROUP);
                self.dot_rows(kernel, w, acts, r0, &mut out[..nr]);
                for (k, v) in out[..nr].iter().enumerate() {
                    y[(r0 + k) * n_out + col] = *v;
                }
                r0 += nr;
            }
            o += 1;
        }
    }

    /// Whether a tile starts at weight row `o` that the tiled kernel can take whole (below `end`).
    fn whole_tile_at(&self, kernel: Kernel, o: usize, end: usize) -> bool {
        let Some(tiles) = &self.tiles else {
            return false;
        };
        kernel != Kernel::Portable
            && o.is_multiple_of(TILE_ROWS)
            && o + TILE_ROWS <= end
            && o / TILE_ROWS < tiles.tiles
    }

    /// out[r][j] = weight row `TILE_ROWS * t + j` against activation row `r0 + r`.
    fn tile_rows(
        &self,
        kernel: Kernel,
        t: usize,
        acts: &Acts,
        r0: usize,
        out: &mut [[f32; TILE_ROWS]],
    ) {
        #[cfg(target_arch = "x86_64")]
        if let Some(tiles) = &self.tiles {
            if super::x86::tiled::tile_rows(kernel, self.format, tiles.tile(t), acts, r0, out) {
                return;
            }
        }
        // No tiled kernel for this variant: the rows one at a time (the same bits).
        let mut col = [0f32; ROW_GROUP];
        let nr = out.len();
        for (j, o) in (t * TILE_ROWS..(t + 1) * TILE_ROWS).enumerate() {
            scalar::dot_rows(self.format, self.row(o), acts, r0, &mut col[..nr]);
            for (row, v) in out.iter_mut().zip(&col[..nr]) {
                row[j] = *v;
            }
        }
    }

    fn dot_rows(&self, kernel: Kernel, w: &[u8], acts: &Acts, r0: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if kernel != Kernel::Portable && super::x86::dot_rows(kernel, self.format, w, acts, r0, out)
        {
            return;
        }
        let _ = kernel;
        scalar::dot_rows(self.format, w, acts, r0, out)
    }

    /// The bytes of weight row `o`.
    fn row(&self, o: usize) -> &[u8] {
        debug_assert!(o < self.out_dim && (o + 1) * self.row_bytes <= self.len);
        // SAFETY: in bounds of the tensor's storage, which `_tensor` keeps alive.
        unsafe { std::slice::from_raw_parts(self.data.add(o * self.row_bytes), self.row_bytes) }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}
