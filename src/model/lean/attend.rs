//! Grouped-query attention of a pass's rotated queries over one layer's
//! stored keys, parallel over (row, head) on the kernels' pool. Which keys a
//! query sees follows `model::mask`: keys at positions ≤ its own, within
//! the sliding window; gaps and evictions follow from the positions.

use std::ops::Range;

use super::ops::{scaled_dots, softmax_in_place, weighted_sum, Shared, Strided};
use crate::kernels;

/// Per query row, per KV head: the runs of key indices the query attends
/// to (a KV policy's selection, Quest's pages), or `None` for every key it
/// sees. Runs are disjoint; each is clipped to the keys the query sees.
pub type KeyRuns = Vec<Vec<Option<Vec<Range<usize>>>>>;

/// Keys and values as f32: key `j` of KV head `g` starts at
/// `g · head_stride + j · key_stride`, at position `positions[j]`.
pub struct Keys<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub head_stride: usize,
    pub key_stride: usize,
    pub positions: &'a [u32],
}

#[derive(Clone, Copy)]
pub struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// The key indices `lo..hi` a query at `q` sees (as `AttentionMask::new`).
pub fn visible(keys: &[u32], q: u32, window: Option<usize>) -> (usize, usize) {
    let window = window.map_or(u64::MAX, |w| w as u64);
    let q = u64::from(q);
    let lo = keys.partition_point(|&p| u64::from(p).saturating_add(window) <= q);
    let hi = keys.partition_point(|&p| u64::from(p) <= q);
    (lo, hi.max(lo))
}

