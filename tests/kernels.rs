//! The quantized kernels against candle's dequantize-then-matmul reference, per format and per
//! instruction-set variant, plus the bit-identity contract (a row's result does not depend on how
//! many rows or threads share the call) and the worker pool.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use rand::{Rng, SeedableRng};
use scalpel::kernels::{Kernel, Pool, QWeight};

const FORMATS: [GgmlDType; 8] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

fn randn(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    // Sum of uniforms: roughly normal, with a few larger entries like real activations.
    (0..n)
        .map(|_| {
            let v: f32 = (0..4).map(|_| rng.random::<f32>() - 0.5).sum();
            if rng.random::<f32>() < 0.01 {
                v * 8.0
            } else {
                v
            }
        })
        .collect()
}

struct Case {
    q: Arc<QTensor>,
    w: Vec<f32>,
    x: Vec<f32>,
    rows: usize,
    out: usize,
    inp: usize,
}

fn case(dtype: GgmlDType, out: usize, blocks: usize, rows: usize, seed: u64) -> Case {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let inp = blocks * dtype.block_size();
    let wf = Tensor::from_vec(randn(&mut rng, out * inp), (out, inp), &Device::Cpu).unwrap();
    let q = Arc::new(QTensor::quantize(&wf, dtype).unwrap());
    let w = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let x = randn(&mut rng, rows * inp);
    Case {
        q,
        w,
        x,
        rows,
        out,
        inp,
    }
}

/// x * W^T in f64 on the dequantized weights: the reference.
fn reference(c: &Case) -> Vec<f64> {
    let mut y = vec![0f64; c.rows * c.out];
    for r in 0..c.rows {
        for o in 0..c.out {
            y[r * c.out + o] = (0..c.inp)
                .map(|i| c.x[r * c.inp + i] as f64 * c.w[o * c.inp + i] as f64)
                .sum();
        }
    }
    y
}

/// (squared error, squared reference) sums: relative error = sqrt(first / second).
fn err_parts(y: &[f32], reference: &[f64]) -> (f64, f64) {
    let num: f64 = y
        .iter()
        .zip(reference)
        .map(|(&a, &b)| (a as f64 - b).powi(2))
        .sum();
    (num, reference.iter().map(|b| b * b).sum())
}

fn rel_err(y: &[f32], reference: &[f64]) -> f64 {
    let (num, den) = err_parts(y, reference);
    (num / den).sqrt()
}

fn ours(c: &Case, pool: &Pool, kernel: Kernel) -> Vec<f32> {
    let qw = QWeight::from_qtensor(c.q.clone()).unwrap().unwrap();
    assert_eq!(
        (qw.out_dim(), qw.in_dim(), qw.dtype()),
        (c.out, c.inp, c.q.dtype())
    );
    let mut y = vec![f32::NAN; c.rows * c.out];
    qw.matmul_with(pool, kernel, &c.x, c.rows, 0..c.out, &mut y);
    y
}

