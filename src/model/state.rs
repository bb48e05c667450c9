//! Per-layer sequence state: what each layer remembers of the tokens it has
//! seen. Every layer owns its keys' positions and its own length, so layers
//! may hold different tokens (a layer skipped while drafting holds fewer, a
//! sliding-window layer drops old ones, a routed token may leave a gap), and
//! masks are built from those positions, never from a global counter.
//!
//! Storage is preallocated along the key axis and written in place
//! (`slice_set`), so a decode step copies only its own row, and rollback is a
//! length change. Differentiable passes concatenate instead, so gradients
//! flow through the cache.

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Result, Storage, Tensor};

use super::mixer::MixerState;

/// Keys are allocated in steps of at least this many positions.
const MIN_CAPACITY: usize = 256;

/// One layer's keys and values, shape (batch, kv heads, capacity, head dim),
/// of which the first `len()` entries are live, at strictly increasing
/// positions.
#[derive(Debug)]
pub struct KvStore {
    k: Option<Tensor>,
    v: Option<Tensor>,
    positions: Vec<u32>,
    /// Keys further than this behind every future query are dropped when the
    /// buffer fills (Mistral's sliding window).
    window: Option<usize>,
    capacity_hint: usize,
}

impl KvStore {
    pub fn new(window: Option<usize>, capacity_hint: usize) -> Self {
        Self {
            k: None,
            v: None,
            positions: Vec::new(),
            window,
            capacity_hint,
        }
    }

    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Positions of the live keys, strictly increasing.
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    pub fn window(&self) -> Option<usize> {
        self.window
    }

