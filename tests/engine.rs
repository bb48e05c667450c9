//! The engine's boundary: sequence state with positions (rollback, per-layer
//! lengths), and what a layer policy may execute (row, head and neuron
//! subsets, K/V only), each checked against a computation it must equal.

mod common;

use candle_core::{Device, Tensor};
use scalpel::model::{AttnExec, LayerPolicy, MlpExec, Model, Pass, Probe, RunOptions, SeqState};
use scalpel::plan::{BlockId, Plan};

const FAST: RunOptions = RunOptions::FAST;

fn ids_of(model: &Model) -> Vec<u32> {
    let r = common::read_json(common::tiny_dir("llama").join("reference.json"));
    let ids = common::json_ints::<u32>(&r["token_ids"]);
    assert!(ids.len() >= 16, "{}", model.identity.name);
    ids
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

/// Logits of `ids` fed after what `state` holds.
fn step(model: &Model, ids: &[u32], plan: &Plan, state: &mut SeqState) -> Vec<f32> {
    let t = &model.transformer;
    let mut pass = Pass::plan(plan, FAST).with_state(state);
    let h = t.forward_hidden(&tensor(ids), &mut pass).unwrap();
    to_vec(&t.logits(&h, FAST).unwrap())
}

fn full_logits(model: &Model, ids: &[u32], plan: &Plan) -> Vec<f32> {
    let t = &model.transformer;
    let h = t
        .forward_hidden(&tensor(ids), &mut Pass::plan(plan, FAST))
        .unwrap();
    to_vec(&t.logits(&h, FAST).unwrap())
}

#[test]
fn rollback_gives_bit_identical_logits_to_never_having_drafted() {
    let model = common::load_tiny("llama");
    let ids = ids_of(&model);
    let plan = Plan::base();
    // Prefill 10, decode three tokens, roll back two, decode another.
    let mut rolled = model.transformer.new_state(0);
    step(&model, &ids[..10], &plan, &mut rolled);
    for &id in &ids[10..13] {
        step(&model, &[id], &plan, &mut rolled);
    }
    rolled.truncate(11);
    assert_eq!(rolled.next_position(), 11);
    assert_eq!(rolled.lengths(), vec![11; 4]);
    let after_rollback = step(&model, &[ids[20]], &plan, &mut rolled);
    // The same steps without the rejected tokens.
    let mut fresh = model.transformer.new_state(0);
    step(&model, &ids[..10], &plan, &mut fresh);
    step(&model, &[ids[10]], &plan, &mut fresh);
    let direct = step(&model, &[ids[20]], &plan, &mut fresh);
    assert_eq!(after_rollback, direct, "rollback must be exact");
}

#[test]
fn layers_skipped_while_drafting_hold_fewer_tokens_and_verify_restores_them() {
    let model = common::load_tiny("llama");
    let ids = ids_of(&model);
    let vocab = model.cfg().vocab_size;
    let draft = Plan::with_skips([BlockId::attn(1), BlockId::attn(2)]);
    let full = Plan::base();
    let mut state = model.transformer.new_state(0);
    step(&model, &ids[..8], &full, &mut state);
    // Drafting three tokens writes keys only in the layers the draft runs.
    for &id in &ids[8..11] {
        step(&model, &[id], &draft, &mut state);
    }
    assert_eq!(state.lengths(), vec![11, 8, 8, 11]);
    // Verify: roll back to the accepted prefix, run the full model over
    // the drafted tokens; every layer is complete again.
    state.truncate(8);
    let verified = step(&model, &ids[8..11], &full, &mut state);
    assert_eq!(state.lengths(), vec![11; 4]);
    let reference = full_logits(&model, &ids[..11], &full);
    let diff = common::max_abs_diff(&verified, &reference[8 * vocab..]);
    assert!(diff < 1e-5, "verify after drafting vs full pass: {diff}");
}

#[test]
fn decode_with_a_skip_plan_matches_the_full_sequence_under_it() {
    let model = common::load_tiny("mistral");
    let ids = ids_of(&model);
    let vocab = model.cfg().vocab_size;
    let plan = Plan::with_skips([BlockId::attn(0), BlockId::mlp(2)]);
    let reference = full_logits(&model, &ids, &plan);
    let mut state = model.transformer.new_state(4);
    let mut got = step(&model, &ids[..5], &plan, &mut state);
    for &id in &ids[5..] {
        got.extend(step(&model, &[id], &plan, &mut state));
    }
    assert_eq!(got.len(), ids.len() * vocab);
    assert!(common::max_abs_diff(&got, &reference) < 1e-5);
    assert_eq!(state.cached_layers(), vec![1, 2, 3]);
}

/// Runs one layer's blocks as told; every other block in full.
struct OneLayer {
    layer: usize,
    attn: AttnExec,
    mlp: MlpExec,
}

impl LayerPolicy for OneLayer {
    fn attn(&self, layer: usize, _x: &Tensor) -> candle_core::Result<AttnExec> {
        Ok(if layer == self.layer {
            self.attn.clone()
        } else {
            AttnExec::Full
        })
    }
    fn mlp(&self, layer: usize, _x: &Tensor) -> candle_core::Result<MlpExec> {
        Ok(if layer == self.layer {
            self.mlp.clone()
        } else {
            MlpExec::Full
        })
    }
}

/// Records block inputs/outputs and per-head context of one layer.
#[derive(Default)]
struct Recorder {
    blocks: Vec<(BlockId, Tensor, Tensor)>,
    context: Option<Tensor>,
}

impl Probe for Recorder {
    fn block(
        &mut self,
        block: BlockId,
        input: &Tensor,
        output: &Tensor,
    ) -> candle_core::Result<()> {
        self.blocks.push((block, input.clone(), output.clone()));
        Ok(())
    }
    fn wants_head_context(&self, layer: usize) -> bool {
        layer == 0
    }
    fn head_context(
        &mut self,
        _layer: usize,
        _heads: &[u32],
        ctx: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        self.context = Some(ctx.clone());
        Ok(None)
    }
}

impl Recorder {
    /// What `block` added to the residual stream (identity scales), (t, hidden).
    fn delta(&self, block: BlockId) -> Tensor {
        let (_, i, o) = self.blocks.iter().find(|(b, _, _)| *b == block).unwrap();
        (o - i).unwrap().squeeze(0).unwrap()
    }
    fn input(&self, block: BlockId) -> Tensor {
        let (_, i, _) = self.blocks.iter().find(|(b, _, _)| *b == block).unwrap();
        i.clone()
    }
}

fn record(model: &Model, ids: &[u32], policy: &dyn LayerPolicy) -> Recorder {
    let mut rec = Recorder::default();
    let base = Plan::base();
    let mut pass = Pass::plan(&base, FAST)
        .with_policy(policy)
        .with_probe(&mut rec);
    model
        .transformer
        .forward_hidden(&tensor(ids), &mut pass)
        .unwrap();
    rec
}

fn rows_of(t: &Tensor, rows: &[u32]) -> Vec<f32> {
    let idx = Tensor::new(rows, &Device::Cpu).unwrap();
    to_vec(&t.index_select(&idx, 0).unwrap())
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    let d = common::max_abs_diff(a, b);
    assert!(d < tol, "{what}: max |Δ| = {d}");
}

fn full_policy() -> OneLayer {
    OneLayer {
        layer: 0,
        attn: AttnExec::Full,
        mlp: MlpExec::Full,
    }
}

#[test]
fn routed_rows_compute_exactly_what_the_full_block_computes_for_them() {
    let model = common::load_tiny("qwen2");
    let ids = &ids_of(&model)[..12];
    let full = record(&model, ids, &full_policy());
    let rows = vec![1u32, 4, 5, 9];
    let others: Vec<u32> = (0..12).filter(|r| !rows.contains(r)).collect();
    // Other rows still write K/V: routed queries see every key.
    let routed = record(
        &model,
        ids,
        &OneLayer {
            layer: 0,
            attn: AttnExec::Rows {
                rows: rows.clone(),
                others_write_kv: true,
            },
            mlp: MlpExec::Rows(rows.clone()),
        },
    );
    let a = BlockId::attn(0);
    assert_close(
        &rows_of(&routed.delta(a), &rows),
        &rows_of(&full.delta(a), &rows),
        1e-5,
        "routed attention rows",
    );
    assert!(rows_of(&routed.delta(a), &others).iter().all(|&v| v == 0.0));
    // The MLP sees a different input where attention was not routed, so
    // compare it with the full MLP on the routed run's own input.
    let m = BlockId::mlp(0);
    let mlp_ref = record(
        &model,
        ids,
        &OneLayer {
            layer: 0,
            attn: AttnExec::Rows {
                rows: rows.clone(),
                others_write_kv: true,
            },
            mlp: MlpExec::Full,
        },
    );
    assert_close(
        &rows_of(&routed.delta(m), &rows),
        &rows_of(&mlp_ref.delta(m), &rows),
        1e-5,
        "routed MLP rows",
    );
    assert!(rows_of(&routed.delta(m), &others).iter().all(|&v| v == 0.0));
}

#[test]
fn a_token_that_leaves_a_gap_is_invisible_like_an_evicted_key() {
    let model = common::load_tiny("llama");
    let ids = &ids_of(&model)[..4];
    let plan = Plan::base();
    // Routing rows 0, 1, 3 of layer 0 with gaps: query 3 sees keys 0, 1, 3.
    let gap = OneLayer {
        layer: 0,
        attn: AttnExec::Rows {
            rows: vec![0, 1, 3],
            others_write_kv: false,
        },
        mlp: MlpExec::Full,
    };
    let mut state = model.transformer.new_state(0);
    let mut pass = Pass::plan(&plan, FAST)
        .with_policy(&gap)
        .with_state(&mut state);
    let x = model.transformer.embed_tokens(&tensor(ids)).unwrap();
    let routed = model.transformer.run_layers(x, 0..1, &mut pass).unwrap();
    assert_eq!(state.kv(0).unwrap().positions(), &[0, 1, 3]);
    // The same through eviction: three tokens, drop position 2, then token 3.
    let mut evicted = model.transformer.new_state(0);
    let x = model.transformer.embed_tokens(&tensor(&ids[..3])).unwrap();
    let mut pass = Pass::plan(&plan, FAST).with_state(&mut evicted);
    model.transformer.run_layers(x, 0..1, &mut pass).unwrap();
    evicted.advance(3);
    evicted.kv_mut(0).unwrap().select(&[0, 1]).unwrap();
    let x = model.transformer.embed_tokens(&tensor(&ids[3..])).unwrap();
    let mut pass = Pass::plan(&plan, FAST).with_state(&mut evicted);
    let last = model.transformer.run_layers(x, 0..1, &mut pass).unwrap();
    let routed_last = routed.narrow(1, 3, 1).unwrap();
    assert_close(
        &to_vec(&routed_last),
        &to_vec(&last),
        1e-5,
        "gap vs eviction",
    );
}

#[test]
fn kv_only_writes_keys_and_adds_nothing() {
    let model = common::load_tiny("llama");
    let ids = &ids_of(&model)[..6];
    let kv_only = OneLayer {
        layer: 2,
        attn: AttnExec::KvOnly,
        mlp: MlpExec::Full,
    };
    let plan = Plan::base();
    let mut state = model.transformer.new_state(0);
    let mut rec = Recorder::default();
    let mut pass = Pass::plan(&plan, FAST)
        .with_policy(&kv_only)
        .with_state(&mut state)
        .with_probe(&mut rec);
    let h = model
        .transformer
        .forward_hidden(&tensor(ids), &mut pass)
        .unwrap();
    assert_eq!(state.lengths(), vec![6; 4]);
    assert!(!rec.blocks.iter().any(|(b, _, _)| *b == BlockId::attn(2)));
    // The output equals skipping the block.
    let skip = Plan::with_skips([BlockId::attn(2)]);
    let want = model
        .transformer
        .forward_hidden(&tensor(ids), &mut Pass::plan(&skip, FAST))
        .unwrap();
    assert_eq!(to_vec(&h), to_vec(&want));
}

#[test]
fn a_head_subset_equals_zeroing_the_other_heads_context() {
    let model = common::load_tiny("llama");
    let ids = &ids_of(&model)[..10];
    let heads = vec![0u32, 3];
    let full = record(&model, ids, &full_policy());
    let ctx = full.context.clone().unwrap(); // (1, t, heads, hd)
    let (_, t, nh, hd) = ctx.dims4().unwrap();
    let keep: Vec<f32> = (0..nh)
        .map(|h| f32::from(u8::from(heads.contains(&(h as u32)))))
        .collect();
    let keep = Tensor::new(keep.as_slice(), &Device::Cpu)
        .unwrap()
        .reshape((1, 1, nh, 1))
        .unwrap();
    let masked = ctx
        .broadcast_mul(&keep)
        .unwrap()
        .reshape((t, nh * hd))
        .unwrap();
    let o = model.transformer.layers[0].attn.o.dense_weight().unwrap();
    let want = masked.matmul(&o.t().unwrap()).unwrap();
    let sub = record(
        &model,
        ids,
        &OneLayer {
            layer: 0,
            attn: AttnExec::Heads(heads.clone()),
            mlp: MlpExec::Full,
        },
    );
    assert_eq!(sub.context.as_ref().unwrap().dims(), &[1, t, 2, hd]);
    assert_close(
        &to_vec(&sub.delta(BlockId::attn(0))),
        &to_vec(&want),
        1e-5,
        "head subset vs masked heads",
    );
    // The same subset in a decode step over the cache.
    let policy = OneLayer {
        layer: 0,
        attn: AttnExec::Heads(heads),
        mlp: MlpExec::Full,
    };
    let base = Plan::base();
    let mut state = model.transformer.new_state(0);
    let mut pass = Pass::plan(&base, FAST)
        .with_policy(&policy)
        .with_state(&mut state);
    let all = model
        .transformer
        .forward_hidden(&tensor(ids), &mut pass)
        .unwrap();
    let mut state = model.transformer.new_state(0);
    let mut pass = Pass::plan(&base, FAST)
        .with_policy(&policy)
        .with_state(&mut state);
    model
        .transformer
        .forward_hidden(&tensor(&ids[..t - 1]), &mut pass)
        .unwrap();
    let mut pass = Pass::plan(&base, FAST)
        .with_policy(&policy)
        .with_state(&mut state);
    let last = model
        .transformer
        .forward_hidden(&tensor(&ids[t - 1..]), &mut pass)
        .unwrap();
    assert_close(
        &to_vec(&all.narrow(1, t - 1, 1).unwrap()),
        &to_vec(&last),
        1e-5,
        "head subset decode vs full sequence",
    );
}

#[test]
fn a_neuron_subset_equals_zeroing_the_other_neurons() {
    let model = common::load_tiny("mistral");
    let ids = &ids_of(&model)[..10];
    let neurons: Vec<u32> = (0..128).filter(|n| n % 3 != 1).collect();
    let sub = record(
        &model,
        ids,
        &OneLayer {
            layer: 0,
            attn: AttnExec::Full,
            mlp: MlpExec::Neurons(neurons.clone()),
        },
    );
    let layer = &model.transformer.layers[0];
    let x = sub.input(BlockId::mlp(0)).squeeze(0).unwrap();
    let h = candle_nn::ops::rms_norm(&x, &layer.mlp_norm, model.cfg().rms_norm_eps as f32).unwrap();
    let gate = h
        .matmul(&layer.mlp.gate.dense_weight().unwrap().t().unwrap())
        .unwrap();
    let up = h
        .matmul(&layer.mlp.up.dense_weight().unwrap().t().unwrap())
        .unwrap();
    let act = (gate.silu().unwrap() * up).unwrap();
    let keep: Vec<f32> = (0..128)
        .map(|n| f32::from(u8::from(neurons.contains(&n))))
        .collect();
    let keep = Tensor::new(keep.as_slice(), &Device::Cpu).unwrap();
    let act = act.broadcast_mul(&keep).unwrap();
    let want = act
        .matmul(&layer.mlp.down.dense_weight().unwrap().t().unwrap())
        .unwrap();
    assert_close(
        &to_vec(&sub.delta(BlockId::mlp(0))),
        &to_vec(&want),
        1e-5,
        "neuron subset vs masked neurons",
    );
}

#[test]
fn positions_past_the_model_are_refused() {
    let model = common::load_tiny("llama");
    let n = model.transformer.max_positions();
    let ids = vec![1u32; n + 1];
    let err = model
        .transformer
        .forward_hidden(&tensor(&ids), &mut Pass::plan(&Plan::base(), FAST))
        .unwrap_err();
    assert!(err.to_string().contains("exceeds the model's"), "{err}");
}
