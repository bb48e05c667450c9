//! KV budget policies: each policy's selection on hand-built cases and on a
//! tiny model's real cache (sinks and windows kept, heavy hitters kept,
//! SnapKV per KV head under grouped-query attention, positions and keys
//! intact after per-head eviction), Quest's page bound is an upper bound
//! and with a budget covering the context equals full attention exactly,
//! the long-context evaluation with budgets covering the context equals
//! the full cache, and bad specs are refused by name.

mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};
use scalpel::eval::kv::{evaluate_kv, evaluate_kv_under, KvEvalOptions};
use scalpel::eval::perplexity;
use scalpel::model::kv::evict::{h2o_keep, snapkv_keep, streaming_keep, top_k, window_keep};
use scalpel::model::kv::quest::{page_bound, PageBounds};
use scalpel::model::kv::{KeptKeys, KvPolicy, KvSpec};
use scalpel::model::{Model, Pass, Probe, RunOptions, SeqState};
use scalpel::plan::{BlockId, LayerScales, Plan};

const FAST: RunOptions = RunOptions::FAST;

fn tiny() -> Model {
    common::load_tiny("llama")
}

/// Deterministic pseudo-random ids below the tiny vocabulary.
fn ids(n: usize, model: &Model) -> Vec<u32> {
    let vocab = model.cfg().vocab_size as u64;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab) as u32
        })
        .collect()
}

