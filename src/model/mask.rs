//! Which stored keys each query of a pass may see, decided from the
//! positions the layer's state holds, never from a global counter: causal
//! (key position ≤ query position) and within the sliding window if any.
//! Gaps (tokens that wrote no key here), evicted keys and rolled-back drafts
//! all follow from the positions.
//!
//! Keys are stored at increasing positions, so each query sees one
//! contiguous run of key indices; the mask is that run per query. The fused
//! CPU kernel reads only that run; elsewhere an additive mask is built.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, D};

use super::fused::RangeSoftmax;

pub struct AttentionMask {
    /// Per query (in pass order): the visible key indices `lo..hi`.
    ranges: Arc<Vec<(u32, u32)>>,
    keys: usize,
    additive: Option<Tensor>,
}

impl AttentionMask {
    /// The mask for queries at `query_pos` over keys at `key_pos`
    /// (increasing), or `None` when every query sees every key and the
    /// fused kernel cannot run. `fused`: the scores will be f32 on the CPU
    /// and need no gradient; then the fused kernel serves even a query that
    /// sees everything, so a decode step and a verify pass over several rows
    /// compute each row's softmax the same way (identical greedy output).
    pub fn new(
        query_pos: &[u32],
        key_pos: &[u32],
        window: Option<usize>,
        device: &Device,
        dtype: DType,
        fused: bool,
    ) -> Result<Option<Self>> {
        if key_pos.windows(2).any(|w| w[0] >= w[1]) {
            candle_core::bail!("attention mask: key positions must increase");
        }
        let window = window.map_or(u64::MAX, |w| w as u64);
        let ranges: Vec<(u32, u32)> = query_pos
            .iter()
            .map(|&q| {
                let q = u64::from(q);
                let lo = key_pos.partition_point(|&p| u64::from(p).saturating_add(window) <= q);
                let hi = key_pos.partition_point(|&p| u64::from(p) <= q);
                (lo as u32, hi.max(lo) as u32)
            })
            .collect();
        let keys = key_pos.len();
        let fused = fused && device.is_cpu() && dtype == DType::F32;
        let sees_all = ranges
            .iter()
            .all(|&(lo, hi)| lo == 0 && hi as usize == keys);
        if !fused && sees_all {
            return Ok(None);
        }
        let additive = if fused {
            None
        } else {
            Some(additive_mask(&ranges, keys, device)?.to_dtype(dtype)?)
        };
        Ok(Some(Self {
            ranges: Arc::new(ranges),
            keys,
            additive,
        }))
    }

    /// The fused kernel will run (f32 on the CPU, no gradients needed).
    pub fn is_fused(&self) -> bool {
        self.additive.is_none()
    }

    pub fn queries(&self) -> usize {
        self.ranges.len()
    }

    /// The key indices `lo..hi` that any of queries `first..first + n` sees.
    pub fn span(&self, first: usize, n: usize) -> (usize, usize) {
        let rs = &self.ranges[first..first + n];
        let lo = rs.iter().map(|r| r.0).min().unwrap_or(0) as usize;
        let hi = rs.iter().map(|r| r.1).max().unwrap_or(0) as usize;
        (lo, hi.max(lo))
    }

    /// Softmax over the last dimension of scores (..., rows, keys) whose
    /// rows are queries `r % queries` (group-major): adds the mask and runs
    /// candle's softmax (`differentiable`: the op with gradients). A fused
    /// mask has no tensor to add; its scores go through `softmax_rows`.
    pub fn softmax(&self, scores: &Tensor, differentiable: bool) -> Result<Tensor> {
        let Some(mask) = &self.additive else {
            candle_core::bail!("causal softmax: a fused mask runs through softmax_rows");
        };
        let (rows, keys) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
        let t = self.queries();
        let lead: usize = scores.dims()[..scores.rank() - 2].iter().product();
        let masked = scores
            .reshape((lead * rows / t, t, keys))?
            .broadcast_add(mask)?
            .reshape(scores.shape())?;
        if differentiable {
            candle_nn::ops::softmax(&masked, D::Minus1)
        } else {
            candle_nn::ops::softmax_last_dim(&masked)
        }
    }