/// `ctx` (rows × heads · head_dim) = softmax(q·kᵀ / √hd) · v for queries
/// `q` (same shape) at `positions`, over every key each sees or only over
/// `runs` (which reads just those keys). `scores` is scratch, grown as
/// needed. Head subsets (a later mode) are a filter on the task list.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &[f32],
    positions: &[u32],
    keys: &Keys,
    window: Option<usize>,
    heads: Heads,
    runs: Option<&KeyRuns>,
    scores: &mut Vec<f32>,
    ctx: &mut [f32],
) {
    let Heads {
        n_heads,
        n_kv_heads,
        head_dim: hd,
    } = heads;
    let rows = positions.len();
    let qdim = n_heads * hd;
    let group = n_heads / n_kv_heads;
    let n_keys = keys.positions.len();
    let tasks = rows * n_heads;
    if scores.len() < tasks * n_keys {
        scores.resize(tasks * n_keys, 0.0);
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let out = Shared::new(ctx);
    let scratch = Shared::new(scores);
    let task = |i: usize| {
        let (r, h) = (i / n_heads, i % n_heads);
        let qv = &q[r * qdim + h * hd..][..hd];
        let g = h / group;
        let (lo, hi) = visible(keys.positions, positions[r], window);
        // SAFETY: task i alone writes its head's context and its scratch.
        let (o, s) = unsafe {
            (
                out.range(r * qdim + h * hd..r * qdim + (h + 1) * hd),
                scratch.range(i * n_keys..i * n_keys + (hi - lo)),
            )
        };
        o.fill(0.0);
        if hi == lo {
            return;
        }
        // Every visible key, or the chosen runs clipped to the visible ones
        // (no allocation: this runs per head, layer and step).
        let every = lo..hi;
        let chosen = runs
            .and_then(|runs| runs[r][g].as_deref())
            .unwrap_or(std::slice::from_ref(&every));
        let spans = || {
            chosen
                .iter()
                .map(|run| run.start.max(lo)..run.end.min(hi))
                .filter(|run| !run.is_empty())
        };
        let rows = |m, from: usize| Strided {
            m,
            start: g * keys.head_stride + from * keys.key_stride,
            stride: keys.key_stride,
        };
        let mut n = 0;
        for run in spans() {
            scaled_dots(qv, rows(keys.k, run.start), scale, &mut s[n..n + run.len()]);
            n += run.len();
        }
        if n == 0 {
            return;
        }
        softmax_in_place(&mut s[..n]);
        let mut n = 0;
        for run in spans() {
            weighted_sum(o, &s[n..n + run.len()], rows(keys.v, run.start));
            n += run.len();
        }
    };
    kernels::pool().for_each(tasks, &task);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    use crate::model::mask::AttentionMask;

    #[test]
    fn visible_keys_follow_the_mask_module() {
        let keys = [0u32, 1, 2, 5, 6, 9];
        let queries = [0u32, 3, 6, 9, 12];
        for window in [None, Some(1), Some(3), Some(8)] {
            let m = AttentionMask::new(&queries, &keys, window, &Device::Cpu, DType::F32, true)
                .unwrap()
                .unwrap();
            for (i, &q) in queries.iter().enumerate() {
                assert_eq!(
                    visible(&keys, q, window),
                    m.span(i, 1),
                    "q {q} w {window:?}"
                );
            }
        }
    }

    /// Naive attention for one query row and head.
    fn naive(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>]) -> Vec<f32> {
        let s: Vec<f32> = k
            .iter()
            .map(|kj| q.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() / (q.len() as f32).sqrt())
            .collect();
        let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f32 = e.iter().sum();
        let mut out = vec![0.0; q.len()];
        for (p, vj) in e.iter().zip(v) {
            for (o, x) in out.iter_mut().zip(vj) {
                *o += p / z * x;
            }
        }
        out
    }

    /// Checks `attend` for 4 query heads over 2 KV heads of 8 dims, stored
    /// head-major with `cap` slots, against naive attention over the keys
    /// `chosen(row, kv head)`.
    fn check_against_naive(
        cap: usize,
        key_pos: &[u32],
        (positions, window): (&[u32], Option<usize>),
        runs: Option<&KeyRuns>,
        chosen: impl Fn(usize, usize) -> Vec<usize>,
    ) {
        let heads = Heads {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
        };
        let f = |i: usize| ((i * 7919) % 101) as f32 / 50.0 - 1.0;
        let k: Vec<f32> = (0..2 * cap * 8).map(f).collect();
        let v: Vec<f32> = (0..2 * cap * 8).map(|i| f(i + 13)).collect();
        let keys = Keys {
            k: &k,
            v: &v,
            head_stride: cap * 8,
            key_stride: 8,
            positions: key_pos,
        };
        let rows = positions.len();
        let q: Vec<f32> = (0..rows * 32).map(|i| f(i + 29)).collect();
        let mut ctx = vec![0.0; rows * 32];
        let mut scores = Vec::new();
        attend(
            &q,
            positions,
            &keys,
            window,
            heads,
            runs,
            &mut scores,
            &mut ctx,
        );
        for r in 0..rows {
            for h in 0..4 {
                let g = h / 2;
                let row = |base: &[f32], j: usize| base[(g * cap + j) * 8..][..8].to_vec();
                let ks: Vec<_> = chosen(r, g).iter().map(|&j| row(&k, j)).collect();
                let vs: Vec<_> = chosen(r, g).iter().map(|&j| row(&v, j)).collect();
                let want = naive(&q[r * 32 + h * 8..][..8], &ks, &vs);
                let got = &ctx[r * 32 + h * 8..][..8];
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "row {r} head {h}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn grouped_heads_read_their_kv_head_and_see_only_visible_keys() {
        let key_pos = [0u32, 1, 2, 3, 4];
        let positions = [2u32, 4];
        check_against_naive(6, &key_pos, (&positions, Some(2)), None, |r, _| {
            let (lo, hi) = visible(&key_pos, positions[r], Some(2));
            assert_eq!(hi - lo, 2);
            assert!(hi <= key_pos.len());
            (lo..hi).collect()
        });
    }

    #[test]
    fn runs_limit_each_query_to_its_kv_heads_chosen_keys() {
        let key_pos: Vec<u32> = (0..10).collect();
        let positions = [6u32, 9];
        // Row 0: head 0 keys 0..2 and 4..8 (clipped to 0..=6), head 1 all.
        // Row 1: head 0 all, head 1 keys 8..10 and 1..3.
        let runs: KeyRuns = vec![
            vec![Some(vec![0..2, 4..8]), None],
            vec![None, Some(vec![8..10, 1..3])],
        ];
        check_against_naive(12, &key_pos, (&positions, None), Some(&runs), |r, g| {
            let hi = positions[r] as usize + 1;
            match &runs[r][g] {
                None => (0..hi).collect(),
                Some(rs) => rs.iter().flat_map(|x| x.start..x.end.min(hi)).collect(),
            }
        });
    }
}
