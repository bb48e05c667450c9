//! The forward pass against transformers' logits on the four tiny
//! Llama-family models in shared/reference/tiny: plain, with skips, with scales.

mod common;

use candle_core::{Device, Tensor};
use scalpel::model::{Model, Pass, RunOptions};
use scalpel::plan::{BlockId, LayerScales, Plan};

const MODELS: [&str; 4] = ["llama", "llama-tied", "qwen2", "mistral"];
/// Logits against transformers: measured at most 2.0e-5 (mistral, fast mode).
const TOL: f32 = 5e-5;
/// Incremental decode against the full sequence: measured at most 1.2e-5 (mistral).
const DECODE_TOL: f32 = 3e-5;
/// RoPE inverse frequencies, relative: measured at most 3.4e-6 (llama-tied's Llama-3.1 scaling).
const ROPE_TOL: f32 = 1e-5;

fn logits(model: &Model, ids: &[u32], plan: &Plan, run: RunOptions) -> Vec<f32> {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let h = model
        .transformer
        .forward_hidden(&input, &mut Pass::plan(plan, run))
        .unwrap();
    model
        .transformer
        .logits(&h, run)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn reference_logits(r: &serde_json::Value, key: &str) -> Vec<f32> {
    r[key]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
        })
        .collect()
}

fn ids(r: &serde_json::Value) -> Vec<u32> {
    common::json_ints::<u32>(&r["token_ids"])
}

fn skip_plan(r: &serde_json::Value) -> Plan {
    let layers = |k: &str| common::json_ints::<usize>(&r["skip"][k]);
    let mut blocks: Vec<BlockId> = layers("skip_attn_layers")
        .into_iter()
        .map(BlockId::attn)
        .collect();
    blocks.extend(layers("skip_mlp_layers").into_iter().map(BlockId::mlp));
    Plan::with_skips(blocks)
}

fn scaled_plan(r: &serde_json::Value, n_layers: usize) -> Plan {
    let s = &r["scaled"];
    let f = |k: &str| s[k].as_f64().unwrap() as f32;
    let scales = LayerScales {
        b_att: f("b_att"),
        s_att: f("s_att"),
        b_mlp: f("b_mlp"),
        s_mlp: f("s_mlp"),
    };
    Plan {
        skip: Default::default(),
        scales: Some(vec![scales; n_layers]),
        ..Default::default()
    }
}

#[test]
fn logits_match_transformers_for_every_variant() {
    for name in MODELS {
        let r = common::read_json(common::tiny_dir(name).join("reference.json"));
        let model = common::load_tiny(name);
        let ids = ids(&r);
        let cases = [
            ("logits", Plan::base()),
            ("logits_skip", skip_plan(&r)),
            ("logits_scaled", scaled_plan(&r, model.n_layers())),
        ];
        for (key, plan) in cases {
            let expected = reference_logits(&r, key);
            for run in [RunOptions::FAST, RunOptions::DIFFERENTIABLE] {
                let got = logits(&model, &ids, &plan, run);
                let diff = common::max_abs_diff(&got, &expected);
                eprintln!("{name} {key} {:?}: max |Δlogit| = {diff:e}", run.mode);
                assert!(
                    diff < TOL,
                    "{name} {key} {:?}: max |Δlogit| = {diff}",
                    run.mode
                );
            }
        }
    }
}

#[test]
fn rope_frequencies_match_transformers() {
    for name in MODELS {
        let r = common::read_json(common::tiny_dir(name).join("reference.json"));
        let model = common::load_tiny(name);
        let expected: Vec<f32> = r["rope_inv_freq"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let got = model.cfg().rope_inv_freq();
        let worst = got
            .iter()
            .zip(&expected)
            .map(|(g, e)| (g - e).abs() / e.abs().max(1e-3))
            .fold(0f32, f32::max);
        eprintln!("{name}: inv_freq max relative error {worst:e}");
        for (g, e) in got.iter().zip(&expected) {
            assert!(
                (g - e).abs() <= ROPE_TOL * e.abs().max(1e-3),
                "{name}: inv_freq {g} vs {e}"
            );
        }
    }
}

#[test]
fn incremental_decode_matches_full_sequence() {
    for name in MODELS {
        let r = common::read_json(common::tiny_dir(name).join("reference.json"));
        let model = common::load_tiny(name);
        let ids = ids(&r);
        let plan = skip_plan(&r);
        let full = logits(&model, &ids, &plan, RunOptions::FAST);
        let vocab = model.cfg().vocab_size;
        // Prefill 10 tokens, then one token at a time.
        let t = &model.transformer;
        let mut cache = t.new_state(0);
        let prefill = Tensor::new(&ids[..10], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let h = t
            .forward_hidden(
                &prefill,
                &mut Pass::plan(&plan, RunOptions::FAST).with_state(&mut cache),
            )
            .unwrap();
        let mut got: Vec<f32> = t
            .logits(&h, RunOptions::FAST)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for id in ids.iter().skip(10) {
            let x = Tensor::new(&[*id], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let h = t
                .forward_hidden(
                    &x,
                    &mut Pass::plan(&plan, RunOptions::FAST).with_state(&mut cache),
                )
                .unwrap();
            got.extend(
                t.logits(&h, RunOptions::FAST)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
        }
        assert_eq!(got.len(), ids.len() * vocab);
        let diff = common::max_abs_diff(&got, &full);
        eprintln!("{name}: decode vs full max |Δ| = {diff:e}");
        assert!(diff < DECODE_TOL, "{name}: decode vs full max |Δ| = {diff}");
        // Skipped attention layers (1 and 2) keep no KV cache.
        assert_eq!(cache.cached_layers(), vec![0, 3], "{name}");
    }
}
