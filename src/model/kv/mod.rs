//! KV budget policies on the per-layer sequence state: which keys a long
//! context keeps (sliding window, StreamingLLM, H2O, SnapKV evict) or which
//! it attends to per query (Quest keeps every key). A `KvPolicy` is the
//! pass's probe (it reads attention probabilities for H2O and SnapKV and
//! attends over page subsets for Quest) and acts on the state between
//! passes (`end_pass`), as a server would between prefill chunks and decode
//! steps.
//!
//! Per KV head where the method says so (H2O, SnapKV, Quest): a layer's
//! store is one tensor per layer, so per-head eviction moves each head's
//! kept keys into the same slots (`KvStore::select_per_head`) and the
//! policy remembers each head's own positions. Keys were rotated at their
//! true positions when written, so RoPE stays correct after eviction.
//!
//! A model with local (sliding-window) layers, as Gemma 3's five of every
//! six, keeps each local layer to its window: the policy acts on the
//! global layers only, where the cache grows with the context.

pub mod evict;
pub mod quest;
pub mod spec;

use anyhow::bail;
use candle_core::{Result, Tensor};

pub use spec::{KvSpec, POLICY_NAMES};

use super::config::ModelConfig;
use super::pass::Probe;
use super::state::SeqState;
use super::transformer::{KeyRuns, StoredKeys};
use quest::{PageBounds, Picks};

/// What a layer's queries could attend to in the last pass, for attention
/// recall.
#[derive(Debug, Clone)]
pub enum KeptKeys {
    /// Every key.
    All,
    /// Per KV head, the positions stored (each query sees those ≤ its own).
    Positions(Vec<Vec<u32>>),
    /// Quest: per KV head and query, the pages attended to.
    Pages { page: usize, picks: Picks },
}

#[derive(Debug, Default)]
struct LayerBook {
    /// Per KV head, the positions of its slots once heads diverged.
    own_positions: Option<Vec<Vec<u32>>>,
    /// Per KV head, per slot: H2O's accumulated attention, or SnapKV's
    /// attention from the observed queries of the last pass.
    scores: Vec<Vec<f32>>,
    pages: Option<PageBounds>,
    picks: Option<Picks>,
}

/// A policy acting on one sequence's state.
#[derive(Debug)]
pub struct KvPolicy {
    spec: KvSpec,
    heads: usize,
    kv_heads: usize,
    layers: Vec<LayerBook>,
    /// Per layer, whether the policy acts there (global layers; local
    /// layers keep their own window).
    acts: Vec<bool>,
    /// Queries in the current pass (SnapKV observes prefill passes only).
    pass_tokens: usize,
    /// Quest decode steps gather the chosen keys (executed); `false` masks
    /// them as prefill does (for tests holding the two equal).
    pub gather_decode: bool,
}

impl KvPolicy {
    pub fn new(spec: KvSpec, cfg: &ModelConfig) -> anyhow::Result<Self> {
        let dense = match spec {
            KvSpec::Quest { dense_layers, .. } => dense_layers,
            _ => 0,
        };
        let global = |l: usize| cfg.layer_window(l).is_none();
        if spec != KvSpec::Full && !(0..cfg.n_layers).any(global) {
            bail!(
                "KV policy `{spec}`: every layer of this model already uses a sliding window of \
                 {} tokens; KV budgets act on full-attention (global) layers and it has none",
                cfg.sliding_window.unwrap_or(0)
            );
        }
        let acts: Vec<bool> = (0..cfg.n_layers).map(|l| global(l) && l >= dense).collect();
        if spec != KvSpec::Full && !acts.contains(&true) {
            bail!(
                "KV policy `{spec}`: its {dense} dense layers leave no full-attention layer of \
                 this model's {} to act on; give fewer (quest:B:PAGE:DENSE)",
                cfg.n_layers
            );
        }
        Ok(Self {
            spec,
            heads: cfg.n_heads,
            kv_heads: cfg.n_kv_heads,
            layers: (0..cfg.n_layers).map(|_| LayerBook::default()).collect(),
            acts,
            pass_tokens: 0,
            gather_decode: true,
        })
    }

    pub fn spec(&self) -> &KvSpec {
        &self.spec
    }

    /// Call before each pass of `tokens` tokens through the state.
    pub fn begin_pass(&mut self, tokens: usize) {
        self.pass_tokens = tokens;
    }

    /// Whether the policy must see attention probabilities this pass (the
    /// engine then runs the dense attention path).
    fn observes(&self) -> bool {
        match self.spec {
            KvSpec::H2o { .. } => true,
            KvSpec::SnapKv { .. } => self.pass_tokens > 1,
            _ => false,
        }
    }

