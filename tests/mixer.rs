//! Attention replacement: the gated linear mixer's two forms agree, an
//! initialised mixer reproduces its attention on one token, the engine runs
//! it with a recurrent state and no KV cache, its gradients match finite
//! differences, distillation lowers the losses, and the plan round-trips.

mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use scalpel::model::mixer::{self, Dims};
use scalpel::model::{Model, Pass, RunOptions};
use scalpel::plan::{BlockId, Plan, PlanFile};
use scalpel::surgery::fit::FitOptions;
use scalpel::surgery::objective::LossKind;
use scalpel::surgery::replace::{self, LocalTargets};

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Random inputs of the right signs: positive features, log decays < 0.
fn random_inputs(t: usize) -> [Tensor; 6] {
    let d = &Device::Cpu;
    let (b, nh, nkv, hd) = (2, 4, 2, 8);
    let pos = |shape: &[usize]| (Tensor::rand(0.1f32, 1.0, shape, d).unwrap());
    let q = pos(&[b, nh, t, hd]);
    let k = pos(&[b, nkv, t, hd]);
    let v = Tensor::randn(0f32, 1.0, (b, nkv, t, hd), d).unwrap();
    let log_a = Tensor::rand(-2f32, -0.01, (b, nkv, t), d).unwrap();
    let s0 = Tensor::randn(0f32, 1.0, (b, nkv, hd, hd), d).unwrap();
    let z0 = pos(&[b, nkv, hd]);
    [q, k, v, log_a, s0, z0]
}

#[test]
fn recurrent_parallel_and_chunked_forms_agree() {
    let [q, k, v, la, s0, z0] = random_inputs(11);
    let (yr, sr, zr) = mixer::recurrent(&q, &k, &v, &la, &s0, &z0).unwrap();
    let (yp, sp, zp) = mixer::parallel(&q, &k, &v, &la, &s0, &z0).unwrap();
    let (yc, sc, zc) = mixer::chunked(&q, &k, &v, &la, &s0, &z0, 3).unwrap();
    for (name, a, b) in [
        ("y parallel", &yr, &yp),
        ("S parallel", &sr, &sp),
        ("z parallel", &zr, &zp),
        ("y chunked", &yr, &yc),
        ("S chunked", &sr, &sc),
        ("z chunked", &zr, &zc),
    ] {
        let diff = common::max_abs_diff(&flat(a), &flat(b));
        assert!(diff < 1e-5, "{name}: recurrent vs {name} differ by {diff}");
    }
    // The state is not trivially zero: the test would pass on a broken carry otherwise.
    assert!(flat(&sr).iter().any(|x| x.abs() > 0.1));
}

fn tiny() -> Model {
    common::load_tiny("llama")
}

/// `plan` with layers `layers` replaced by mixers initialised from attention.
fn replaced(model: &Model, plan: &Plan, layers: &[usize]) -> Plan {
    let params = replace::init_params(model, layers).unwrap();
    replace::plan_with_mixers(plan, layers, &params).unwrap()
}

fn logits(model: &Model, ids: &[u32], plan: &Plan) -> Vec<f32> {
    let input = Tensor::new(ids, model.device()).unwrap().unsqueeze(0).unwrap();
    let t = &model.transformer;
    let h = t
        .forward_hidden(&input, &mut Pass::plan(plan, RunOptions::FAST))
        .unwrap();
    flat(&t.logits(&h, RunOptions::FAST).unwrap())
}

#[test]
fn an_initialised_mixer_reproduces_its_attention_on_one_token() {
    let model = tiny();
    let plan = replaced(&model, &Plan::base(), &[1, 2]);
    let base = logits(&model, &[7], &Plan::base());
    let mixed = logits(&model, &[7], &plan);
    let diff = common::max_abs_diff(&base, &mixed);
    assert!(diff < 1e-4, "one token: base vs replaced logits differ by {diff}");
    // On longer sequences it is a different function (no softmax, no RoPE).
    let ids: Vec<u32> = (1..20).collect();
    let diff = common::max_abs_diff(&logits(&model, &ids, &Plan::base()), &logits(&model, &ids, &plan));
    assert!(diff > 1e-3, "19 tokens: the mixer should differ from attention, diff {diff}");
}

#[test]
fn decode_steps_on_the_recurrent_state_equal_one_prefill_and_keep_no_kv() {
    let model = tiny();
    let plan = replaced(&model, &Plan::base(), &[1, 3]);
    let t = &model.transformer;
    let ids: Vec<u32> = (0..300u32).map(|i| (i * 37 + 5) % 500).collect();
    // One pass over all tokens (several parallel chunks, no state).
    let full = logits(&model, &ids, &plan);
    let vocab = model.cfg().vocab_size;
    // A prefill then one token at a time, on a state.
    let mut state = t.new_state(0);
    let split = 290;
    let input = Tensor::new(&ids[..split], model.device()).unwrap().unsqueeze(0).unwrap();
    let mut pass = Pass::plan(&plan, RunOptions::FAST).with_state(&mut state);
    t.forward_hidden(&input, &mut pass).unwrap();
    let mut worst = 0f32;
    for (i, &id) in ids.iter().enumerate().skip(split) {
        let input = Tensor::new(&[id], model.device()).unwrap().unsqueeze(0).unwrap();
        let mut pass = Pass::plan(&plan, RunOptions::FAST).with_state(&mut state);
        let h = t.forward_hidden(&input, &mut pass).unwrap();
        let step = flat(&t.logits(&h, RunOptions::FAST).unwrap());
        worst = worst.max(common::max_abs_diff(&step, &full[i * vocab..(i + 1) * vocab]));
    }
    assert!(worst < 1e-4, "decode vs prefill logits differ by {worst}");
    assert_eq!(state.cached_layers(), vec![0, 2], "replaced layers hold no keys");
    assert_eq!(state.mixer(1).unwrap().tokens(), 300);
    let kv_only = 2 * 2 * 16 * 4 * 300 * 2; // 2 layers · K and V · 2 heads · 16 · f32 · tokens
    let mixer_state = 2 * Dims::of(model.cfg()).state_bytes();
    assert_eq!(state.bytes(), kv_only + mixer_state);
    // A rollback cannot be honoured by a recurrent state: the next step says so.
    state.truncate(295);
    let input = Tensor::new(&[1u32], model.device()).unwrap().unsqueeze(0).unwrap();
    let mut pass = Pass::plan(&plan, RunOptions::FAST).with_state(&mut state);
    let err = t.forward_hidden(&input, &mut pass).unwrap_err().to_string();
    assert!(err.contains("cannot forget tokens"), "{err}");
}