    fn capacity(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dim(2).unwrap_or(0))
    }

    /// Live keys and values, (batch, kv heads, len, head dim) views.
    pub fn keys_values(&self) -> Result<Option<(Tensor, Tensor)>> {
        match (&self.k, &self.v) {
            (Some(k), Some(v)) if !self.is_empty() => {
                let n = self.len();
                Ok(Some((k.narrow(2, 0, n)?, v.narrow(2, 0, n)?)))
            }
            _ => Ok(None),
        }
    }

    /// Appends keys and values (batch, kv heads, t, head dim) for `positions`.
    /// `differentiable`: concatenate so gradients reach earlier entries.
    pub fn append(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        positions: &[u32],
        differentiable: bool,
    ) -> Result<()> {
        let t = k.dim(2)?;
        self.check_append(t, positions)?;
        if differentiable {
            let (k, v) = match self.keys_values()? {
                Some((pk, pv)) => (Tensor::cat(&[&pk, k], 2)?, Tensor::cat(&[&pv, v], 2)?),
                None => (k.clone(), v.clone()),
            };
            self.k = Some(k);
            self.v = Some(v);
            self.positions.extend_from_slice(positions);
            return Ok(());
        }
        self.reserve(k, v, positions)?;
        let n = self.len();
        let (dst_k, dst_v) = (self.k.as_ref().unwrap(), self.v.as_ref().unwrap());
        dst_k.slice_set(&k.contiguous()?, 2, n)?;
        dst_v.slice_set(&v.contiguous()?, 2, n)?;
        self.positions.extend_from_slice(positions);
        Ok(())
    }

    fn check_append(&self, t: usize, positions: &[u32]) -> Result<()> {
        if positions.len() != t {
            candle_core::bail!("kv append: {t} keys for {} positions", positions.len());
        }
        let increasing = positions.windows(2).all(|w| w[0] < w[1]);
        let after_last = match (self.positions.last(), positions.first()) {
            (Some(&last), Some(&first)) => first > last,
            _ => true,
        };
        if !increasing || !after_last {
            candle_core::bail!("kv append: positions must increase (roll back first)");
        }
        Ok(())
    }

    /// Room for `positions` after the live entries: drops what the sliding
    /// window no longer reaches, then grows if still needed.
    fn reserve(&mut self, k_like: &Tensor, v_like: &Tensor, positions: &[u32]) -> Result<()> {
        let t = positions.len();
        if let Some(&first) = positions.first() {
            if self.len() + t > self.capacity() {
                self.drop_unreachable(first)?;
            }
        }
        if self.len() + t > self.capacity() {
            self.grow(k_like, v_like, self.len() + t)?;
        }
        Ok(())
    }

    /// `append` for the lean CPU path: keys and values as f32 rows, one per
    /// position, each `kv_heads · head_dim` long (head-major), copied into
    /// the preallocated storage in place (no tensor is built unless the
    /// storage must grow). Same position rules and sliding window.
    pub fn append_rows(
        &mut self,
        k: &[f32],
        v: &[f32],
        positions: &[u32],
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let t = positions.len();
        let row = kv_heads * head_dim;
        if k.len() != t * row || v.len() != t * row {
            candle_core::bail!("kv append: rows of {row} expected for {t} positions");
        }
        self.check_append(t, positions)?;
        if self.len() + t > self.capacity() {
            let like = Tensor::zeros((1, kv_heads, 1, head_dim), DType::F32, &Device::Cpu)?;
            self.reserve(&like, &like, positions)?;
        }
        let at = self.len();
        for (dst, src) in [(&self.k, k), (&self.v, v)] {
            let dst = dst.as_ref().expect("kv storage reserved above");
            dst.inplace_op1(&WriteRows {
                rows: src,
                at,
                kv_heads,
                head_dim,
            })?;
        }
        self.positions.extend_from_slice(positions);
        Ok(())
    }

    /// The live storage as f32 slices for the lean CPU path: `f(keys,
    /// values, capacity)`, where key `j` of KV head `h` starts at
    /// `(h · capacity + j) · head_dim`. `None` when empty.
    pub fn with_f32<R>(&self, f: impl FnOnce(&[f32], &[f32], usize) -> R) -> Result<Option<R>> {
        let (Some(k), Some(v)) = (&self.k, &self.v) else {
            return Ok(None);
        };
        if self.is_empty() {
            return Ok(None);
        }
        let cap = self.capacity();
        let (ks, _) = k.storage_and_layout();
        let (vs, _) = v.storage_and_layout();
        match (&*ks, &*vs) {
            (Storage::Cpu(ks), Storage::Cpu(vs)) => {
                Ok(Some(f(ks.as_slice()?, vs.as_slice()?, cap)))
            }
            _ => candle_core::bail!("kv store: the lean path needs CPU storage"),
        }
    }

    /// Reallocates with room for at least `needed` entries, copying the live ones.
    fn grow(&mut self, k_like: &Tensor, v_like: &Tensor, needed: usize) -> Result<()> {
        let cap = needed
            .max(2 * self.capacity())
            .max(self.capacity_hint)
            .max(MIN_CAPACITY);
        let alloc = |like: &Tensor| -> Result<Tensor> {
            let (b, h, _, d) = like.dims4()?;
            Tensor::zeros((b, h, cap, d), like.dtype(), like.device())
        };
        let (nk, nv) = (alloc(k_like)?, alloc(v_like)?);
        if let Some((k, v)) = self.keys_values()? {
            nk.slice_set(&k.contiguous()?, 2, 0)?;
            nv.slice_set(&v.contiguous()?, 2, 0)?;
        }
        self.k = Some(nk);
        self.v = Some(nv);
        Ok(())
    }

    /// With a sliding window, drops the keys no query at `next` or later can
    /// see (they are behind the window), moving the rest to the front.
    fn drop_unreachable(&mut self, next: u32) -> Result<()> {
        let Some(w) = self.window else {
            return Ok(());
        };
        let horizon = u64::from(next).saturating_sub(w as u64 - 1);
        let keep_from = self.positions.partition_point(|&p| u64::from(p) < horizon);
        if keep_from == 0 {
            return Ok(());
        }
        let keep: Vec<usize> = (keep_from..self.len()).collect();
        self.select(&keep)
    }

    /// Drops every key at position `pos` or later (rollback).
    pub fn truncate_to_position(&mut self, pos: u32) {
        let n = self.positions.partition_point(|&p| p < pos);
        self.positions.truncate(n);
    }

    /// Keeps only the entries at `indices` (increasing), in order: eviction.
    pub fn select(&mut self, indices: &[usize]) -> Result<()> {
        if indices.windows(2).any(|w| w[0] >= w[1]) || indices.iter().any(|&i| i >= self.len()) {
            candle_core::bail!("kv select: indices must increase and be < {}", self.len());
        }
        if let Some((k, v)) = self.keys_values()? {
            let dev = k.device().clone();
            let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
            let idx = Tensor::new(idx.as_slice(), &dev)?;
            let sk = k.contiguous()?.index_select(&idx, 2)?;
            let sv = v.contiguous()?.index_select(&idx, 2)?;
            // The kept entries may overlap their new place: write via copies.
            if let (Some(dk), Some(dv)) = (&self.k, &self.v) {
                dk.slice_set(&sk.contiguous()?, 2, 0)?;
                dv.slice_set(&sv.contiguous()?, 2, 0)?;
            }
        }
        self.positions = indices.iter().map(|&i| self.positions[i]).collect();
        Ok(())
    }

    /// Per-head eviction: KV head `h` keeps its entries `keep[h]`
    /// (increasing, the same count for every head), in order. Heads then
    /// hold different tokens in one slot, so slot `j` takes position
    /// `slot_positions[j]` (increasing; a KV budget policy passes the latest
    /// position any head keeps there, so a later query still sees every
    /// slot, and keeps each head's own positions itself). Keys were rotated
    /// when written, so nothing is re-rotated.
    pub fn select_per_head(&mut self, keep: &[Vec<usize>], slot_positions: Vec<u32>) -> Result<()> {
        let n = slot_positions.len();
        let heads = self.k.as_ref().map_or(0, |k| k.dim(1).unwrap_or(0));
        if keep.len() != heads || keep.iter().any(|h| h.len() != n) {
            candle_core::bail!("kv select per head: {heads} heads, each keeping {n} entries");
        }
        let bad = |h: &Vec<usize>| {
            h.windows(2).any(|w| w[0] >= w[1]) || h.iter().any(|&i| i >= self.len())
        };
        if keep.iter().any(bad) || slot_positions.windows(2).any(|w| w[0] >= w[1]) {
            candle_core::bail!("kv select per head: indices and positions must increase");
        }
        if let (Some((k, v)), Some(dk), Some(dv)) = (self.keys_values()?, &self.k, &self.v) {
            let dev = k.device().clone();
            let mut ks = Vec::with_capacity(heads);
            let mut vs = Vec::with_capacity(heads);
            for (h, idx) in keep.iter().enumerate() {
                let idx: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
                let idx = Tensor::new(idx.as_slice(), &dev)?;
                let pick = |t: &Tensor| t.narrow(1, h, 1)?.contiguous()?.index_select(&idx, 2);
                ks.push(pick(&k)?);
                vs.push(pick(&v)?);
            }
            dk.slice_set(&Tensor::cat(&ks, 1)?, 2, 0)?;
            dv.slice_set(&Tensor::cat(&vs, 1)?, 2, 0)?;
        }
        self.positions = slot_positions;
        Ok(())
    }

    /// Bytes held by the live entries.
    pub fn bytes(&self) -> usize {
        match &self.k {
            Some(k) => {
                let (b, h, _, d) = k.dims4().unwrap_or((0, 0, 0, 0));
                2 * b * h * d * self.len() * k.dtype().size_in_bytes()
            }
            None => 0,
        }
    }

    /// An independent copy (a plain clone would share the written storage).
    pub fn deep_clone(&self) -> Result<Self> {
        let copy = |t: &Option<Tensor>| t.as_ref().map(|t| t.copy()).transpose();
        Ok(Self {
            k: copy(&self.k)?,
            v: copy(&self.v)?,
            positions: self.positions.clone(),
            window: self.window,
            capacity_hint: self.capacity_hint,
        })
    }
}

