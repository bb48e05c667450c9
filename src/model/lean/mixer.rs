//! A replaced attention's mixer (`model::mixer`) on the lean path: the
//! recurrent form one row at a time, on plain f32 slices.
//!
//! Its q, k, v and o are quantized once to Q8_0 on first use: a decode
//! step reads 1.06 bytes per weight instead of the distilled f32's 4 (on
//! the candle ops a replaced plan decoded at 0.70× the base model; here at
//! about the skip plan's speed). Q4_1, what SmolLM2's attention reads, was
//! not measurably faster on this machine and rounds the distilled weights
//! harder; the gate stays f32. The rounding moves the logits less than the
//! quantized paths already differ from f32 (tests/mixer.rs).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Result, Tensor, TensorId};

use super::ops;
use crate::kernels::QWeight;
use crate::model::mixer::{tensor_names, Dims, MixerWeights, EPS};
use crate::model::pass::ParamSource;

/// One layer's mixer as this path runs it.
pub(super) struct LeanMixer {
    q: QWeight,
    k: QWeight,
    v: QWeight,
    o: QWeight,
    /// (kv heads, hidden), row-major.
    gate: Vec<f32>,
    gate_bias: Vec<f32>,
    /// The `mixer.N.q` tensor it was made from: another set of weights
    /// (another plan) under the same layer is converted again.
    source: TensorId,
}

/// Converted mixers by layer.
#[derive(Default)]
pub(super) struct Mixers(Mutex<HashMap<usize, Arc<LeanMixer>>>);

impl Mixers {
    /// Layer `layer`'s mixer from `params`, converted on first use; `None`
    /// when a shape has no Q8_0 kernel (the candle ops run it instead).
    /// Keyed by the weights' tensor: trained weights that change in place
    /// (a `Var`) are not run here (training passes are not quantized).
    pub(super) fn get(
        &self,
        params: &dyn ParamSource,
        layer: usize,
        dims: Dims,
    ) -> Result<Option<Arc<LeanMixer>>> {
        let names = tensor_names(layer);
        let Some(q) = params.tensor(&names[0]) else {
            return Ok(None);
        };
        let mut cache = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = cache.get(&layer).filter(|m| m.source == q.id()) {
            return Ok(Some(m.clone()));
        }
        let w = MixerWeights::from_params(params, layer, DType::F32)?;
        w.check(dims, layer)?;
        let Some(m) = LeanMixer::from_weights(&w, q.id())? else {
            return Ok(None);
        };
        let m = Arc::new(m);
        cache.insert(layer, m.clone());
        Ok(Some(m))
    }
}

/// The buffers one mixer pass works in (the lean workspace's).
pub(super) struct Buffers<'a> {
    /// The normed input, rows × hidden.
    pub h: &'a [f32],
    pub q: &'a mut [f32],
    pub k: &'a mut [f32],
    pub v: &'a mut [f32],
    /// The mixed values before o, rows × heads · head dim.
    pub y: &'a mut [f32],
    /// The output, rows × hidden.
    pub out: &'a mut [f32],
}

/// Per-head norms of q and k (Gemma 3's), with their epsilon.
pub(super) struct QkNorms<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub eps: f32,
}

impl LeanMixer {
    /// `w` (f32) converted, or `None` when a shape has no Q8_0 kernel.
    fn from_weights(w: &MixerWeights, source: TensorId) -> Result<Option<Self>> {
        let quantize = |t: &Tensor| -> Result<Option<QWeight>> {
            if t.dim(1)? % GgmlDType::Q8_0.block_size() != 0 {
                return Ok(None);
            }
            QWeight::from_qtensor(Arc::new(QTensor::quantize(t, GgmlDType::Q8_0)?))
        };
        let (Some(q), Some(k), Some(v), Some(o)) = (
            quantize(&w.q)?,
            quantize(&w.k)?,
            quantize(&w.v)?,
            quantize(&w.o)?,
        ) else {
            return Ok(None);
        };
        let flat = |t: &Tensor| -> Result<Vec<f32>> { t.flatten_all()?.to_vec1() };
        Ok(Some(LeanMixer {
            q,
            k,
            v,
            o,
            gate: flat(&w.gate)?,
            gate_bias: flat(&w.gate_bias)?,
            source,
        }))
    }