fn tensor(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Feeds `ids` in chunks through `state` under `policy`; logits of the last chunk.
fn feed(
    model: &Model,
    ids: &[u32],
    chunk: usize,
    state: &mut SeqState,
    policy: &mut KvPolicy,
) -> Vec<f32> {
    let t = &model.transformer;
    let base = Plan::base();
    let mut last = Vec::new();
    for c in ids.chunks(chunk) {
        policy.begin_pass(c.len());
        let mut pass = Pass::plan(&base, FAST).with_state(state).with_probe(policy);
        let h = t.forward_hidden(&tensor(c), &mut pass).unwrap();
        policy.end_pass(state).unwrap();
        last = to_vec(&t.logits(&h, FAST).unwrap());
    }
    last
}

fn policy(spec: &str, model: &Model) -> KvPolicy {
    KvPolicy::new(spec.parse().unwrap(), model.cfg()).unwrap()
}

#[test]
fn selections_on_hand_built_cases() {
    assert_eq!(window_keep(10, 3), vec![7, 8, 9]);
    assert_eq!(window_keep(2, 3), vec![0, 1]);
    assert_eq!(streaming_keep(20, 6, 2), vec![0, 1, 16, 17, 18, 19]);
    assert_eq!(streaming_keep(5, 6, 2), vec![0, 1, 2, 3, 4]);
    // H2O, budget 4 with half recent: the two heaviest older slots (3, 0)
    // and the two most recent (8, 9), whatever their scores.
    let scores = [5.0, 0.0, 0.1, 9.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0];
    assert_eq!(h2o_keep(&scores, 4, 0.5), vec![0, 3, 8, 9]);
    assert_eq!(h2o_keep(&scores, 4, 0.0), vec![0, 2, 3, 5]);
    // SnapKV: the observed window (last 2) stays; pooling (kernel 3)
    // favours the neighbourhood of the peak at 4 over the lone 2.0 at 0.
    let observed = [2.0, 0.0, 0.0, 1.5, 3.0, 1.5, 0.0, 0.0, 7.0, 7.0];
    assert_eq!(snapkv_keep(&observed, 4, 2, 1), vec![0, 4, 8, 9]);
    assert_eq!(snapkv_keep(&observed, 4, 2, 3), vec![3, 4, 8, 9]);
    assert_eq!(top_k(&[0.5, 0.25, 1.0], 2), vec![0, 2]);
}

#[test]
fn streaming_keeps_the_sinks_and_the_window_in_every_layer() {
    let model = tiny();
    let ids = ids(70, &model);
    let mut state = model.transformer.new_state(0);
    let mut p = policy("streaming:16:4", &model);
    for (i, c) in ids.chunks(9).enumerate() {
        feed(&model, c, 9, &mut state, &mut p);
        let seen = (i * 9 + c.len()) as u32;
        for l in 0..model.n_layers() {
            let pos = state.kv(l).unwrap().positions().to_vec();
            let want: Vec<u32> = if seen <= 16 {
                (0..seen).collect()
            } else {
                (0..4).chain(seen - 12..seen).collect()
            };
            assert_eq!(pos, want, "layer {l} after {seen} tokens");
        }
    }
    assert_eq!(state.next_position(), 70);
}

#[test]
fn an_evicted_cache_decodes_as_the_full_cache_with_those_keys_removed() {
    // Positions stay the original ones (RoPE was applied when each key was
    // written): decoding after StreamingLLM's eviction equals decoding on a
    // full cache from which the same keys were removed by hand.
    let model = tiny();
    let ids = ids(41, &model);
    let (prompt, next) = ids.split_at(40);
    let mut state = model.transformer.new_state(0);
    let mut p = policy("streaming:12:4", &model);
    feed(&model, prompt, 40, &mut state, &mut p);
    let got = feed(&model, next, 1, &mut state, &mut p);

    let mut full = model.transformer.new_state(0);
    let mut none = policy("full", &model);
    feed(&model, prompt, 40, &mut full, &mut none);
    let keep: Vec<usize> = (0..4).chain(32..40).collect();
    for l in 0..model.n_layers() {
        full.kv_mut(l).unwrap().select(&keep).unwrap();
    }
    let want = feed(&model, next, 1, &mut full, &mut none);
    assert_eq!(got, want);
    // And it differs from the full cache (the eviction did something).
    let mut whole = model.transformer.new_state(0);
    let full_logits = feed(&model, &ids, 41, &mut whole, &mut none);
    let last = &full_logits[full_logits.len() - got.len()..];
    assert!(common::max_abs_diff(&got, last) > 1e-3);
}

/// Attention probabilities of every layer, (heads, queries, keys).
#[derive(Default)]
struct Recorder(Vec<Vec<Vec<Vec<f32>>>>);

impl Probe for Recorder {
    fn wants_attention(&self, _layer: usize) -> bool {
        true
    }
    fn attention(&mut self, layer: usize, probs: &Tensor, _k: &[u32]) -> candle_core::Result<()> {
        if self.0.len() <= layer {
            self.0.resize(layer + 1, Vec::new());
        }
        self.0[layer] = probs.squeeze(0)?.to_vec3()?;
        Ok(())
    }
}

fn record(model: &Model, ids: &[u32]) -> Recorder {
    let mut r = Recorder::default();
    let base = Plan::base();
    let mut pass = Pass::plan(&base, FAST).with_probe(&mut r);
    model
        .transformer
        .forward_hidden(&tensor(ids), &mut pass)
        .unwrap();
    r
}

#[test]
fn h2o_scores_are_the_accumulated_attention_of_the_full_model() {
    // With a budget covering the context nothing is evicted, so after
    // chunked passes each KV head's score for a key is the full model's
    // attention to it summed over every query and the group's query heads.
    let model = tiny();
    let ids = ids(30, &model);
    let mut state = model.transformer.new_state(0);
    let mut p = policy("h2o:100", &model);
    feed(&model, &ids, 7, &mut state, &mut p);
    let reference = record(&model, &ids);
    let group = model.cfg().n_heads / model.cfg().n_kv_heads;
    for l in 0..model.n_layers() {
        for (h, got) in p.scores(l).iter().enumerate() {
            let want: Vec<f32> = (0..30)
                .map(|k| {
                    reference.0[l][h * group..(h + 1) * group]
                        .iter()
                        .flat_map(|head| head.iter().map(move |row| row[k]))
                        .sum()
                })
                .collect();
            let diff = common::max_abs_diff(got, &want);
            // Sums of up to 60 probabilities in two summation orders: 1.05e-5 measured.
            assert!(diff < 2e-5, "layer {l} head {h}: {diff}");
        }
    }
}

#[test]
fn h2o_keeps_the_heavy_hitters_and_the_recent_window_per_kv_head() {
    let model = tiny();
    let ids = ids(48, &model);
    let mut state = model.transformer.new_state(0);
    let mut p = policy("h2o:16:0.5", &model);
    feed(&model, &ids[..40], 40, &mut state, &mut p);
    for l in 0..model.n_layers() {
        let KeptKeys::Positions(heads) = p.kept(l, &state) else {
            panic!("h2o keeps positions")
        };
        assert_eq!(heads.len(), model.cfg().n_kv_heads);
        for kept in &heads {
            assert_eq!(kept.len(), 16);
            assert_eq!(&kept[8..], &(32..40).collect::<Vec<u32>>()[..]);
        }
    }
    // Decoding further keeps the budget.
    feed(&model, &ids[40..], 1, &mut state, &mut p);
    assert!(
        state.lengths().iter().all(|&n| n == 16),
        "{:?}",
        state.lengths()
    );
}

#[test]
fn snapkv_selects_per_kv_head_under_grouped_query_attention_without_copies() {
    let model = tiny();
    let cfg = model.cfg().clone();
    let (nkv, group, hd) = (cfg.n_kv_heads, cfg.n_heads / cfg.n_kv_heads, cfg.head_dim);
    assert!(group > 1, "the tiny model must use grouped-query attention");
    let ids = ids(48, &model);
    let mut state = model.transformer.new_state(0);
    let mut p = policy("snapkv:12:4:1", &model);
    feed(&model, &ids, 48, &mut state, &mut p);
    let reference = record(&model, &ids);
    let mut full = model.transformer.new_state(0);
    feed(&model, &ids, 48, &mut full, &mut policy("full", &model));
    let mut heads_differ = false;
    for l in 0..model.n_layers() {
        let KeptKeys::Positions(heads) = p.kept(l, &state) else {
            panic!("snapkv keeps positions")
        };
        assert_eq!(heads.len(), nkv);
        for (h, kept) in heads.iter().enumerate() {
            // Observed: the last 4 queries, summed over the group's query heads.
            let observed: Vec<f32> = (0..48)
                .map(|k| {
                    reference.0[l][h * group..(h + 1) * group]
                        .iter()
                        .flat_map(|head| head[44..].iter().map(move |row| row[k]))
                        .sum()
                })
                .collect();
            let want: Vec<u32> = snapkv_keep(&observed, 12, 4, 1)
                .into_iter()
                .map(|i| i as u32)
                .collect();
            assert_eq!(kept, &want, "layer {l} head {h}");
            // The store holds that head's keys, in its own slots.
            let (k, _) = state.kv(l).unwrap().keys_values().unwrap().unwrap();
            let (fk, _) = full.kv(l).unwrap().keys_values().unwrap().unwrap();
            for (slot, &pos) in kept.iter().enumerate() {
                let a = to_vec(&k.narrow(1, h, 1).unwrap().narrow(2, slot, 1).unwrap());
                let b = to_vec(
                    &fk.narrow(1, h, 1)
                        .unwrap()
                        .narrow(2, pos as usize, 1)
                        .unwrap(),
                );
                assert_eq!(a, b, "layer {l} head {h} slot {slot}");
            }
        }
        heads_differ |= heads.windows(2).any(|w| w[0] != w[1]);
        // One K and one V per KV head and kept token: no copy per query head.
        assert_eq!(state.kv(l).unwrap().bytes(), 2 * nkv * 12 * hd * 4);
    }
    assert!(heads_differ, "per-head selection should differ somewhere");
}

#[test]
fn the_quest_page_bound_is_an_upper_bound_of_every_key_score() {
    let dev = Device::Cpu;
    for seed in 0..20u64 {
        let (page, n, hd) = (8, 37, 16);
        let keys = Tensor::randn(0f32, 1.0 + seed as f32, (1, 2, n, hd), &dev).unwrap();
        let q = Tensor::randn(0f32, 1.0, (1, 4, 3, hd), &dev).unwrap();
        let mut bounds = PageBounds::new(page, 2, hd);
        // Built up in two steps, as chunks arrive.
        bounds.update(&keys.narrow(2, 0, 13).unwrap()).unwrap();
        bounds.update(&keys).unwrap();
        assert_eq!(bounds.pages(), n.div_ceil(page));
        let b = bounds.bounds(&q).unwrap();
        let kv: Vec<Vec<Vec<f32>>> = keys.squeeze(0).unwrap().to_vec3().unwrap();
        let qs: Vec<Vec<Vec<f32>>> = q.squeeze(0).unwrap().to_vec3().unwrap();
        for (h, head_keys) in kv.iter().enumerate() {
            for i in 0..3 {
                for (p, chunk) in head_keys.chunks(page).enumerate() {
                    // The group's summed bound ≥ the summed best key score.
                    let best: f32 = (0..2)
                        .map(|g| {
                            let q = &qs[h * 2 + g][i];
                            let mut lo = vec![f32::INFINITY; hd];
                            let mut hi = vec![f32::NEG_INFINITY; hd];
                            for k in chunk {
                                for d in 0..hd {
                                    lo[d] = lo[d].min(k[d]);
                                    hi[d] = hi[d].max(k[d]);
                                }
                            }
                            let bound = page_bound(q, &lo, &hi);
                            let top = chunk
                                .iter()
                                .map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>())
                                .fold(f32::NEG_INFINITY, f32::max);
                            assert!(bound >= top - 1e-4, "seed {seed}: {bound} < {top}");
                            bound
                        })
                        .sum();
                    assert!((b[h][i][p] - best).abs() < 1e-3 * best.abs().max(1.0));
                }
            }
        }
    }
}