/// Copies f32 rows (t, kv heads · head dim) into a (1, kv heads, capacity,
/// head dim) buffer from entry `at` on, in place.
struct WriteRows<'a> {
    rows: &'a [f32],
    at: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl InplaceOp1 for WriteRows<'_> {
    fn name(&self) -> &'static str {
        "kv-write-rows"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let CpuStorage::F32(dst) = storage else {
            candle_core::bail!("kv store: the lean path writes f32 storage");
        };
        let (hd, row) = (self.head_dim, self.kv_heads * self.head_dim);
        let cap = layout.dims()[2];
        let base = layout.start_offset();
        for (t, src) in self.rows.chunks_exact(row).enumerate() {
            for h in 0..self.kv_heads {
                let d = base + (h * cap + self.at + t) * hd;
                dst[d..d + hd].copy_from_slice(&src[h * hd..(h + 1) * hd]);
            }
        }
        Ok(())
    }
}

/// What one layer keeps between passes.
#[derive(Debug)]
pub enum LayerState {
    Kv(KvStore),
    /// A layer whose attention is replaced by a mixer: a constant-size
    /// recurrent state, no keys.
    Mixer(MixerState),
}

/// The state of one sequence (a batch of sequences that advance together):
/// one entry per layer, and the position the next token will take.
#[derive(Debug)]
pub struct SeqState {
    layers: Vec<LayerState>,
    next_position: u32,
}

