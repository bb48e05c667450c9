//! Measures the quantized kernels against candle's `QMatMul::forward` on the same weights, for
//! SmolLM2-135M's matrix shapes and 1..16 activation rows (decode and speculative verify).
//!
//! `cargo run --example kernel_bench [-- q4_1|q4_0|q5_0|q5_1|q8_0|q4k|q6k]`. The numbers are only as good
//! as the machine is quiet: run it when nothing else is.

use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use scalpel::kernels::{active_kernel, pool, Kernel, QWeight};

const SHAPES: [(usize, usize); 5] = [
    (576, 576),
    (192, 576),
    (1536, 576),
    (576, 1536),
    (49152, 576),
];
const ROWS: [usize; 5] = [1, 2, 4, 8, 16];

/// Median seconds per call over repeats filling about `budget` seconds.
fn time(budget: f64, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    f();
    let once = start.elapsed().as_secs_f64().max(1e-7);
    let reps = ((budget / once) as usize).clamp(3, 2000);
    let mut ts: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    ts.sort_by(|a, b| a.total_cmp(b));
    ts[reps / 2]
}

fn main() -> candle_core::Result<()> {
    let dtype = match std::env::args().nth(1).as_deref() {
        None | Some("q4_1") => GgmlDType::Q4_1,
        Some("q4_0") => GgmlDType::Q4_0,
        Some("q5_0") => GgmlDType::Q5_0,
        Some("q5_1") => GgmlDType::Q5_1,
        Some("q8_0") => GgmlDType::Q8_0,
        Some("q4k") => GgmlDType::Q4K,
        Some("q6k") => GgmlDType::Q6K,
        Some(other) => {
            candle_core::bail!("unknown format {other}: q4_1, q4_0, q5_0, q5_1, q8_0, q4k or q6k")
        }
    };
    let kernel = active_kernel();
    println!(
        "measured: {dtype:?} weights, kernel {} (available: {:?}), {} threads; candle column is \
         QMatMul::forward on the same weights{}",
        kernel.name(),
        Kernel::all_available(),
        pool().threads(),
        if dtype == GgmlDType::Q4_1 {
            ", candle-q8 on the Q8_0 copy scalpel decodes with today"
        } else {
            ""
        }
    );
    println!(
        "{:>12} {:>4} {:>10} {:>8} {:>10} {:>10} {:>8}",
        "shape", "rows", "ours ms", "GB/s", "candle ms", "candle-q8", "speedup"
    );
    for (out, inp) in SHAPES {
        if inp % dtype.block_size() != 0 {
            println!(
                "{:>12} skipped: {inp} columns are not a multiple of {dtype:?}'s {}-element blocks",
                format!("{out}x{inp}"),
                dtype.block_size()
            );
            continue;
        }
        let budget = 0.3;
        let wf = Tensor::randn(0f32, 1.0, (out, inp), &Device::Cpu)?;
        let q = Arc::new(QTensor::quantize(&wf, dtype)?);
        let bytes = q.storage_size_in_bytes() as f64;
        let qw = QWeight::from_qtensor(q.clone())?.expect("a format with a kernel");
        let mm = QMatMul::from_arc(q)?;
        let q8 = (dtype == GgmlDType::Q4_1)
            .then(|| QMatMul::from_arc(Arc::new(QTensor::quantize(&wf, GgmlDType::Q8_0)?)))
            .transpose()?;
        for rows in ROWS {
            let x = Tensor::randn(0f32, 1.0, (rows, inp), &Device::Cpu)?;
            let xv = x.flatten_all()?.to_vec1::<f32>()?;
            let mut y = vec![0f32; rows * out];
            let ours = time(budget, || qw.matmul(&xv, rows, &mut y));
            let theirs = time(budget, || {
                mm.forward(&x).unwrap();
            });
            let theirs8 = match &q8 {
                Some(m) => format!(
                    "{:10.3}",
                    1e3 * time(budget, || {
                        m.forward(&x).unwrap();
                    })
                ),
                None => format!("{:>10}", "-"),
            };
            println!(
                "{:>12} {rows:>4} {:10.3} {:8.1} {:10.3} {theirs8} {:7.2}x",
                format!("{out}x{inp}"),
                1e3 * ours,
                bytes / ours / 1e9,
                1e3 * theirs,
                theirs / ours
            );
        }
    }
    Ok(())
}
