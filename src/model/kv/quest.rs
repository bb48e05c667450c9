//! Quest: nothing is evicted; each page of `page` consecutive keys keeps the
//! per-channel minimum and maximum of its keys beside the cache, and each
//! query attends only to the pages whose upper bound of q·k,
//! Σ_i max(q_i·min_i, q_i·max_i), is largest. Under grouped-query attention
//! the bounds of a group's query heads are summed, so the selection is per
//! KV head and K/V are never copied per query head. The first page (the
//! attention sinks) and the query's own page are always attended to.
//!
//! Two ways to attend to the selection, the same numbers: a decode step
//! gathers the selected keys (executed: it reads only them); a prefill pass
//! of many queries masks the others (simulated: it saves nothing).

use std::ops::Range;

use candle_core::{DType, Result, Tensor};

use crate::model::attention;
use crate::model::transformer::{row_dots, KeyRuns, StoredKeys};

/// Per KV head, the min and max of each page's keys, (pages · head dim).
#[derive(Debug, Clone, Default)]
pub struct PageBounds {
    page: usize,
    head_dim: usize,
    mins: Vec<Vec<f32>>,
    maxs: Vec<Vec<f32>>,
    /// Slots summarised so far (the last page may be partial).
    slots: usize,
}

/// Per KV head, per query of the pass: the pages attended to, or `None`
/// when the query sees no more keys than the budget (all of them).
pub type Picks = Vec<Vec<Option<Vec<u32>>>>;