impl SeqState {
    /// Empty state; storage grows as tokens come. `windows[i]` is layer i's
    /// sliding window, if any.
    pub fn new(windows: &[Option<usize>]) -> Self {
        Self::with_capacity(windows, 0)
    }

    /// Empty state with room for `tokens` positions per layer up front.
    pub fn with_capacity(windows: &[Option<usize>], tokens: usize) -> Self {
        let layers = windows
            .iter()
            .map(|&w| {
                let hint = match w {
                    Some(w) => tokens.min(w + MIN_CAPACITY),
                    None => tokens,
                };
                LayerState::Kv(KvStore::new(w, hint))
            })
            .collect();
        Self {
            layers,
            next_position: 0,
        }
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Tokens the sequence has consumed: the position of the next one.
    pub fn next_position(&self) -> u32 {
        self.next_position
    }

    /// Moves the next position on by `tokens` (`forward_hidden` does this;
    /// callers that run layers piecewise with `run_layers` call it once).
    pub fn advance(&mut self, tokens: usize) {
        self.next_position += tokens as u32;
    }

    pub fn kv(&self, layer: usize) -> Option<&KvStore> {
        match self.layers.get(layer) {
            Some(LayerState::Kv(s)) => Some(s),
            _ => None,
        }
    }

    pub fn kv_mut(&mut self, layer: usize) -> Option<&mut KvStore> {
        match self.layers.get_mut(layer) {
            Some(LayerState::Kv(s)) => Some(s),
            _ => None,
        }
    }

    /// Layer `layer`'s recurrent mixer state, made on first use from its
    /// empty key store (a layer that already holds keys ran as attention:
    /// mixing the two would be wrong, so that is an error).
    pub fn mixer_mut(&mut self, layer: usize) -> Result<&mut MixerState> {
        let Some(l) = self.layers.get_mut(layer) else {
            candle_core::bail!("the sequence state has no layer {layer}");
        };
        if let LayerState::Kv(kv) = l {
            if !kv.is_empty() {
                candle_core::bail!(
                    "layer {layer} holds keys from an attention pass; a mixer cannot continue it"
                );
            }
            *l = LayerState::Mixer(MixerState::new());
        }
        match l {
            LayerState::Mixer(m) => Ok(m),
            LayerState::Kv(_) => unreachable!("converted above"),
        }
    }

    pub fn mixer(&self, layer: usize) -> Option<&MixerState> {
        match self.layers.get(layer) {
            Some(LayerState::Mixer(m)) => Some(m),
            _ => None,
        }
    }

    /// Forgets every token at `pos` or later, in every layer (rollback of
    /// rejected draft tokens).
    pub fn truncate(&mut self, pos: u32) {
        for l in &mut self.layers {
            match l {
                LayerState::Kv(s) => s.truncate_to_position(pos),
                LayerState::Mixer(m) => m.truncate_to_position(pos),
            }
        }
        self.next_position = self.next_position.min(pos);
    }

    /// Layers holding at least one key (for tests and memory reports).
    pub fn cached_layers(&self) -> Vec<usize> {
        (0..self.layers.len())
            .filter(|&i| self.kv(i).is_some_and(|s| !s.is_empty()))
            .collect()
    }

    /// Live entries per layer.
    pub fn lengths(&self) -> Vec<usize> {
        (0..self.layers.len())
            .map(|i| self.kv(i).map_or(0, KvStore::len))
            .collect()
    }

    /// Bytes held: keys and values, and any mixer's recurrent state.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerState::Kv(s) => s.bytes(),
                LayerState::Mixer(m) => m.bytes(),
            })
            .sum()
    }

    pub fn deep_clone(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                LayerState::Kv(s) => s.deep_clone().map(LayerState::Kv),
                LayerState::Mixer(m) => m.deep_clone().map(LayerState::Mixer),
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            next_position: self.next_position,
        })
    }
}

