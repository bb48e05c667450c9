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

use candle_core::{DType, Result, Tensor};

use crate::model::attention;

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
        if n < self.slots {
            // Rolled back: start over.
            *self = Self::new(self.page, self.mins.len(), self.head_dim);
        }
        let first_page = self.slots / self.page;
        let from = first_page * self.page;
        if from >= n {
            return Ok(());
        }
        let fresh = keys
            .narrow(2, from, n - from)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_vec3::<f32>()?;
        let d = self.head_dim;
        for (h, rows) in fresh.iter().enumerate() {
            self.mins[h].truncate(first_page * d);
            self.maxs[h].truncate(first_page * d);
            for chunk in rows.chunks(self.page) {
                let mut lo = vec![f32::INFINITY; d];
                let mut hi = vec![f32::NEG_INFINITY; d];
                for key in chunk {
                    for (i, &x) in key.iter().enumerate() {
                        lo[i] = lo[i].min(x);
                        hi[i] = hi[i].max(x);
                    }
                }
                self.mins[h].extend(lo);
                self.maxs[h].extend(hi);
            }
        }
        self.slots = n;
        Ok(())
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
    let visible: Vec<usize> = query_positions
        .iter()
        .map(|&q| key_positions.partition_point(|&p| p <= q))
        .collect();
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

/// The slots a query's pages cover among its `visible` slots.
pub fn slots(pages: &[u32], page: usize, visible: usize) -> impl Iterator<Item = usize> + '_ {
    pages
        .iter()
        .flat_map(move |&p| p as usize * page..((p as usize + 1) * page).min(visible))
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
}