fn candle_matmul(c: &Case) -> Vec<f32> {
    let mm = QMatMul::from_arc(c.q.clone()).unwrap();
    let x = Tensor::from_vec(c.x.clone(), (c.rows, c.inp), &Device::Cpu).unwrap();
    mm.forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Every format and variant is within the activation-quantization error of the reference, close
/// to candle's own quantized matmul error on the same data, on odd shapes and rows 1..=17.
#[test]
fn each_format_and_kernel_matches_the_dequantized_reference() {
    let pool = Pool::new(2);
    let kernels = Kernel::all_available();
    for (f, &dtype) in FORMATS.iter().enumerate() {
        // Squared-error sums over all shapes, so the tiny shapes' chance errors do not dominate.
        let mut ours_err = vec![(0f64, 0f64); kernels.len()];
        // The same sums over the shapes candle also runs (an even number of blocks).
        let mut ours_even = vec![(0f64, 0f64); kernels.len()];
        let mut candle_err = (0f64, 0f64);
        for (s, &(out, blocks, rows)) in [
            (1, 1, 1),
            (3, 3, 2),
            (17, 5, 17),
            (33, 3, 9),
            (64, 2, 4),
            (40, 4, 3),
        ]
        .iter()
        .enumerate()
        {
            let c = case(dtype, out, blocks, rows, (f * 100 + s) as u64);
            let reference = reference(&c);
            // candle's Q4_1/Q5 kernels require an even number of blocks per row.
            if blocks % 2 == 0 {
                let (n, d) = err_parts(&candle_matmul(&c), &reference);
                candle_err = (candle_err.0 + n, candle_err.1 + d);
            }
            let portable = ours(&c, &pool, Kernel::Portable);
            for (k, &kernel) in kernels.iter().enumerate() {
                let y = ours(&c, &pool, kernel);
                assert!(
                    y.iter().all(|v| v.is_finite()),
                    "{dtype:?} {kernel:?}: not finite"
                );
                let (n, d) = err_parts(&y, &reference);
                ours_err[k] = (ours_err[k].0 + n, ours_err[k].1 + d);
                if blocks % 2 == 0 {
                    ours_even[k] = (ours_even[k].0 + n, ours_even[k].1 + d);
                }
                // The SIMD variants sum the same integers in another order: float noise only.
                let vs_portable =
                    rel_err(&y, &portable.iter().map(|&v| v as f64).collect::<Vec<_>>());
                assert!(
                    vs_portable < 1e-5,
                    "{dtype:?} {kernel:?} {out}x{} rows {rows}: differs from portable by {vs_portable:e}",
                    c.inp
                );
            }
        }
        let candle = (candle_err.0 / candle_err.1).sqrt();
        for (k, &kernel) in kernels.iter().enumerate() {
            let e = (ours_err[k].0 / ours_err[k].1).sqrt();
            let even = (ours_even[k].0 / ours_even[k].1).sqrt();
            eprintln!(
                "{dtype:?} {:>11}: relative error {e:.2e}; on candle's shapes {even:.2e} \
                 (candle QMatMul {candle:.2e})",
                kernel.name()
            );
            // 8-bit activation blocks, measured like candle's own error: 7e-3..9e-3 with a
            // scale per 32 elements, ~1.9e-2 with one per 256 (the K-quants, as Q8_K).
            let bound = if dtype.block_size() == 256 {
                2.5e-2
            } else {
                1.2e-2
            };
            assert!(e < bound, "{dtype:?} {kernel:?}: relative error {e:.2e}");
            assert!(
                even < 1.3 * candle + 1e-5,
                "{dtype:?} {kernel:?}: relative error {even:.2e} (candle {candle:.2e})"
            );
        }
    }
}

/// The 32-element formats the SIMD kernels read in tiles of 8 rows give exactly the portable
/// kernel's bits: whole tiles, the rows after the last tile, and every row count.
#[test]
fn tiled_formats_equal_the_portable_kernel_bit_for_bit() {
    let pool = Pool::new(2);
    for &dtype in &[
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
    ] {
        for (seed, &(out, blocks, rows)) in [(8, 1, 1), (19, 3, 9), (64, 18, 4), (7, 2, 3)]
            .iter()
            .enumerate()
        {
            let c = case(dtype, out, blocks, rows, 500 + seed as u64);
            let portable = ours(&c, &pool, Kernel::Portable);
            for kernel in Kernel::all_available() {
                let y = ours(&c, &pool, kernel);
                let same = y
                    .iter()
                    .zip(&portable)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{dtype:?} {kernel:?} {out}x{} rows {rows}", c.inp);
            }
        }
    }
}

/// matmul_range gives exactly the matching columns of a full matmul.
#[test]
fn matmul_range_equals_the_slice_of_matmul() {
    let pool = Pool::new(2);
    for &dtype in &[GgmlDType::Q4_1, GgmlDType::Q6K] {
        let c = case(dtype, 37, 3, 5, 7);
        let qw = QWeight::from_qtensor(c.q.clone()).unwrap().unwrap();
        for kernel in Kernel::all_available() {
            let full = ours(&c, &pool, kernel);
            for outs in [0..37, 5..6, 3..20, 30..37, 12..12] {
                let mut y = vec![f32::NAN; c.rows * outs.len()];
                qw.matmul_with(&pool, kernel, &c.x, c.rows, outs.clone(), &mut y);
                for r in 0..c.rows {
                    assert_eq!(
                        &y[r * outs.len()..(r + 1) * outs.len()],
                        &full[r * c.out + outs.start..r * c.out + outs.end],
                        "{dtype:?} {kernel:?} outs {outs:?} row {r}"
                    );
                }
            }
        }
    }
}

/// Row r's numbers are bit-identical whether it is decoded alone or verified with other rows,
/// and whatever the thread count: speculative verification stays lossless.
#[test]
fn a_rows_result_is_bit_identical_across_row_counts_and_threads() {
    let pools = [Pool::new(1), Pool::new(2), Pool::new(3)];
    for &dtype in &FORMATS {
        let c = case(dtype, 129, 3, 17, 11);
        let qw = QWeight::from_qtensor(c.q.clone()).unwrap().unwrap();
        for kernel in Kernel::all_available() {
            // Each row alone, one thread.
            let alone: Vec<Vec<f32>> = (0..c.rows)
                .map(|r| {
                    let mut y = vec![0f32; c.out];
                    let x = &c.x[r * c.inp..(r + 1) * c.inp];
                    qw.matmul_with(&pools[0], kernel, x, 1, 0..c.out, &mut y);
                    y
                })
                .collect();
            for pool in &pools {
                for rows in 1..=c.rows {
                    let mut y = vec![0f32; rows * c.out];
                    qw.matmul_with(pool, kernel, &c.x[..rows * c.inp], rows, 0..c.out, &mut y);
                    for (r, want) in alone.iter().enumerate().take(rows) {
                        let got = &y[r * c.out..(r + 1) * c.out];
                        assert!(
                            got.iter()
                                .zip(want)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{dtype:?} {kernel:?}: row {r} of {rows} on {} threads differs",
                            pool.threads()
                        );
                    }
                }
            }
        }
    }
}

/// Formats without a kernel are declined (the caller falls back to candle), never mis-read.
#[test]
fn unsupported_formats_are_declined() {
    let w = Tensor::ones((4, 256), candle_core::DType::F32, &Device::Cpu).unwrap();
    for dtype in [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
    ] {
        let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
        assert!(QWeight::from_qtensor(q).unwrap().is_none(), "{dtype:?}");
    }
    let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap());
    assert!(QWeight::from_qtensor(q).unwrap().is_some());
}

