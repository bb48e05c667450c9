//! The matrix–vector product that skips zero inputs: TEAL's kernel. The
//! weight is stored by input channel (each column of W contiguous), so an
//! input channel that is zero reads none of its weights; activation
//! sparsity (TEAL, WINA) is then executed, not masked.
//!
//! f32 only: the file's quantized blocks run along the input dimension (32
//! channels a block), and a block is skipped only when all 32 inputs are
//! zero, which per-token thresholds almost never give.

use super::pool::{pool, Shared};

/// Outputs per task below which splitting over the pool does not pay.
const MIN_TASK_ROWS: usize = 64;

/// A (rows, cols) weight stored column by column.
pub struct ColumnMajor {
    rows: usize,
    cols: usize,
    /// Column j is `data[j * rows..(j + 1) * rows]`.
    data: Vec<f32>,
}

impl ColumnMajor {
    /// From a row-major (rows, cols) matrix.
    pub fn from_row_major(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "a ({rows}, {cols}) matrix");
        let mut data = vec![0f32; rows * cols];
        for (r, row) in w.chunks_exact(cols).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                data[c * rows + r] = v;
            }
        }
        Self { rows, cols, data }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes this copy holds.
    pub fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<f32>()
    }

    /// y = W·x, reading only the columns of x's nonzero entries; returns
    /// how many columns it read.
    pub fn matvec(&self, x: &[f32], y: &mut [f32]) -> usize {
        assert!(
            x.len() == self.cols && y.len() == self.rows,
            "matvec of a ({}, {}) matrix with x of {} into y of {}",
            self.rows,
            self.cols,
            x.len(),
            y.len()
        );
        let nonzero: Vec<(usize, f32)> = x
            .iter()
            .enumerate()
            .filter(|(_, &v)| v != 0.0)
            .map(|(j, &v)| (j, v))
            .collect();
        let pool = pool();
        let tasks = pool.threads().min(self.rows / MIN_TASK_ROWS).max(1);
        // Chunks of whole cache lines (16 floats), one per task.
        let chunk = self.rows.div_ceil(tasks).next_multiple_of(16);
        let out = Shared::new(y);
        let task = |t: usize| {
            let lo = (t * chunk).min(self.rows);
            let hi = ((t + 1) * chunk).min(self.rows);
            // SAFETY: each task writes its own range of y.
            let y = unsafe { out.range(lo..hi) };
            self.columns_into(&nonzero, lo, y);
        };
        pool.for_each(tasks, &task);
        nonzero.len()
    }

    /// y = Σ x_j · W[lo.., j] over `nonzero` (j, x_j), four columns a pass
    /// so y is loaded and stored once per four.
    fn columns_into(&self, nonzero: &[(usize, f32)], lo: usize, y: &mut [f32]) {
        y.fill(0.0);
        let n = y.len();
        let col = |j: usize| &self.data[j * self.rows + lo..j * self.rows + lo + n];
        let mut quads = nonzero.chunks_exact(4);
        for q in &mut quads {
            axpy4(
                [q[0].1, q[1].1, q[2].1, q[3].1],
                [col(q[0].0), col(q[1].0), col(q[2].0), col(q[3].0)],
                y,
            );
        }
        for &(j, a) in quads.remainder() {
            axpy(a, col(j), y);
        }
    }
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn axpy4(a: [f32; 4], c: [&[f32]; 4], y: &mut [f32]) {
    let n = y.len();
    let (c0, c1, c2, c3) = (&c[0][..n], &c[1][..n], &c[2][..n], &c[3][..n]);
    for i in 0..n {
        y[i] += a[0] * c0[i] + a[1] * c1[i] + a[2] * c2[i] + a[3] * c3[i];
    }
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn axpy(a: f32, c: &[f32], y: &mut [f32]) {
    for (yi, ci) in y.iter_mut().zip(c) {
        *yi += a * ci;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic (rows, cols) matrix and an input with every third
    /// entry zero.
    fn case(rows: usize, cols: usize) -> (Vec<f32>, Vec<f32>) {
        let w = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let x = (0..cols)
            .map(|j| {
                if j % 3 == 0 {
                    0.0
                } else {
                    (j as f32 * 0.37).sin()
                }
            })
            .collect();
        (w, x)
    }

    fn dense(w: &[f32], x: &[f32], rows: usize) -> Vec<f32> {
        w.chunks_exact(x.len())
            .take(rows)
            .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    }

    #[test]
    fn equals_the_dense_product_and_reads_only_nonzero_columns() {
        // Shapes that split over tasks unevenly and leave a column remainder.
        for (rows, cols) in [(576, 576), (1536, 577), (65, 9), (1, 5)] {
            let (w, x) = case(rows, cols);
            let m = ColumnMajor::from_row_major(&w, rows, cols);
            let mut y = vec![f32::NAN; rows];
            let read = m.matvec(&x, &mut y);
            assert_eq!(read, x.iter().filter(|v| **v != 0.0).count());
            let want = dense(&w, &x, rows);
            let err = y
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // Summation order differs from the dense dot: f32 rounding only.
            assert!(err < 1e-4, "({rows}, {cols}): max error {err}");
        }
    }

    #[test]
    fn an_all_zero_input_reads_nothing_and_gives_zero() {
        let m = ColumnMajor::from_row_major(&[1.0; 12], 3, 4);
        let mut y = vec![5.0; 3];
        assert_eq!(m.matvec(&[0.0; 4], &mut y), 0);
        assert_eq!(y, vec![0.0; 3]);
    }
}