    /// What layer `layer`'s queries could attend to in the last pass.
    pub fn kept(&self, layer: usize, state: &SeqState) -> KeptKeys {
        let book = &self.layers[layer];
        match (&self.spec, &book.picks, &book.own_positions) {
            (KvSpec::Full, ..) => KeptKeys::All,
            (KvSpec::Quest { page, .. }, Some(picks), _) => KeptKeys::Pages {
                page: *page,
                picks: picks.clone(),
            },
            (KvSpec::Quest { .. }, None, _) => KeptKeys::All,
            (_, _, Some(own)) => KeptKeys::Positions(own.clone()),
            (_, _, None) => {
                let p = state
                    .kv(layer)
                    .map_or(Vec::new(), |s| s.positions().to_vec());
                KeptKeys::Positions(vec![p; self.kv_heads])
            }
        }
    }

    /// Per KV head, per slot of `layer`: H2O's accumulated attention, or
    /// SnapKV's attention from the last pass's observed queries.
    pub fn scores(&self, layer: usize) -> &[Vec<f32>] {
        &self.layers[layer].scores
    }

    /// Call after each pass: evicts down to the budget as the method says.
    pub fn end_pass(&mut self, state: &mut SeqState) -> Result<()> {
        let spec = self.spec.clone();
        let prefill = self.pass_tokens > 1;
        for (layer, book) in self.layers.iter_mut().enumerate() {
            if !self.acts[layer] {
                continue;
            }
            let Some(store) = state.kv_mut(layer) else {
                continue;
            };
            let n = store.len();
            // Slots appended by this pass take their true positions in every head.
            if let Some(own) = &mut book.own_positions {
                let fresh = &store.positions()[own[0].len().min(n)..];
                own.iter_mut().for_each(|o| o.extend_from_slice(fresh));
            }
            // Heads that saw no probabilities yet score every slot 0.
            if matches!(spec, KvSpec::H2o { .. } | KvSpec::SnapKv { .. }) {
                book.scores.resize(self.kv_heads, Vec::new());
                book.scores.iter_mut().for_each(|s| s.resize(n, 0.0));
            }
            let keep: Option<Vec<Vec<usize>>> = match spec {
                KvSpec::Full | KvSpec::Quest { .. } => None,
                KvSpec::Window { budget } => {
                    (n > budget).then(|| vec![evict::window_keep(n, budget)])
                }
                KvSpec::Streaming { budget, sinks } => {
                    (n > budget).then(|| vec![evict::streaming_keep(n, budget, sinks)])
                }
                KvSpec::H2o {
                    budget,
                    recent_share,
                } => (n > budget).then(|| {
                    book.scores
                        .iter()
                        .map(|s| evict::h2o_keep(s, budget, recent_share))
                        .collect()
                }),
                KvSpec::SnapKv {
                    budget,
                    observation,
                    kernel,
                } => (prefill && n > budget).then(|| {
                    book.scores
                        .iter()
                        .map(|s| {
                            evict::snapkv_keep(s, budget, observation.min(self.pass_tokens), kernel)
                        })
                        .collect()
                }),
            };
            let Some(keep) = keep else {
                continue;
            };
            if matches!(spec, KvSpec::Window { .. } | KvSpec::Streaming { .. }) {
                // The same slots in every head: positions stay shared.
                store.select(&keep[0])?;
                continue;
            }
            let own = book
                .own_positions
                .take()
                .unwrap_or_else(|| vec![store.positions().to_vec(); keep.len()]);
            let own: Vec<Vec<u32>> = own
                .iter()
                .zip(&keep)
                .map(|(pos, k)| k.iter().map(|&i| pos[i]).collect())
                .collect();
            let slot_positions: Vec<u32> = (0..keep[0].len())
                .map(|j| own.iter().map(|p| p[j]).max().unwrap_or(0))
                .collect();
            store.select_per_head(&keep, slot_positions)?;
            book.scores = book
                .scores
                .iter()
                .zip(&keep)
                .map(|(s, k)| {
                    if matches!(spec, KvSpec::H2o { .. }) {
                        k.iter().map(|&i| s[i]).collect()
                    } else {
                        Vec::new()
                    }
                })
                .collect();
            book.own_positions = Some(own);
        }
        Ok(())
    }

    /// Quest's budget and page size and `layer`'s page tables (made for
    /// head dim `hd` on first use), its last picks cleared; `None` where
    /// Quest does not act (another policy, a dense or local layer).
    fn quest_layer(&mut self, layer: usize, hd: usize) -> Option<(usize, usize, &mut PageBounds)> {
        let KvSpec::Quest { budget, page, .. } = self.spec else {
            return None;
        };
        if !self.acts[layer] {
            return None;
        }
        let kv_heads = self.kv_heads;
        let book = &mut self.layers[layer];
        book.picks = None;
        let pages = book
            .pages
            .get_or_insert_with(|| PageBounds::new(page, kv_heads, hd));
        Some((budget, page, pages))
    }

