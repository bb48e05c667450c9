//! Model loading: identities that do not depend on the load dtype, Llama-3
//! GGUFs' `rope_freqs.weight`, and weights whose shapes disagree with the
//! config. The GGUFs here are written from the tiny reference models.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use scalpel::model::weights::gguf_name;
use scalpel::model::{LocalModel, Model, Pass, Resolved, RunOptions};
use scalpel::plan::Plan;

/// The reference tolerance (see shared/reference/README.md).
const TOL: f32 = 1e-4;

fn load_as(local: LocalModel, dtype: DType) -> Model {
    let resolved = Resolved {
        local,
        origin: "test".into(),
    };
    Model::load_as(&resolved, &Device::Cpu, dtype).unwrap_or_else(|e| panic!("{e:#}"))
}

fn try_load(local: LocalModel) -> anyhow::Result<Model> {
    Model::load(
        &Resolved {
            local,
            origin: "test".into(),
        },
        &Device::Cpu,
    )
}

fn logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let run = RunOptions::FAST;
    let h = model
        .transformer
        .forward_hidden(&input, &mut Pass::plan(&Plan::base(), run))
        .unwrap();
    let l = model.transformer.logits(&h, run).unwrap();
    l.flatten_all().unwrap().to_vec1().unwrap()
}

fn reference(name: &str) -> serde_json::Value {
    common::read_json(common::tiny_dir(name).join("reference.json"))
}