    /// The fused kernel on scores (..., queries·per_position, keys) whose
    /// rows are query-major: `per_position` consecutive rows (the query
    /// heads sharing a KV head) for each of the queries `first..first + n`;
    /// column c is key `key_offset + c`.
    pub fn softmax_rows(
        &self,
        scores: &Tensor,
        first: usize,
        n: usize,
        per_position: usize,
        key_offset: usize,
    ) -> Result<Tensor> {
        if !self.is_fused() {
            candle_core::bail!("causal softmax: the fused kernel cannot run here");
        }
        scores.contiguous()?.apply_op1_no_bwd(&RangeSoftmax {
            ranges: self.ranges.clone(),
            first,
            queries: n,
            per_position,
            key_offset,
        })
    }

    /// Keys the mask was built for.
    pub fn keys(&self) -> usize {
        self.keys
    }
}

/// Additive mask (queries, keys): 0 where visible, -inf elsewhere.
fn additive_mask(ranges: &[(u32, u32)], keys: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = ranges
        .iter()
        .flat_map(|&(lo, hi)| {
            (0..keys).map(move |j| {
                if (lo as usize..hi as usize).contains(&j) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (ranges.len(), keys), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused::tests::assert_close;

    fn positions(r: std::ops::Range<u32>) -> Vec<u32> {
        r.collect()
    }

    #[test]
    fn fused_softmax_matches_mask_and_softmax() {
        // (batch, kv heads, group·t rows, keys): a cache offset, a window,
        // and keys with gaps (tokens that wrote no key here).
        let cases: Vec<(Vec<u32>, Vec<u32>, Option<usize>)> = vec![
            (positions(0..7), positions(0..7), None),
            (positions(3..8), positions(0..8), None),
            (positions(2..8), positions(0..8), Some(4)),
            (vec![5, 6, 9], vec![0, 1, 4, 5, 6, 9], Some(5)),
        ];
        for (q, k, window) in cases {
            let t = q.len();
            let scores = Tensor::randn(0f32, 3.0, (2, 3, 2 * t, k.len()), &Device::Cpu).unwrap();
            let mask = |fused| {
                AttentionMask::new(&q, &k, window, &Device::Cpu, DType::F32, fused)
                    .unwrap()
                    .unwrap()
            };
            let fallback = mask(false);
            assert!(!fallback.is_fused());
            let want = fallback.softmax(&scores, false).unwrap();
            let fused = mask(true);
            assert!(fused.is_fused());
            // Group-major rows: one row per query.
            let got = fused.softmax_rows(&scores, 0, t, 1, 0).unwrap();
            assert_close(&got, &want, 1e-6);
            assert_close(&fallback.softmax(&scores, true).unwrap(), &want, 1e-6);
        }
    }

    #[test]
    fn the_mask_hides_future_out_of_window_and_missing_keys() {
        let inf = f32::NEG_INFINITY;
        let m = AttentionMask::new(
            &[1, 2, 3],
            &positions(0..4),
            Some(2),
            &Device::Cpu,
            DType::F32,
            false,
        )
        .unwrap()
        .unwrap();
        let rows: Vec<Vec<f32>> = m.additive.as_ref().unwrap().to_vec2().unwrap();
        assert_eq!(
            rows,
            vec![
                vec![0.0, 0.0, inf, inf],
                vec![inf, 0.0, 0.0, inf],
                vec![inf, inf, 0.0, 0.0]
            ]
        );
        // Key 2 is missing (a gap): query 3 sees positions 0, 1, 3.
        let m = AttentionMask::new(&[3], &[0, 1, 3, 4], None, &Device::Cpu, DType::F32, true)
            .unwrap()
            .unwrap();
        assert_eq!(m.span(0, 1), (0, 3));
    }

    #[test]
    fn a_query_that_sees_everything_needs_no_mask_tensor() {
        let all = positions(0..10);
        let none = AttentionMask::new(&[9], &all, None, &Device::Cpu, DType::F32, false).unwrap();
        assert!(none.is_none());
        // The fused kernel still runs, as it does for several rows.
        let fused = AttentionMask::new(&[9], &all, None, &Device::Cpu, DType::F32, true).unwrap();
        assert_eq!(fused.unwrap().span(0, 1), (0, 10));
        // Past the window, decode needs one.
        let some = AttentionMask::new(
            &[9],
            &positions(0..10),
            Some(4),
            &Device::Cpu,
            DType::F32,
            true,
        )
        .unwrap()
        .unwrap();
        assert_eq!(some.span(0, 1), (6, 10));
    }

    #[test]
    fn unordered_keys_are_refused() {
        assert!(
            AttentionMask::new(&[3], &[0, 2, 1], None, &Device::Cpu, DType::F32, true).is_err()
        );
    }
}
