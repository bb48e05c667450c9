//! Scaled dot-product attention with grouped-query heads, over prepared
//! (rotated, cached) q of shape (b, heads, t, hd) and k, v of shape
//! (b, kv heads, keys, hd). Returns (b, t, heads · hd).
//!
//! Two ways to compute the same thing:
//! - `dense`: one matmul for all scores, an additive mask, candle's softmax.
//!   Runs on every device and carries gradients.
//! - `blocked`: for the fused CPU path. Queries go in blocks of
//!   `QUERY_BLOCK` positions and each block only multiplies against the keys
//!   it can see, so the causal half of the score matrix (half of the
//!   attention FLOPs at t = 512) is never computed. Tests hold it equal to
//!   `dense`.

use candle_core::{Result, Tensor, D};

use super::mask::AttentionMask;

/// Query positions per block: large enough for efficient matmuls, small
/// enough that the skipped triangle is most of the waste (4 blocks at
/// t = 512 compute 62% of the full score matrix).
const QUERY_BLOCK: usize = 128;

pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&AttentionMask>,
    differentiable: bool,
) -> Result<Tensor> {
    match mask {
        Some(m) if m.is_fused() && !differentiable => blocked(q, k, v, m),
        _ => dense(q, k, v, mask, differentiable),
    }
}

fn scale(q: &Tensor) -> Result<Tensor> {
    let hd = q.dim(D::Minus1)?;
    // Scaling q (t·hd values) is cheaper than scaling the scores (t·keys).
    q * (1.0 / (hd as f64).sqrt())
}

fn dense(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&AttentionMask>,
    differentiable: bool,
) -> Result<Tensor> {
    Ok(dense_with_probs(q, k, v, mask, differentiable)?.0)
}

/// `dense`, also returning the attention probabilities (b, heads, t, keys)
/// for probes.
pub fn dense_with_probs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&AttentionMask>,
    differentiable: bool,
) -> Result<(Tensor, Tensor)> {
    let (b, nh, t, hd) = q.dims4()?;
    let (nkv, keys) = (k.dim(1)?, k.dim(2)?);
    // Grouped-query attention without copying K/V: fold the group of
    // query heads that share a KV head into the query length.
    let group = nh / nkv;
    let q = scale(&q.reshape((b, nkv, group * t, hd))?)?;
    let scores = q.matmul(&k.t()?)?;
    let probs = match (mask, differentiable) {
        (Some(m), _) if m.is_fused() => {
            m.softmax_rows(&scores.reshape((b, nkv * group, t, keys))?, 0, t, 1, 0)?
        }
        (Some(m), _) => m.softmax(&scores, differentiable)?,
        (None, false) => candle_nn::ops::softmax_last_dim(&scores)?,
        (None, true) => candle_nn::ops::softmax(&scores, D::Minus1)?,
    };
    let probs = probs.reshape((b, nkv, group * t, keys))?;
    let y = probs.matmul(v)?; // (b, nkv, group·t, hd)
    let y = y
        .reshape((b, nh, t, hd))?
        .transpose(1, 2)?
        .reshape((b, t, nh * hd))?;
    Ok((y, probs.reshape((b, nh, t, keys))?))
}

fn blocked(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    let group = nh / nkv;
    // Position-major rows (b, nkv, t·group, hd): a block of positions is a
    // contiguous run of rows.
    let q = scale(
        &q.reshape((b, nkv, group, t, hd))?
            .transpose(2, 3)?
            .contiguous()?
            .reshape((b, nkv, t * group, hd))?,
    )?;
    let blocks = (0..t)
        .step_by(QUERY_BLOCK)
        .map(|start| {
            let len = QUERY_BLOCK.min(t - start);
            // Only the keys some query of the block may see.
            let (lo, hi) = mask.span(start, len);
            let qb = q.narrow(2, start * group, len * group)?;
            let kb = k.narrow(2, lo, hi - lo)?;
            let scores = qb.matmul(&kb.t()?)?;
            let probs = mask.softmax_rows(&scores, start, len, group, lo)?;
            probs.matmul(&v.narrow(2, lo, hi - lo)?)
        })
        .collect::<Result<Vec<_>>>()?;
    // (b, nkv, t, group, hd) → (b, t, nkv·group·hd), heads in kv-major order.
    Tensor::cat(&blocks, 2)?
        .reshape((b, nkv, t, group * hd))?
        .transpose(1, 2)?
        .reshape((b, t, nh * hd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused::tests::assert_close;
    use candle_core::{DType, Device};

    #[test]
    fn blocked_equals_dense() {
        // 9 query heads on 3 KV heads; t spans several blocks and a partial
        // one; with and without a cache offset and a sliding window.
        for (t, pos, window) in [(300, 0, None), (260, 37, None), (300, 5, Some(100))] {
            let dev = Device::Cpu;
            let q = Tensor::randn(0f32, 1.0, (2, 9, t, 16), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (2, 3, pos + t, 16), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (2, 3, pos + t, 16), &dev).unwrap();
            let queries: Vec<u32> = (pos as u32..(pos + t) as u32).collect();
            let keys: Vec<u32> = (0..(pos + t) as u32).collect();
            let mask = |fused| {
                AttentionMask::new(&queries, &keys, window, &dev, DType::F32, fused)
                    .unwrap()
                    .unwrap()
            };
            let want = dense(&q, &k, &v, Some(&mask(false)), false).unwrap();
            let fused = mask(true);
            let got = attend(&q, &k, &v, Some(&fused), false).unwrap();
            assert_eq!(got.dims(), &[2, t, 9 * 16]);
            assert_close(&got, &want, 1e-5);
            // The dense path with the fused kernel agrees too.
            let (dense_fused, probs) = dense_with_probs(&q, &k, &v, Some(&fused), false).unwrap();
            assert_close(&dense_fused, &want, 1e-5);
            assert_eq!(probs.dims(), &[2, 9, t, pos + t]);
        }
    }
}