/// The weight view keeps the tensor alive by itself (zero-copy, no dangling bytes).
#[test]
fn the_weight_view_outlives_the_callers_tensor() {
    let c = case(GgmlDType::Q4_0, 5, 2, 1, 3);
    let pool = Pool::new(2);
    let want = ours(&c, &pool, Kernel::Portable);
    let qw = QWeight::from_qtensor(c.q.clone()).unwrap().unwrap();
    drop(c.q);
    let mut y = vec![0f32; 5];
    qw.matmul_with(&pool, Kernel::Portable, &c.x, 1, 0..5, &mut y);
    assert_eq!(y, want);
}

/// Every task runs exactly once per call, over many back-to-back calls, nested calls included.
#[test]
fn the_pool_runs_each_task_exactly_once() {
    for threads in [1, 2, 4] {
        let pool = Pool::new(threads);
        assert_eq!(pool.threads(), threads);
        let counts: Vec<AtomicUsize> = (0..97).map(|_| AtomicUsize::new(0)).collect();
        for round in 0..2000 {
            let tasks = round % 97 + 1;
            pool.for_each(tasks, &|t| {
                counts[t].fetch_add(1, Ordering::Relaxed);
            });
            if round % 500 == 0 {
                // Let the workers park, then wake them again.
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        let expected = |t: usize| (0..2000).filter(|r| r % 97 + 1 > t).count();
        for (t, c) in counts.iter().enumerate() {
            assert_eq!(
                c.load(Ordering::Relaxed),
                expected(t),
                "task {t} on {threads} threads"
            );
        }
        let nested = AtomicUsize::new(0);
        pool.for_each(3, &|_| {
            pool.for_each(4, &|_| {
                nested.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(nested.load(Ordering::Relaxed), 12);
    }
}