#[test]
fn quest_with_a_budget_covering_the_context_equals_full_attention_exactly() {
    // Gemma 3's local layers keep only their window: the policy must leave
    // that alone, and its global layer still sees the budget. (The tiny
    // models are too shallow for Quest's two dense layers: `:0`.)
    for name in ["llama", "gemma3"] {
        let model = common::load_tiny(name);
        let ids = ids(60, &model);
        let mut full = model.transformer.new_state(0);
        let mut none = policy("full", &model);
        let want_prefill = feed(&model, &ids[..50], 16, &mut full, &mut none);
        let want_decode = feed(&model, &ids[50..], 1, &mut full, &mut none);
        for spec in ["quest:64:8:0", "streaming:64:4", "h2o:64", "window:64"] {
            let mut state = model.transformer.new_state(0);
            let mut p = policy(spec, &model);
            assert_eq!(
                feed(&model, &ids[..50], 16, &mut state, &mut p),
                want_prefill,
                "{name} {spec} prefill"
            );
            assert_eq!(
                feed(&model, &ids[50..], 1, &mut state, &mut p),
                want_decode,
                "{name} {spec} decode"
            );
        }
        // A smaller budget changes the result.
        let mut state = model.transformer.new_state(0);
        let mut p = policy("quest:16:8:0", &model);
        let got = feed(&model, &ids[..50], 16, &mut state, &mut p);
        assert!(
            common::max_abs_diff(&got, &want_prefill) > 1e-4,
            "{name}: quest:16 had no effect"
        );
    }
}