    /// `rows` tokens through the mixer, continuing the state `(s, z)`
    /// (kv heads × d × d and kv heads × d) and leaving it after the last.
    pub(super) fn run(
        &self,
        dims: Dims,
        rows: usize,
        b: Buffers,
        norms: Option<QkNorms>,
        (s, z): (&mut [f32], &mut [f32]),
    ) {
        let (nh, nkv, d, hidden) = (dims.heads, dims.kv_heads, dims.head_dim, dims.hidden);
        self.q.matmul(b.h, rows, b.q);
        self.k.matmul(b.h, rows, b.k);
        self.v.matmul(b.h, rows, b.v);
        if let Some(n) = norms {
            ops::rms_norm_in_place(b.q, n.q, n.eps);
            ops::rms_norm_in_place(b.k, n.k, n.eps);
        }
        features(b.q, d);
        features(b.k, d);
        let rep = nh / nkv;
        for r in 0..rows {
            let h = &b.h[r * hidden..(r + 1) * hidden];
            for g in 0..nkv {
                let logit =
                    ops::dot(&self.gate[g * hidden..(g + 1) * hidden], h) + self.gate_bias[g];
                let alpha = sigmoid(logit);
                let k = &b.k[(r * nkv + g) * d..][..d];
                let v = &b.v[(r * nkv + g) * d..][..d];
                let (sg, zg) = (
                    &mut s[g * d * d..(g + 1) * d * d],
                    &mut z[g * d..(g + 1) * d],
                );
                for (i, (srow, zi)) in sg.chunks_exact_mut(d).zip(zg.iter_mut()).enumerate() {
                    decay_add(srow, alpha, k[i], v);
                    *zi = alpha * *zi + k[i];
                }
                for j in 0..rep {
                    let head = g * rep + j;
                    let q = &b.q[(r * nh + head) * d..][..d];
                    let y = &mut b.y[(r * nh + head) * d..][..d];
                    y.fill(0.0);
                    for (i, srow) in sg.chunks_exact(d).enumerate() {
                        for (yj, sij) in y.iter_mut().zip(srow) {
                            *yj += q[i] * sij;
                        }
                    }
                    let den = ops::dot(q, zg) + EPS as f32;
                    for yj in y.iter_mut() {
                        *yj /= den;
                    }
                }
            }
        }
        self.o.matmul(b.y, rows, b.out);
    }
}

/// `row = α · row + k · v`.
#[inline]
fn decay_add(row: &mut [f32], alpha: f32, k: f32, v: &[f32]) {
    for (x, &vj) in row.iter_mut().zip(v) {
        *x = alpha * *x + k * vj;
    }
}

fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + (-a).exp())
}

/// φ(u) = elu(u / d^¼) + 1 in place, as `mixer::features`.
fn features(u: &mut [f32], head_dim: usize) {
    let scale = (head_dim as f32).powf(-0.25);
    for x in u.iter_mut() {
        let v = *x * scale;
        *x = if v >= 0.0 { v + 1.0 } else { v.exp() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::mixer::{forward, MixerState};
    use candle_core::Device;

    const DIMS: Dims = Dims {
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
        hidden: 64,
    };

    fn randn(shape: &[usize], std: f64) -> Tensor {
        Tensor::randn(0f32, std as f32, shape, &Device::Cpu).unwrap()
    }

    /// Weights already on the Q8_0 grid, so the two forms differ only by
    /// the kernels' 8-bit rounding of the activations.
    fn weights() -> MixerWeights {
        let (q, kv, h) = (128, 64, 64);
        let grid = |t: Tensor| {
            QTensor::quantize(&t, GgmlDType::Q8_0)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
        };
        MixerWeights {
            q: grid(randn(&[q, h], 0.15)),
            k: grid(randn(&[kv, h], 0.15)),
            v: grid(randn(&[kv, h], 0.15)),
            o: grid(randn(&[h, q], 0.1)),
            gate: randn(&[2, h], 0.1),
            gate_bias: Tensor::new(&[2.0f32, 0.5], &Device::Cpu).unwrap(),
        }
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Runs `x` (rows × hidden) through the lean mixer in pieces of `step` rows.
    fn lean(m: &LeanMixer, x: &[f32], rows: usize, step: usize) -> (Vec<f32>, Vec<f32>) {
        let (d, h) = (DIMS.head_dim, DIMS.hidden);
        let (mut s, mut z) = (vec![0.0; 2 * d * d], vec![0.0; 2 * d]);
        let mut out = vec![0.0; rows * h];
        for start in (0..rows).step_by(step) {
            let n = step.min(rows - start);
            let (mut q, mut k, mut v, mut y) = (
                vec![0.0; n * 128],
                vec![0.0; n * 64],
                vec![0.0; n * 64],
                vec![0.0; n * 128],
            );
            let b = Buffers {
                h: &x[start * h..(start + n) * h],
                q: &mut q,
                k: &mut k,
                v: &mut v,
                y: &mut y,
                out: &mut out[start * h..(start + n) * h],
            };
            m.run(DIMS, n, b, None, (&mut s, &mut z));
        }
        (out, s)
    }

    #[test]
    fn the_lean_mixer_equals_the_candle_form_and_carries_its_state() {
        let w = weights();
        let m = LeanMixer::from_weights(&w, w.q.id()).unwrap().unwrap();
        let rows = 40;
        let x = randn(&[1, rows, DIMS.hidden], 1.0);
        let mut st = MixerState::new();
        let want = flat(&forward(&w, &x, DIMS, None, Some(&mut st)).unwrap());
        let want_s = flat(st.s.as_ref().unwrap());
        let xs = flat(&x);
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let whole = lean(&m, &xs, rows, rows);
        for step in [1, 7] {
            // Row by row as decode runs it, or a few rows as a short prefill.
            assert_eq!(lean(&m, &xs, rows, step), whole, "pieces of {step} rows");
        }
        let (got, s) = whole;
        let worst = got
            .iter()
            .zip(&want)
            .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
        let worst_s = s
            .iter()
            .zip(&want_s)
            .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
        let scale_s = want_s.iter().fold(0f32, |a, v| a.max(v.abs()));
        // The kernels' 8-bit activations of q/k/v/o: measured 0.9% of the
        // output's largest value and 0.5% of the state's.
        assert!(
            worst < 1.5e-2 * scale,
            "output off by {worst} (largest {scale})"
        );
        assert!(
            worst_s < 1e-2 * scale_s,
            "state off by {worst_s} (largest {scale_s})"
        );
        assert!(worst > 0.0, "the quantized kernels ran");
    }
}