impl PageBounds {
    pub fn new(page: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self {
            page,
            head_dim,
            mins: vec![Vec::new(); kv_heads],
            maxs: vec![Vec::new(); kv_heads],
            slots: 0,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn pages(&self) -> usize {
        self.slots.div_ceil(self.page)
    }

    /// Brings the bounds up to date with `keys` (1, kv heads, n, head dim):
    /// recomputes the last partial page and the pages after it.
    pub fn update(&mut self, keys: &Tensor) -> Result<()> {
        let n = keys.dim(2)?;
        let from = self.stale_from(n);
        if from >= n {
            return Ok(());
        }
        let fresh = keys
            .narrow(2, from, n - from)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_vec3::<f32>()?;
        self.summarise(from, n, |h, j| &fresh[h][j - from]);
        Ok(())
    }

    /// `update` from a layer's f32 store as the lean path reads it.
    pub fn update_from_store(&mut self, keys: &StoredKeys) {
        let n = keys.positions.len();
        let from = self.stale_from(n);
        if from < n {
            let d = self.head_dim;
            self.summarise(from, n, |h, j| {
                &keys.k[h * keys.head_stride + j * keys.key_stride..][..d]
            });
        }
    }

    /// The first slot whose page must be (re)summarised for `n` slots.
    fn stale_from(&mut self, n: usize) -> usize {
        if n < self.slots {
            // Rolled back: start over.
            *self = Self::new(self.page, self.mins.len(), self.head_dim);
        }
        (self.slots / self.page) * self.page
    }

    /// Min and max per page of slots `from..n` (`from` starts a page);
    /// `key(h, j)` is KV head h's key in slot j.
    fn summarise<'k>(&mut self, from: usize, n: usize, key: impl Fn(usize, usize) -> &'k [f32]) {
        let (d, page) = (self.head_dim, self.page);
        for h in 0..self.mins.len() {
            self.mins[h].truncate(from / page * d);
            self.maxs[h].truncate(from / page * d);
            for start in (from..n).step_by(page) {
                let mut lo = vec![f32::INFINITY; d];
                let mut hi = vec![f32::NEG_INFINITY; d];
                for j in start..(start + page).min(n) {
                    for (i, &x) in key(h, j).iter().enumerate() {
                        lo[i] = lo[i].min(x);
                        hi[i] = hi[i].max(x);
                    }
                }
                self.mins[h].extend(lo);
                self.maxs[h].extend(hi);
            }
        }
        self.slots = n;
    }

    /// `bounds` for the lean path's queries (rows × heads · head dim). The
    /// group's Σ_h Σ_i max(q_hi·min_i, q_hi·max_i) is P·max + N·min with
    /// P = Σ_h relu(q_h) and N = Σ_h min(q_h, 0): two dots per page.
    pub fn bounds_of_rows(&self, q: &[f32], heads: usize) -> Vec<Vec<Vec<f32>>> {
        let (d, nkv) = (self.head_dim, self.mins.len());
        let group = heads / nkv;
        let rows = q.len() / (heads * d);
        let pages = self.pages();
        (0..nkv)
            .map(|g| {
                (0..rows)
                    .map(|r| {
                        let (mut pos, mut neg) = (vec![0.0f32; d], vec![0.0f32; d]);
                        for h in g * group..(g + 1) * group {
                            for (i, &x) in q[(r * heads + h) * d..][..d].iter().enumerate() {
                                pos[i] += x.max(0.0);
                                neg[i] += x.min(0.0);
                            }
                        }
                        let (mut up, mut down) = (vec![0.0; pages], vec![0.0; pages]);
                        row_dots(&pos, &self.maxs[g], &mut up);
                        row_dots(&neg, &self.mins[g], &mut down);
                        up.iter().zip(&down).map(|(a, b)| a + b).collect()
                    })
                    .collect()
            })
            .collect()
    }

    /// Upper bounds of q·k per page, summed over each KV head's group of
    /// query heads: q (1, heads, t, head dim) → [kv head][query][page].
    pub fn bounds(&self, q: &Tensor) -> Result<Vec<Vec<Vec<f32>>>> {
        let (b, nh, t, d) = q.dims4()?;
        let nkv = self.mins.len();
        let pages = self.pages();
        let dev = q.device();
        let table = |v: &[Vec<f32>]| -> Result<Tensor> {
            let flat: Vec<f32> = v.iter().flatten().copied().collect();
            Tensor::from_vec(flat, (1, nkv, pages, d), dev)
        };
        let (mins, maxs) = (table(&self.mins)?, table(&self.maxs)?);
        let q = q
            .to_dtype(DType::F32)?
            .reshape((b, nkv, (nh / nkv) * t, d))?;
        let pos = q.relu()?;
        let neg = (&q - &pos)?;
        let bound = (pos.matmul(&maxs.t()?)? + neg.matmul(&mins.t()?)?)?;
        bound
            .reshape((nkv, nh / nkv, t, pages))?
            .sum(1)?
            .to_vec3::<f32>()
    }
}

/// Upper bound of q·k over a page with per-channel `min` and `max`.
pub fn page_bound(q: &[f32], min: &[f32], max: &[f32]) -> f32 {
    q.iter()
        .zip(min.iter().zip(max))
        .map(|(&qi, (&lo, &hi))| (qi * lo).max(qi * hi))
        .sum()
}

/// The pages one query attends to: the first, its own (`own`, the last it
/// can see) and the best of the others by `bound`, `pages` in all,
/// increasing.
pub fn choose_pages(bound: &[f32], own: usize, pages: usize) -> Vec<u32> {
    let middle = &bound[1.min(own)..own];
    let best = super::evict::top_k(middle, pages.saturating_sub(2));
    let mut chosen: Vec<u32> = std::iter::once(0)
        .chain(best.into_iter().map(|p| (p + 1) as u32))
        .chain(std::iter::once(own as u32))
        .collect();
    chosen.dedup();
    chosen
}

/// The selection for queries at `query_positions` over keys at
/// `key_positions`: per KV head and query, the pages it attends to.
pub fn pick(
    bounds: &[Vec<Vec<f32>>],
    key_positions: &[u32],
    query_positions: &[u32],
    budget: usize,
    page: usize,
) -> Picks {
    let visible = visible_counts(key_positions, query_positions);
    bounds
        .iter()
        .map(|per_query| {
            per_query
                .iter()
                .zip(&visible)
                .map(|(bound, &vis)| {
                    (vis > budget).then(|| choose_pages(bound, (vis - 1) / page, budget / page))
                })
                .collect()
        })
        .collect()
}

/// Per query, how many of the keys (increasing positions) it may see.
pub fn visible_counts(key_positions: &[u32], query_positions: &[u32]) -> Vec<usize> {
    query_positions
        .iter()
        .map(|&q| key_positions.partition_point(|&p| p <= q))
        .collect()
}

/// The slots page `p` covers (the last page may be cut by the slots there are).
pub fn page_span(p: u32, page: usize) -> Range<usize> {
    p as usize * page..(p as usize + 1) * page
}

/// The slots a query's pages cover among its `visible` slots.
pub fn slots(pages: &[u32], page: usize, visible: usize) -> impl Iterator<Item = usize> + '_ {
    pages.iter().flat_map(move |&p| {
        let span = page_span(p, page);
        span.start..span.end.min(visible)
    })
}

/// The picks as the lean path's key runs: per query row and KV head.
pub fn runs(picks: &Picks, page: usize) -> KeyRuns {
    let rows = picks.first().map_or(0, Vec::len);
    (0..rows)
        .map(|r| {
            picks
                .iter()
                .map(|per_query| {
                    per_query[r]
                        .as_ref()
                        .map(|pages| pages.iter().map(|&p| page_span(p, page)).collect())
                })
                .collect()
        })
        .collect()
}

