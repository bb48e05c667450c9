//! Mistral's sliding window, in prefill and in decode past the window,
//! against transformers (tests/fixtures/make_mistral_window.py: the shared
//! tiny Mistral with a window of 8 over its 24-token sequence).

mod common;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use scalpel::model::{LocalModel, Model, Pass, Resolved, RunOptions};
use scalpel::plan::Plan;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-mistral-window")
}

/// The shared weights under the fixture's config (window 8).
fn load(dir: &std::path::Path) -> Model {
    std::fs::copy(fixture().join("config.json"), dir.join("config.json")).unwrap();
    std::fs::copy(
        common::tiny_dir("mistral").join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let resolved = Resolved {
        local: LocalModel::HfDir(dir.to_path_buf()),
        origin: "test".into(),
    };
    Model::load(&resolved, &Device::Cpu).unwrap()
}

fn reference() -> (Vec<u32>, Vec<f32>) {
    let r = common::read_json(fixture().join("reference.json"));
    let ids = common::json_ints::<u32>(&r["token_ids"]);
    let logits = r["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    (ids, logits)
}

fn logits(model: &Model, h: &Tensor, run: RunOptions) -> Vec<f32> {
    model
        .transformer
        .logits(h, run)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

// Measured: 1.4e-5 prefill and decode (the reference is rounded to 1e-6;
// transformers' own decode differs from its prefill by 1.5e-5).
const TOL: f32 = 5e-5;

#[test]
fn prefill_and_decode_past_the_window_match_transformers() {
    let dir = common::scratch_dir();
    let model = load(dir.path());
    assert_eq!(model.cfg().sliding_window, Some(8));
    let (ids, want) = reference();
    let t = &model.transformer;
    let plan = Plan::base();
    let input = |ids: &[u32]| {
        Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
    };
    for run in [RunOptions::FAST, RunOptions::DIFFERENTIABLE] {
        let h = t
            .forward_hidden(&input(&ids), &mut Pass::plan(&plan, run))
            .unwrap();
        let d = common::max_abs_diff(&logits(&model, &h, run), &want);
        assert!(d < TOL, "{:?} prefill: max |Δ| = {d}", run.mode);
    }
    // Prefill 5, then one token at a time well past the window, with a
    // state small enough that old keys are dropped as it fills.
    let mut state = t.new_state(0);
    let mut got = Vec::new();
    let mut pass = Pass::plan(&plan, RunOptions::FAST).with_state(&mut state);
    let h = t.forward_hidden(&input(&ids[..5]), &mut pass).unwrap();
    got.extend(logits(&model, &h, RunOptions::FAST));
    for &id in &ids[5..] {
        let mut pass = Pass::plan(&plan, RunOptions::FAST).with_state(&mut state);
        let h = t.forward_hidden(&input(&[id]), &mut pass).unwrap();
        got.extend(logits(&model, &h, RunOptions::FAST));
    }
    let d = common::max_abs_diff(&got, &want);
    assert!(d < TOL, "decode past the window: max |Δ| = {d}");
}

#[test]
fn a_full_window_drops_the_keys_no_query_can_see() {
    let dir = common::scratch_dir();
    let model = load(dir.path());
    let t = &model.transformer;
    let plan = Plan::base();
    let ids: Vec<u32> = (0..200).map(|i| (i * 7 % 500) as u32).collect();
    // Room for 8 + 256 keys: decoding 200 tokens after 100 overflows it once.
    let mut state = t.new_state(300);
    let x = Tensor::new(&ids[..100], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    t.forward_hidden(
        &x,
        &mut Pass::plan(&plan, RunOptions::FAST).with_state(&mut state),
    )
    .unwrap();
    for round in 0..2 {
        for &id in &ids[100..] {
            let x = Tensor::new(&[id], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let mut pass = Pass::plan(&plan, RunOptions::FAST).with_state(&mut state);
            t.forward_hidden(&x, &mut pass).unwrap();
        }
        let kv = state.kv(0).unwrap();
        let next = state.next_position();
        assert_eq!(next as usize, 100 + 100 * (round + 1));
        // Every key a future query can see is still there.
        let first_visible = next - 7;
        assert!(kv.positions().contains(&first_visible));
        assert!(kv.len() <= 8 + 256, "round {round}: {} keys kept", kv.len());
    }
}

#[test]
fn a_kv_budget_is_refused_where_every_layer_already_has_a_window() {
    let dir = common::scratch_dir();
    let model = load(dir.path());
    let Err(err) = scalpel::model::kv::KvPolicy::new("quest:64:8".parse().unwrap(), model.cfg())
    else {
        panic!("a budget on a model with no global layer must be refused");
    };
    let msg = format!("{err:#}");
    assert!(
        msg.contains("every layer of this model already uses a sliding window of 8 tokens"),
        "{msg}"
    );
    // Full attention is what the model does anyway.
    assert!(scalpel::model::kv::KvPolicy::new("full".parse().unwrap(), model.cfg()).is_ok());
}