/// Contiguous positions `start..start + n` as u32.
pub fn position_range(start: u32, n: usize) -> Vec<u32> {
    (start..start + n as u32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn kv(t: usize, fill: f32) -> Tensor {
        (Tensor::ones((1, 2, t, 4), DType::F32, &Device::Cpu).unwrap() * f64::from(fill)).unwrap()
    }

    fn live_first_values(s: &KvStore) -> Vec<f32> {
        let (k, _) = s.keys_values().unwrap().unwrap();
        k.narrow(1, 0, 1)
            .unwrap()
            .narrow(3, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn append_grows_in_place_and_truncates() {
        let mut s = KvStore::new(None, 0);
        s.append(&kv(3, 1.0), &kv(3, 1.0), &[0, 1, 2], false)
            .unwrap();
        s.append(&kv(1, 2.0), &kv(1, 2.0), &[3], false).unwrap();
        assert_eq!(s.capacity(), MIN_CAPACITY);
        assert_eq!(live_first_values(&s), vec![1.0, 1.0, 1.0, 2.0]);
        s.truncate_to_position(2);
        assert_eq!(s.positions(), &[0, 1]);
        s.append(&kv(1, 5.0), &kv(1, 5.0), &[2], false).unwrap();
        assert_eq!(live_first_values(&s), vec![1.0, 1.0, 5.0]);
        // Growing past the capacity keeps the live entries.
        let big = MIN_CAPACITY;
        let pos: Vec<u32> = (3..3 + big as u32).collect();
        s.append(&kv(big, 7.0), &kv(big, 7.0), &pos, false).unwrap();
        assert_eq!(s.len(), 3 + big);
        assert_eq!(&live_first_values(&s)[..4], &[1.0, 1.0, 5.0, 7.0]);
    }

    #[test]
    fn positions_must_increase() {
        let mut s = KvStore::new(None, 0);
        s.append(&kv(2, 1.0), &kv(2, 1.0), &[0, 1], false).unwrap();
        assert!(s.append(&kv(1, 1.0), &kv(1, 1.0), &[1], false).is_err());
        assert!(s.append(&kv(2, 1.0), &kv(2, 1.0), &[5, 4], false).is_err());
    }

    #[test]
    fn a_sliding_window_drops_only_unreachable_keys_when_full() {
        let mut s = KvStore::new(Some(4), 0);
        let n = MIN_CAPACITY;
        let pos: Vec<u32> = (0..n as u32).collect();
        s.append(&kv(n, 1.0), &kv(n, 1.0), &pos, false).unwrap();
        s.append(&kv(1, 2.0), &kv(1, 2.0), &[n as u32], false)
            .unwrap();
        // The query at position n sees keys n-3..=n.
        let first = n as u32 - 3;
        assert_eq!(s.positions(), &[first, first + 1, first + 2, n as u32]);
        assert_eq!(live_first_values(&s), vec![1.0, 1.0, 1.0, 2.0]);
    }

    #[test]
    fn select_keeps_entries_in_order() {
        let mut s = KvStore::new(None, 0);
        let k = Tensor::arange(0f32, 4.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 4, 1))
            .unwrap();
        s.append(&k, &k, &[0, 1, 2, 3], false).unwrap();
        s.select(&[0, 2, 3]).unwrap();
        assert_eq!(s.positions(), &[0, 2, 3]);
        let (k, _) = s.keys_values().unwrap().unwrap();
        assert_eq!(
            k.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0., 2., 3.]
        );
        assert!(s.select(&[2, 1]).is_err());
    }

    #[test]
    fn deep_clone_is_independent() {
        let mut s = SeqState::new(&[None]);
        s.kv_mut(0)
            .unwrap()
            .append(&kv(2, 1.0), &kv(2, 1.0), &[0, 1], false)
            .unwrap();
        let c = s.deep_clone().unwrap();
        s.truncate(1);
        s.kv_mut(0)
            .unwrap()
            .append(&kv(1, 9.0), &kv(1, 9.0), &[1], false)
            .unwrap();
        assert_eq!(live_first_values(c.kv(0).unwrap()), vec![1.0, 1.0]);
        assert_eq!(live_first_values(s.kv(0).unwrap()), vec![1.0, 9.0]);
    }
}