#[test]
fn quest_decode_gathering_the_pages_equals_masking_them() {
    let model = tiny();
    let ids = ids(90, &model);
    let run = |gather: bool| {
        let mut state = model.transformer.new_state(0);
        let mut p = policy("quest:24:8", &model);
        p.gather_decode = gather;
        feed(&model, &ids[..80], 32, &mut state, &mut p);
        feed(&model, &ids[80..], 1, &mut state, &mut p)
    };
    let (gathered, masked) = (run(true), run(false));
    assert!(common::max_abs_diff(&gathered, &masked) < 1e-4);
}

fn eval_opts(recall: bool) -> KvEvalOptions<'static> {
    KvEvalOptions {
        context: 96,
        chunk: 20,
        recall,
        run: FAST,
        parallel_windows: false,
        cancel: None,
    }
}

#[test]
fn eval_with_budgets_covering_the_context_equals_the_full_cache() {
    let model = tiny();
    let ids = ids(200, &model);
    let specs =
        KvSpec::parse_list("quest:4096,window:4096,streaming:4096,h2o:4096,snapkv:4096").unwrap();
    let r = evaluate_kv(&model, &ids, &specs, eval_opts(false), |_, _| {}).unwrap();
    assert!(r.scored_tokens > 0);
    for row in &r.rows {
        assert!(row.budget_covers_context, "{}", row.policy);
        // Quest, window and streaming run the engine's own path: identical.
        // H2O and SnapKV read probabilities (the dense path): equal to rounding.
        if ["quest", "window", "streaming"]
            .iter()
            .any(|n| row.policy.starts_with(n))
        {
            assert_eq!(row.perplexity, r.full_perplexity, "{}", row.policy);
            assert_eq!(row.kl_to_full, 0.0, "{}", row.policy);
        } else {
            assert!(
                (row.perplexity / r.full_perplexity - 1.0).abs() < 1e-5,
                "{}",
                row.policy
            );
            assert!(row.kl_to_full < 1e-8, "{}: {}", row.policy, row.kl_to_full);
        }
        assert_eq!(row.top1_agreement, 1.0, "{}", row.policy);
    }
    // With recall measured, covering budgets carry all of the attention.
    let r = evaluate_kv(&model, &ids, &specs[..2], eval_opts(true), |_, _| {}).unwrap();
    for row in &r.rows {
        let recall = row.attention_recall.unwrap_or(1.0);
        assert!((recall - 1.0).abs() < 1e-4, "{}: {recall}", row.policy);
    }
}