/// Attention of q (1, heads, t, hd) over k, v (1, kv heads, n, hd) limited to
/// the picked pages, by an additive mask (every query of a prefill pass).
pub fn masked_attention(
    q: &Tensor,
    kv: (&Tensor, &Tensor),
    picks: &Picks,
    visible: &[usize],
    page: usize,
) -> Result<Tensor> {
    let (k, v) = kv;
    let (b, nh, t, hd) = q.dims4()?;
    let (nkv, n) = (k.dim(1)?, k.dim(2)?);
    let group = nh / nkv;
    let mut mask = vec![f32::NEG_INFINITY; nkv * group * t * n];
    for (h, per_query) in picks.iter().enumerate() {
        for (i, chosen) in per_query.iter().enumerate() {
            for g in 0..group {
                let row = &mut mask[((h * group + g) * t + i) * n..][..n];
                match chosen {
                    None => row[..visible[i]].fill(0.0),
                    Some(pages) => slots(pages, page, visible[i]).for_each(|s| row[s] = 0.0),
                }
            }
        }
    }
    let mask = Tensor::from_vec(mask, (b, nkv, group * t, n), q.device())?.to_dtype(q.dtype())?;
    let qs = (q.reshape((b, nkv, group * t, hd))? * (1.0 / (hd as f64).sqrt()))?;
    let scores = (qs.matmul(&k.t()?)? + mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs
        .matmul(v)?
        .reshape((b, nh, t, hd))?
        .transpose(1, 2)?
        .reshape((b, t, nh * hd))
}

/// The same for one query (a decode step), by gathering the picked keys
/// and values: reads only those. `None` when the heads' selections differ
/// in size (cannot happen with full pages; the caller then masks).
pub fn gathered_attention(
    q: &Tensor,
    kv: (&Tensor, &Tensor),
    picks: &Picks,
    visible: usize,
    page: usize,
) -> Result<Option<Tensor>> {
    let (k, v) = kv;
    let dev = q.device();
    let per_head: Vec<Vec<u32>> = picks
        .iter()
        .map(|p| match &p[0] {
            Some(pages) => slots(pages, page, visible).map(|s| s as u32).collect(),
            None => (0..visible as u32).collect(),
        })
        .collect();
    if per_head.windows(2).any(|w| w[0].len() != w[1].len()) {
        return Ok(None);
    }
    let gather = |t: &Tensor| -> Result<Tensor> {
        let heads = per_head
            .iter()
            .enumerate()
            .map(|(h, idx)| {
                let idx = Tensor::new(idx.as_slice(), dev)?;
                t.narrow(1, h, 1)?
                    .squeeze(1)?
                    .squeeze(0)?
                    .contiguous()?
                    .index_select(&idx, 0)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&heads, 0)?.unsqueeze(0)
    };
    attention::attend(q, &gather(k)?, &gather(v)?, None, false).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_and_own_pages_are_always_chosen() {
        let bound = [0.0, 9.0, 1.0, 8.0, -5.0];
        assert_eq!(choose_pages(&bound, 4, 3), vec![0, 1, 4]);
        assert_eq!(choose_pages(&bound, 4, 4), vec![0, 1, 3, 4]);
        assert_eq!(choose_pages(&bound, 1, 4), vec![0, 1]);
    }

    fn numbers(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 7919) % 211) as f32 / 53.0 - 2.0)
            .collect()
    }

    /// The lean path's bounds (from the store's slices and the queries'
    /// rows) equal the candle path's (from tensors), partial last page included.
    #[test]
    fn bounds_from_the_store_equal_bounds_from_tensors() {
        let (kv_heads, heads, d, n, cap, page) = (2, 6, 8, 37, 40, 16);
        let dev = candle_core::Device::Cpu;
        // Head-major store with capacity `cap`, as `KvStore::with_f32` hands it.
        let store = numbers(kv_heads * cap * d, 3);
        let mut dense = Vec::new();
        for h in 0..kv_heads {
            dense.extend_from_slice(&store[h * cap * d..][..n * d]);
        }
        let keys = Tensor::from_vec(dense, (1, kv_heads, n, d), &dev).unwrap();
        let positions: Vec<u32> = (0..n as u32).collect();
        let view = StoredKeys {
            k: &store,
            v: &store,
            head_stride: cap * d,
            key_stride: d,
            positions: &positions,
        };
        let (mut a, mut b) = (
            PageBounds::new(page, kv_heads, d),
            PageBounds::new(page, kv_heads, d),
        );
        a.update(&keys.narrow(2, 0, 20).unwrap()).unwrap();
        a.update(&keys).unwrap();
        b.update_from_store(&view);
        assert_eq!(
            (a.mins.clone(), a.maxs.clone()),
            (b.mins.clone(), b.maxs.clone())
        );
        let rows = 2;
        let q = numbers(rows * heads * d, 11);
        // (1, heads, rows, d) from rows × heads · d.
        let qt = Tensor::from_vec(q.clone(), (1, rows, heads, d), &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let want = a.bounds(&qt).unwrap();
        let got = b.bounds_of_rows(&q, heads);
        assert_eq!(got.len(), kv_heads);
        for (w, g) in want.iter().flatten().zip(got.iter().flatten()) {
            assert_eq!(w.len(), 3);
            for (x, y) in w.iter().zip(g) {
                assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn picks_become_runs_per_row_and_kv_head() {
        let picks: Picks = vec![vec![Some(vec![0, 2]), None], vec![None, Some(vec![1])]];
        let runs = runs(&picks, 4);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0], vec![Some(vec![0..4, 8..12]), None]);
        assert_eq!(runs[1], vec![None, Some(std::iter::once(4..8).collect())]);
    }
}