fn reference_logits(r: &serde_json::Value) -> Vec<f32> {
    r["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter())
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

/// The tiny model's tensors in f32 under their Hugging Face names.
fn tiny_tensors(name: &str) -> HashMap<String, Tensor> {
    let path = common::tiny_dir(name).join("model.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
        .collect()
}

/// llama.cpp's converter permutation: rotate-halves rows -> adjacent pairs.
fn permute_for_gguf(w: &Tensor, n_heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    let hd = out / n_heads;
    w.reshape((n_heads, 2, hd / 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

/// llama.cpp's `rope_freqs` for a llama3 RoPE (its converter's formula):
/// the factor each base frequency is divided by.
fn llama3_freq_factors(cfg: &serde_json::Value) -> Vec<f32> {
    let s = &cfg["rope_scaling"];
    let f = |k: &str| s[k].as_f64().unwrap();
    let (factor, lo, hi, old) = (
        f("factor"),
        f("low_freq_factor"),
        f("high_freq_factor"),
        f("original_max_position_embeddings"),
    );
    let d = cfg["head_dim"].as_u64().unwrap_or(
        cfg["hidden_size"].as_u64().unwrap() / cfg["num_attention_heads"].as_u64().unwrap(),
    ) as usize;
    let base = cfg["rope_theta"].as_f64().unwrap();
    (0..d / 2)
        .map(|i| {
            let freq = 1.0 / base.powf(2.0 * i as f64 / d as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let (lo_wl, hi_wl) = (old / lo, old / hi);
            let x = if wavelen < hi_wl {
                1.0
            } else if wavelen > lo_wl {
                factor
            } else {
                let smooth = (old / wavelen - lo) / (hi - lo);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            x as f32
        })
        .collect()
}

/// How [`write_tiny_gguf`] writes one model.
#[derive(Default)]
struct GgufOptions<'a> {
    rope_freqs: Option<Vec<f32>>,
    /// Replaces one tensor (by Hugging Face name) before writing.
    replace: Option<(&'a str, Tensor)>,
}

/// Writes a tiny reference model as a `llama` GGUF the way llama.cpp's
/// converter does (q/k permuted, f32 tensors, no RoPE-scaling metadata).
fn write_tiny_gguf(name: &str, out: &Path, opts: GgufOptions) -> PathBuf {
    let cfg = common::read_json(common::tiny_dir(name).join("config.json"));
    let u = |k: &str| cfg[k].as_u64().unwrap() as u32;
    let (n_heads, n_kv) = (u("num_attention_heads"), u("num_key_value_heads"));
    let head_dim = u("hidden_size") / n_heads;
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String(format!("tiny-{name}"))),
        ("llama.vocab_size", Value::U32(u("vocab_size"))),
        (
            "llama.context_length",
            Value::U32(u("max_position_embeddings")),
        ),
        ("llama.embedding_length", Value::U32(u("hidden_size"))),
        (
            "llama.feed_forward_length",
            Value::U32(u("intermediate_size")),
        ),
        ("llama.block_count", Value::U32(u("num_hidden_layers"))),
        ("llama.attention.head_count", Value::U32(n_heads)),
        ("llama.attention.head_count_kv", Value::U32(n_kv)),
        ("llama.rope.dimension_count", Value::U32(head_dim)),
        (
            "llama.rope.freq_base",
            Value::F32(cfg["rope_theta"].as_f64().unwrap() as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
    ];
    let mut tensors = tiny_tensors(name);
    if let Some((k, t)) = opts.replace {
        tensors.insert(k.to_string(), t);
    }
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut q: Vec<(String, QTensor)> = names
        .into_iter()
        .map(|hf| {
            let mut t = tensors[hf].clone();
            if hf.ends_with("q_proj.weight") {
                t = permute_for_gguf(&t, n_heads as usize);
            } else if hf.ends_with("k_proj.weight") {
                t = permute_for_gguf(&t, n_kv as usize);
            }
            (
                gguf_name(hf),
                QTensor::quantize(&t, GgmlDType::F32).unwrap(),
            )
        })
        .collect();
    if let Some(f) = opts.rope_freqs {
        let t = Tensor::new(f.as_slice(), &Device::Cpu).unwrap();
        q.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
    }
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let path = out.join(format!("{name}.gguf"));
    let mut file = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut file, &md, &ts).unwrap();
    path
}

// ---- 1. identity independent of the load dtype ----

#[test]
fn identity_does_not_depend_on_the_load_dtype() {
    // `llama` stores f32 values, which a bf16 load rounds.
    let dir = common::tiny_dir("llama");
    let f32_id = load_as(LocalModel::HfDir(dir.clone()), DType::F32).identity;
    let bf16_id = load_as(LocalModel::HfDir(dir), DType::BF16).identity;
    assert_eq!(f32_id, bf16_id, "safetensors: f32 vs bf16 load");

    let work = common::scratch_dir();
    let gguf = write_tiny_gguf("llama", work.path(), GgufOptions::default());
    let f32_id = load_as(LocalModel::Gguf(gguf.clone()), DType::F32).identity;
    let bf16_id = load_as(LocalModel::Gguf(gguf), DType::BF16).identity;
    assert_eq!(f32_id, bf16_id, "GGUF: f32 vs bf16 load");
}

#[test]
fn the_real_gguf_has_one_identity_in_f32_and_bf16() {
    let path = common::smollm2_path();
    let f32_id = load_as(LocalModel::Gguf(path.clone()), DType::F32).identity;
    let bf16_id = load_as(LocalModel::Gguf(path), DType::BF16).identity;
    assert_eq!(f32_id, bf16_id);
}

#[test]
fn identity_changes_with_the_stored_values() {
    let work = common::scratch_dir();
    let plain = write_tiny_gguf("llama", work.path(), GgufOptions::default());
    let a = load_as(LocalModel::Gguf(plain), DType::F32).identity;
    // One value nudged by one f32 ulp in a sampled position (the first).
    let mut emb = tiny_tensors("llama")["model.embed_tokens.weight"].clone();
    let mut v: Vec<f32> = emb.flatten_all().unwrap().to_vec1().unwrap();
    v[0] = f32::from_bits(v[0].to_bits() + 1);
    emb = Tensor::from_vec(v, emb.dims(), &Device::Cpu).unwrap();
    let other = work.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let nudged = write_tiny_gguf(
        "llama",
        &other,
        GgufOptions {
            replace: Some(("model.embed_tokens.weight", emb)),
            ..Default::default()
        },
    );
    let b = load_as(LocalModel::Gguf(nudged), DType::F32).identity;
    assert_ne!(a.content_hash, b.content_hash);
}

// ---- 2. Llama-3 GGUFs: rope_freqs.weight ----

/// `llama-tied` as a GGUF with llama.cpp's frequency factors and no
/// RoPE-scaling metadata.
fn llama3_gguf_with_rope_freqs(dir: &Path) -> PathBuf {
    let cfg = common::read_json(common::tiny_dir("llama-tied").join("config.json"));
    write_tiny_gguf(
        "llama-tied",
        dir,
        GgufOptions {
            rope_freqs: Some(llama3_freq_factors(&cfg)),
            ..Default::default()
        },
    )
}

#[test]
fn llama3_gguf_with_rope_freqs_matches_transformers() {
    let work = common::scratch_dir();
    let gguf = llama3_gguf_with_rope_freqs(work.path());
    let model = load_as(LocalModel::Gguf(gguf), DType::F32);
    let r = reference("llama-tied");
    let expected_freq: Vec<f32> = r["rope_inv_freq"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let got_freq = model.cfg().rope_inv_freq();
    let freq_diff = common::max_abs_diff(&got_freq, &expected_freq);
    let ids = common::json_ints::<u32>(&r["token_ids"]);
    let diff = common::max_abs_diff(&logits(&model, &ids), &reference_logits(&r));
    eprintln!(
        "llama3 GGUF with rope_freqs: max |Δinv_freq| = {freq_diff:e}, max |Δlogit| = {diff:e}"
    );
    assert!(
        freq_diff < 1e-6,
        "inv_freq {got_freq:?} vs {expected_freq:?}"
    );
    assert!(diff < TOL, "max |Δlogit| = {diff}");
}

#[test]
fn llama3_gguf_without_rope_freqs_differs() {
    // The factors matter: the same file without them computes other logits.
    let work = common::scratch_dir();
    let gguf = write_tiny_gguf("llama-tied", work.path(), GgufOptions::default());
    let model = load_as(LocalModel::Gguf(gguf), DType::F32);
    let r = reference("llama-tied");
    let ids = common::json_ints::<u32>(&r["token_ids"]);
    let diff = common::max_abs_diff(&logits(&model, &ids), &reference_logits(&r));
    eprintln!("llama3 GGUF without rope_freqs: max |Δlogit| = {diff:e}");
    assert!(diff > 1.0, "max |Δlogit| = {diff}");
}

#[test]
fn rope_freqs_of_the_wrong_length_are_refused() {
    let work = common::scratch_dir();
    let gguf = write_tiny_gguf(
        "llama-tied",
        work.path(),
        GgufOptions {
            rope_freqs: Some(vec![1.0; 5]),
            ..Default::default()
        },
    );
    let err = match try_load(LocalModel::Gguf(gguf)) {
        Ok(_) => panic!("5 RoPE factors loaded for 8 rotated pairs"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("`rope_freqs.weight` has 5 values") && err.contains("needs 8"),
        "{err}"
    );
}

// ---- 3. shape mismatches are refused, deci FFNs are padded ----

#[test]
fn a_misshapen_q_proj_in_a_gguf_is_refused_naming_it() {
    let work = common::scratch_dir();
    let name = "model.layers.1.self_attn.q_proj.weight";
    let q = tiny_tensors("llama")[name].narrow(0, 0, 48).unwrap();
    let gguf = write_tiny_gguf(
        "llama",
        work.path(),
        GgufOptions {
            replace: Some((name, q)),
            ..Default::default()
        },
    );
    let err = match try_load(LocalModel::Gguf(gguf)) {
        Ok(_) => panic!("a 48-row q_proj loaded into a 64-row model"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("blk.1.attn_q.weight"), "{err}");
    assert!(
        err.contains("[48, 64]") && err.contains("[64, 64]"),
        "{err}"
    );
}

#[test]
fn a_misshapen_q_proj_in_safetensors_is_refused_naming_it() {
    let work = common::scratch_dir();
    let dir = work.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    let src = common::tiny_dir("llama");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let name = "model.layers.2.self_attn.q_proj.weight";
    let mut tensors = tiny_tensors("llama");
    let q = tensors[name]
        .narrow(1, 0, 32)
        .unwrap()
        .contiguous()
        .unwrap();
    tensors.insert(name.into(), q);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let err = match try_load(LocalModel::HfDir(dir)) {
        Ok(_) => panic!("a 32-column q_proj loaded into a 64-wide model"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains(name), "{err}");
    assert!(
        err.contains("[64, 32]") && err.contains("[64, 64]"),
        "{err}"
    );
}

#[test]
fn a_deci_gguf_with_zero_ffn_stand_ins_reloads_with_the_plan_logits() {
    use scalpel::plan::BlockId;
    let work = common::scratch_dir();
    let gguf = write_tiny_gguf("llama", work.path(), GgufOptions::default());
    let base = load_as(LocalModel::Gguf(gguf.clone()), DType::F32);
    // mlp.1 after a kept attention and mlp.3 in the last layer become
    // 256-wide all-zero FFNs; attn.2 + mlp.2 are left out.
    let plan = Plan::with_skips([
        BlockId::mlp(1),
        BlockId::attn(2),
        BlockId::mlp(2),
        BlockId::mlp(3),
    ]);
    let out = work.path().join("deci.gguf");
    let mut file = std::fs::File::create(&out).unwrap();
    let summary =
        scalpel::export::gguf::write_deci_gguf(&gguf, &plan, None, &[], &mut file).unwrap();
    drop(file);
    assert_eq!(summary.zero_ffn_layers, vec![1, 3]);
    let deci = load_as(LocalModel::Gguf(out), DType::F32);
    assert_eq!(deci.implied_plan.skip, plan.skip);
    let ids: Vec<u32> = (0..16).map(|i| (i * 37 % 512) as u32).collect();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let run = RunOptions::FAST;
    let run_plan = |m: &Model, p: &Plan| -> Vec<f32> {
        let h = m
            .transformer
            .forward_hidden(&input, &mut Pass::plan(p, run))
            .unwrap();
        let l = m.transformer.logits(&h, run).unwrap();
        l.flatten_all().unwrap().to_vec1().unwrap()
    };
    let want = run_plan(&base, &plan);
    let got = run_plan(&deci, &deci.implied_plan);
    let diff = common::max_abs_diff(&got, &want);
    eprintln!("deci GGUF reload vs plan: max |Δlogit| = {diff:e}");
    assert!(diff < 1e-6, "max |Δlogit| = {diff}");
}

// ---- 1b. can the plan run here, and is it the same weights ----

fn plan_made_on(identity: scalpel::plan::ModelIdentity) -> scalpel::plan::PlanFile {
    use scalpel::plan::BlockId;
    // A whole layer, so that a mergekit recipe can express it.
    let layer = Plan::with_skips([BlockId::attn(1), BlockId::mlp(1)]);
    scalpel::plan::PlanFile::new(identity, layer)
}

#[test]
fn a_plan_for_other_weights_of_the_same_shapes_applies_with_a_warning() {
    let model = common::load_tiny("llama");
    let other = scalpel::plan::ModelIdentity {
        name: "llama-q8_0".into(),
        content_hash: "0123456789abcdef".into(),
        ..model.identity.clone()
    };
    let warning = plan_made_on(other.clone())
        .check_model(&model.identity)
        .unwrap()
        .expect("other weights give a warning");
    assert!(warning.contains(&other.to_string()), "{warning}");
    assert!(warning.contains(&model.identity.to_string()), "{warning}");
    assert_eq!(
        plan_made_on(model.identity.clone())
            .check_model(&model.identity)
            .unwrap(),
        None
    );

    // The CLI applies the plan and prints the warning.
    let work = common::scratch_dir();
    let plan = work.path().join("p.json");
    plan_made_on(other).save(&plan).unwrap();
    let out = work.path().join("recipe.yaml");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .arg("--model")
        .arg(common::tiny_dir("llama"))
        .arg("--plan")
        .arg(&plan)
        .args(["export", "--format", "mergekit", "--out"])
        .arg(&out)
        .env("SCALPEL_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("scalpel: warning:") && stderr.contains("llama-q8_0"),
        "{stderr}"
    );
    assert!(out.exists());
}

#[test]
fn a_plan_for_another_layer_count_or_shape_is_refused_naming_both() {
    let model = common::load_tiny("llama");
    let deeper = scalpel::plan::ModelIdentity {
        name: "deeper".into(),
        n_layers: 8,
        ..model.identity.clone()
    };
    let err = plan_made_on(deeper.clone())
        .check_model(&model.identity)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&deeper.to_string()), "{err}");
    assert!(err.contains(&model.identity.to_string()), "{err}");
    assert!(err.contains("8 vs 4 layers"), "{err}");

    let mut shape = model.identity.shape.unwrap();
    shape.n_kv_heads = 4;
    let wider = scalpel::plan::ModelIdentity {
        name: "more-kv-heads".into(),
        shape: Some(shape),
        ..model.identity.clone()
    };
    let err = plan_made_on(wider.clone())
        .check_model(&model.identity)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&wider.to_string()), "{err}");
    assert!(err.contains(&model.identity.to_string()), "{err}");
    assert!(
        err.contains("4 heads / 4 KV") && err.contains("4 heads / 2 KV"),
        "{err}"
    );
}

#[test]
fn an_old_plan_file_without_shapes_is_matched_by_architecture_and_depth() {
    let model = common::load_tiny("llama");
    let work = common::scratch_dir();
    let write = |n_layers: usize| {
        let path = work.path().join(format!("old-{n_layers}.json"));
        let json = format!(
            r#"{{"format":"scalpel-plan","version":1,"model":{{"name":"old","architecture":"llama",
                "n_layers":{n_layers},"content_hash":"0000"}},"skip":["attn.1"]}}"#
        );
        std::fs::write(&path, json).unwrap();
        scalpel::plan::PlanFile::load(&path).unwrap()
    };
    let old = write(4);
    assert_eq!(old.model.shape, None);
    let warning = old.check_model(&model.identity).unwrap();
    assert!(warning.is_some_and(|w| w.contains("old (llama, 4 layers")));
    let err = write(3)
        .check_model(&model.identity)
        .unwrap_err()
        .to_string();
    assert!(err.contains("belongs to old"), "{err}");
}

#[test]
fn a_smollm2_deci_gguf_pads_only_its_zero_ffn_stand_ins() {
    use scalpel::plan::BlockId;
    // mlp.3 after a kept attention becomes a 256-wide all-zero FFN, narrower
    // than the model's 1536: the one shape the loader pads.
    let base = common::smollm2();
    let plan = Plan::with_skips([BlockId::mlp(3), BlockId::attn(7), BlockId::mlp(7)]);
    let work = common::scratch_dir();
    let out = work.path().join("deci.gguf");
    let mut file = std::fs::File::create(&out).unwrap();
    let summary = scalpel::export::gguf::write_deci_gguf(
        &common::smollm2_path(),
        &plan,
        None,
        &[],
        &mut file,
    )
    .unwrap();
    drop(file);
    assert_eq!(summary.zero_ffn_layers, vec![3]);
    let deci = load_as(LocalModel::Gguf(out), DType::F32);
    assert_eq!(deci.implied_plan.skip, plan.skip);
    let ids: Vec<u32> = (0..12).map(|i| 100 + i * 997).collect();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let run = RunOptions::FAST;
    let run_plan = |m: &Model, p: &Plan| -> Vec<f32> {
        let h = m
            .transformer
            .forward_hidden(&input, &mut Pass::plan(p, run))
            .unwrap();
        let l = m.transformer.logits(&h, run).unwrap();
        l.flatten_all().unwrap().to_vec1().unwrap()
    };
    let diff = common::max_abs_diff(&run_plan(&deci, &deci.implied_plan), &run_plan(base, &plan));
    eprintln!("SmolLM2 deci GGUF reload vs plan: max |Δlogit| = {diff:e}");
    // Same stored weights, same kernels: measured 0.
    assert!(diff < 1e-6, "max |Δlogit| = {diff}");
}

#[test]
fn a_gguf_with_rope_freqs_is_not_exported_as_a_folder_that_would_lose_them() {
    let work = common::scratch_dir();
    let gguf = llama3_gguf_with_rope_freqs(work.path());
    let model = load_as(LocalModel::Gguf(gguf), DType::F32);
    let out = work.path().join("folder");
    std::fs::create_dir_all(&out).unwrap();
    let err = scalpel::export::decilm::write_folder(&model, &scalpel::plan::Plan::base(), "", &out)
        .unwrap_err();
    assert!(err.to_string().contains("rope_freqs"), "{err}");
    assert!(!out.join("model.safetensors").exists());
}