#[test]
fn small_budgets_lose_attention_mass_and_agreement() {
    let model = tiny();
    let ids = ids(200, &model);
    let specs = KvSpec::parse_list("quest:16:4,window:16,streaming:16,h2o:16,snapkv:16:4").unwrap();
    let r = evaluate_kv(&model, &ids, &specs, eval_opts(true), |_, _| {}).unwrap();
    assert_eq!(r.scored_from, 16);
    for row in &r.rows {
        let recall = row.attention_recall.expect("recall measured");
        assert!(recall > 0.05 && recall < 0.999, "{}: {recall}", row.policy);
        assert!(row.kl_to_full > 1e-6, "{}: {}", row.policy, row.kl_to_full);
        assert!(!row.budget_covers_context);
    }
    // The evicting caches hold about their budget (plus the last chunk at most).
    for row in r.rows.iter().filter(|r| !r.policy.starts_with("quest")) {
        assert!(
            row.kv_bytes < r.full_kv_bytes / 2,
            "{}: {} vs {}",
            row.policy,
            row.kv_bytes,
            r.full_kv_bytes
        );
    }
}

#[test]
fn bad_specs_are_refused_with_a_reason() {
    let cases = [
        ("quest:0", "budget must be at least 1 token"),
        ("h2o:0", "budget must be at least 1 token"),
        ("lru:512", "unknown KV policy `lru:512`"),
        ("quest", "needs a budget in tokens"),
        ("quest:8:16", "fewer than 2 pages"),
        ("quest:abc", "`abc` is not a number"),
        ("streaming:4:4", "no room for recent tokens"),
        ("snapkv:16:16", "observation window"),
        ("snapkv:64:8:4", "pooling kernel must be odd"),
        ("h2o:64:1.5", "recent share"),
        ("full:3", "takes no budget"),
        ("window:3:4", "too many fields"),
    ];
    for (spec, want) in cases {
        let err = spec.parse::<KvSpec>().unwrap_err().to_string();
        assert!(err.contains(want), "{spec}: {err}");
    }
    let model = tiny();
    let ids = ids(50, &model);
    let mut opts = eval_opts(false);
    opts.context = 100_000;
    let err = evaluate_kv(&model, &ids, &[KvSpec::Full], opts, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("exceeds the model's") && err.contains("positions"),
        "{err}"
    );
    // A budget that leaves nothing past it to score.
    let err = evaluate_kv(
        &model,
        &ids,
        &["window:50".parse().unwrap()],
        eval_opts(false),
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no position lies past the budget"), "{err}");
}

#[test]
fn a_plan_carries_a_kv_policy_in_its_kv_section() {
    use scalpel::plan::{KvSection, PlanFile, KV_SECTION};
    let model = tiny();
    let mut pf = PlanFile::new(model.identity.clone(), Plan::base());
    pf.sections
        .set(
            KV_SECTION,
            &KvSection {
                policy: "quest:512".into(),
            },
        )
        .unwrap();
    let text = serde_json::to_string(&pf).unwrap();
    let back = PlanFile::from_json(&text, "p.json").unwrap();
    let section: KvSection = back.sections.get(KV_SECTION).unwrap().unwrap();
    assert_eq!(
        section.spec().unwrap(),
        KvSpec::Quest {
            budget: 512,
            page: 16,
            dense_layers: 2
        }
    );
    let bad = text.replace("quest:512", "quest:0");
    let err = format!("{:#}", PlanFile::from_json(&bad, "p.json").unwrap_err());
    assert!(
        err.contains("plan section `kv`") && err.contains("at least 1 token"),
        "{err}"
    );
}

/// The passkey grid on SmolLM2: the full cache repeats a key hidden near
/// the start of a 512-token prompt; a 64-token window, which has evicted
/// it by the time the question is asked, cannot (a 5-digit key is not
/// guessed). Measured: `scalpel needle --kv window:64,streaming:64,quest:64
/// --context 512,1024 --depths 0.1,0.9 --trials 2` (README).
#[test]
fn needle_the_full_cache_finds_the_key_a_small_window_has_evicted() {
    use scalpel::eval::needle::{needle_grid, NeedleOptions};
    let model = common::smollm2();
    let opts = NeedleOptions {
        contexts: vec![512],
        depths: vec![0.1],
        trials: 1,
        chunk: 128,
        seed: 7,
        run: RunOptions::FAST,
    };
    let window: KvSpec = "window:64".parse().unwrap();
    let report = needle_grid(
        model,
        &Plan::base(),
        std::slice::from_ref(&window),
        &opts,
        |_, _| {},
    )
    .unwrap();
    assert_eq!(report.policies, ["full", "window:64"]);
    assert_eq!(report.found("full"), (1, 1), "{:?}", report.cells);
    assert_eq!(report.found("window:64"), (0, 1), "{:?}", report.cells);
    // Under a skip plan the unpruned model answers first, on the same key.
    let plan = Plan::with_skips([BlockId::attn(6), BlockId::attn(25)]);
    let pruned = needle_grid(model, &plan, &[window], &opts, |_, _| {}).unwrap();
    assert_eq!(pruned.policies, ["base", "plan", "plan+window:64"]);
    let answer = |r: &scalpel::eval::needle::NeedleReport, p: &str| {
        r.cells
            .iter()
            .find(|c| c.policy == p)
            .unwrap()
            .example_answer
            .clone()
    };
    assert_eq!(answer(&pruned, "base"), answer(&report, "full"));
    assert_eq!(pruned.found("plan+window:64"), (0, 1), "{:?}", pruned.cells);
    let bad = NeedleOptions {
        depths: vec![1.5],
        ..opts
    };
    let err = needle_grid(model, &Plan::base(), &[], &bad, |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("outside [0, 1]"), "{err}");
}

#[test]
fn a_kv_policy_on_top_of_a_skip_plan_measures_its_own_cost_on_the_pruned_model() {
    let model = tiny();
    let ids = ids(200, &model);
    let mut plan = Plan::with_skips([BlockId::attn(1), BlockId::mlp(0)]);
    plan.scales = Some(
        (0..model.n_layers())
            .map(|i| LayerScales {
                b_att: 0.9 + 0.05 * i as f32,
                s_att: 1.02,
                b_mlp: 1.1,
                s_mlp: 0.97,
            })
            .collect(),
    );
    let eval = |plan: &Plan, specs: &str| {
        let specs = KvSpec::parse_list(specs).unwrap();
        evaluate_kv_under(&model, &ids, plan, &specs, eval_opts(false), |_, _| {}).unwrap()
    };
    // Budgets covering the context: every position scored, as perplexity does.
    let under = eval(&plan, "quest:4096,window:4096");
    let base = eval(&Plan::base(), "quest:4096,window:4096");
    assert_eq!(under.scored_from, 0);
    // The reference is the plan with the full cache, not the base model.
    assert_ne!(under.full_perplexity, base.full_perplexity);
    let whole = perplexity::evaluate(
        &model,
        &ids,
        &plan,
        perplexity::EvalOptions {
            window: 96,
            compare_base: false,
            run: FAST,
            parallel_windows: false,
        },
        &AtomicBool::new(false),
        |_, _| {},
    )
    .unwrap();
    let rel = (under.full_perplexity / whole.perplexity - 1.0).abs();
    eprintln!("chunked full cache vs whole windows under the plan: relative {rel:e}");
    assert!(
        rel < 1e-9,
        "chunked full cache vs whole windows under the plan: {rel}"
    );
    for row in &under.rows {
        assert_eq!(row.perplexity, under.full_perplexity, "{}", row.policy);
        assert_eq!(row.kl_to_full, 0.0, "{}", row.policy);
    }
    // Small budgets cost something on top of the plan.
    for row in &eval(&plan, "quest:16:4,window:16,h2o:16").rows {
        assert!(row.kl_to_full > 1e-6, "{}: {}", row.policy, row.kl_to_full);
    }
    // The skipped attention layer holds no K/V: less memory than the base's.
    assert!(under.full_kv_bytes < base.full_kv_bytes);
}