    /// KV bytes a cache of `tokens` keys per layer would take under this
    /// policy's pages (Quest's min/max tables; 0 for the others).
    pub fn metadata_bytes(&self) -> usize {
        self.layers
            .iter()
            .filter_map(|b| b.pages.as_ref())
            .map(|p| 2 * p.pages() * self.kv_heads * 4 * self.head_dim_hint())
            .sum()
    }

    fn head_dim_hint(&self) -> usize {
        // Filled in by the first Quest call; see PageBounds.
        self.layers
            .iter()
            .find_map(|b| b.pages.as_ref().map(PageBounds::head_dim))
            .unwrap_or(0)
    }
}

impl Probe for KvPolicy {
    fn wants_attention(&self, layer: usize) -> bool {
        self.observes() && self.acts[layer]
    }

    fn attention(&mut self, layer: usize, probs: &Tensor, _key_positions: &[u32]) -> Result<()> {
        if !self.wants_attention(layer) {
            return Ok(());
        }
        let (b, nh, t, n) = probs.dims4()?;
        if b != 1 {
            candle_core::bail!("KV budget policies run one sequence at a time (batch {b})");
        }
        let probs = probs
            .to_dtype(candle_core::DType::F32)?
            .squeeze(0)?
            .to_vec3::<f32>()?;
        let group = nh / self.kv_heads;
        let (from, accumulate) = match self.spec {
            KvSpec::SnapKv { observation, .. } => (t - observation.min(t), false),
            _ => (0, true),
        };
        let book = &mut self.layers[layer];
        book.scores.resize(self.kv_heads, Vec::new());
        for (h, scores) in book.scores.iter_mut().enumerate() {
            if !accumulate {
                scores.clear();
            }
            scores.resize(n, 0.0);
            for head in &probs[h * group..(h + 1) * group] {
                for row in &head[from..] {
                    scores.iter_mut().zip(row).for_each(|(s, p)| *s += p);
                }
            }
        }
        Ok(())
    }

    fn rides_lean(&self) -> bool {
        // H2O and SnapKV's prefill read probabilities; a masked Quest
        // decode (tests) runs the candle path.
        !self.observes() && (self.gather_decode || !matches!(self.spec, KvSpec::Quest { .. }))
    }

    fn select_keys(
        &mut self,
        layer: usize,
        q: &[f32],
        keys: &StoredKeys,
        query_positions: &[u32],
    ) -> Result<Option<KeyRuns>> {
        let hd = q.len() / (query_positions.len() * self.heads).max(1);
        let heads = self.heads;
        let Some((budget, page, pages)) = self.quest_layer(layer, hd) else {
            return Ok(None);
        };
        pages.update_from_store(keys);
        let visible = quest::visible_counts(keys.positions, query_positions);
        if visible.iter().all(|&v| v <= budget) {
            // Every query sees no more than the budget: exactly the full model.
            return Ok(None);
        }
        let bounds = pages.bounds_of_rows(q, heads);
        let picks = quest::pick(&bounds, keys.positions, query_positions, budget, page);
        let runs = quest::runs(&picks, page);
        self.layers[layer].picks = Some(picks);
        Ok(Some(runs))
    }

    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        kv: (&Tensor, &Tensor),
        key_positions: &[u32],
        query_positions: &[u32],
    ) -> Result<Option<Tensor>> {
        let (keys, _) = kv;
        let (b, _, t, hd) = q.dims4()?;
        let Some((budget, page, pages)) = self.quest_layer(layer, hd) else {
            return Ok(None);
        };
        if b != 1 {
            candle_core::bail!("KV budget policies run one sequence at a time (batch {b})");
        }
        pages.update(keys)?;
        let visible = quest::visible_counts(key_positions, query_positions);
        if visible.iter().all(|&v| v <= budget) {
            // Every query sees no more than the budget: exactly the full model.
            return Ok(None);
        }
        let bounds = pages.bounds(q)?;
        let picks = quest::pick(&bounds, key_positions, query_positions, budget, page);
        let y = if t == 1 && self.gather_decode {
            match quest::gathered_attention(q, kv, &picks, visible[0], page)? {
                Some(y) => y,
                None => quest::masked_attention(q, kv, &picks, &visible, page)?,
            }
        } else {
            quest::masked_attention(q, kv, &picks, &visible, page)?
        };
        debug_assert_eq!(self.heads, q.dim(1)?);
        self.layers[layer].picks = Some(picks);
        Ok(Some(y))
    }
}
