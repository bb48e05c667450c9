//! Folding and the Nemotron-NAS (DeciLM) export on the real SmolLM2: the
//! folded model without scales, and the exported folder re-loaded by
//! scalpel, give the logits of the plan with scales.

mod common;
mod export_support;

use candle_core::{DType, Device, Tensor};
use export_support::{plan_with_b_scales, plan_with_scales};
use scalpel::export::fold::{fold_transformer, unscaled};
use scalpel::model::{LocalModel, Model, Pass, Resolved, RunOptions, Transformer};
use scalpel::plan::{Plan, PlanFile};

/// SmolLM2 in f64, so float rounding does not hide what the fold does.
fn smollm2_f64() -> &'static Model {
    static MODEL: std::sync::OnceLock<Model> = std::sync::OnceLock::new();
    MODEL.get_or_init(|| load_f64(LocalModel::Gguf(common::smollm2_path())))
}

fn load_f64(local: LocalModel) -> Model {
    let resolved = Resolved {
        local,
        origin: "test".into(),
    };
    Model::load_as(&resolved, &Device::Cpu, DType::F64).unwrap()
}

fn prompt_ids(model: &Model) -> Vec<u32> {
    let text = &scalpel::commands::eval::DEFAULT_EVAL_TEXT[..600];
    let ids = model.codec().unwrap().encode(text).unwrap();
    ids[..96].to_vec()
}

/// Logits through the slow ops (the fused ones have no f64 kernels).
fn logits(t: &Transformer, ids: &[u32], plan: &Plan) -> Vec<f32> {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let h = t
        .forward_hidden(&input, &mut Pass::plan(plan, RunOptions::DIFFERENTIABLE))
        .unwrap();
    t.logits(&h, RunOptions::DIFFERENTIABLE)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The same weights with RMSNorm's eps set to `eps`.
fn with_eps(t: &Transformer, eps: f64) -> Transformer {
    let mut cfg = t.cfg.clone();
    cfg.rms_norm_eps = eps;
    Transformer::with_embeddings(
        cfg,
        t.embed.clone(),
        t.embed_quantized.clone(),
        t.layers.clone(),
        t.norm.clone(),
        t.lm_head.clone(),
    )
    .unwrap()
}

#[test]
fn folded_weights_without_scales_give_the_scaled_plan_logits() {
    let model = smollm2_f64();
    let ids = prompt_ids(model);
    let check = |t: &Transformer, plan: &Plan| -> f32 {
        let want = logits(t, &ids, plan);
        let folded = fold_transformer(t, plan).unwrap();
        let got = logits(&folded, &ids, &unscaled(plan));
        common::max_abs_diff(&want, &got)
    };
    let plan = plan_with_scales(model.n_layers());
    // Without RMSNorm's eps the fold is exact (f64 rounding only) ...
    let diff = check(&with_eps(&model.transformer, 0.0), &plan);
    eprintln!("b and s scales, eps = 0: max |Δlogit| = {diff:e}");
    // Measured: 1.9e-9.
    assert!(diff < 5e-9, "eps = 0: max |Δlogit| = {diff}");
    // ... b-only scales are exact with eps too ...
    let diff = check(&model.transformer, &plan_with_b_scales(model.n_layers()));
    eprintln!("b scales only, eps = 1e-5: max |Δlogit| = {diff:e}");
    // Measured: 0 (identical); the eps = 0 case's f64 rounding bound.
    assert!(diff < 5e-9, "b scales: max |Δlogit| = {diff}");
    // ... and s scales are off only by eps against the rescaled stream.
    let diff = check(&model.transformer, &plan);
    eprintln!("b and s scales, eps = 1e-5: max |Δlogit| = {diff:e}");
    // Measured: 1.9e-3.
    assert!(diff < 5e-3, "max |Δlogit| = {diff}");
    // The scales matter: the model without them is far off.
    let want = logits(&model.transformer, &ids, &plan);
    let plain = logits(&model.transformer, &ids, &unscaled(&plan));
    assert!(common::max_abs_diff(&want, &plain) > 0.1);
}

fn export_decilm(plan: &Plan, out: &std::path::Path) {
    let model = common::smollm2();
    let plan_path = out.with_extension("plan.json");
    PlanFile::new(model.identity.clone(), plan.clone())
        .save(&plan_path)
        .unwrap();
    assert_cmd::Command::cargo_bin("scalpel")
        .unwrap()
        .args(["--model", common::smollm2_path().to_str().unwrap()])
        .args(["--plan", plan_path.to_str().unwrap()])
        .args(["export", "--format", "decilm", "--no-measure", "--out"])
        .arg(out)
        .assert()
        .success();
}

#[test]
fn decilm_export_reloads_with_the_plan_logits() {
    let model = smollm2_f64();
    let plan = plan_with_b_scales(model.n_layers());
    let work = common::scratch_dir();
    let out = work.path().join("smollm2-pruned");
    export_decilm(&plan, &out);

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "DeciLMForCausalLM");
    assert_eq!(config["model_type"], "nemotron-nas");
    assert!(config["auto_map"]["AutoModelForCausalLM"]
        .as_str()
        .unwrap()
        .ends_with("modeling_decilm.DeciLMForCausalLM"));
    let blocks = config["block_configs"].as_array().unwrap();
    assert_eq!(blocks.len(), 30);
    assert_eq!(blocks[15]["attention"]["no_op"], true);
    assert!(blocks[15]["attention"]["n_heads_in_group"].is_null());
    assert_eq!(blocks[20]["ffn"]["no_op"], true);
    assert!(blocks[20]["ffn"]["ffn_mult"].is_null());
    assert_eq!(blocks[0]["attention"]["n_heads_in_group"], 3);
    assert_eq!(blocks[0]["ffn"]["ffn_mult"], 4.0);
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("`attn.15`") && card.contains("`mlp.25`"),
        "{card}"
    );
    // The no-op blocks carry no weights in the folder.
    let st =
        unsafe { candle_core::safetensors::MmapedSafetensors::new(out.join("model.safetensors")) }
            .unwrap();
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    assert!(!names
        .iter()
        .any(|n| n.starts_with("model.layers.15.self_attn")));
    assert!(!names.iter().any(|n| n.starts_with("model.layers.20.mlp")));
    assert!(names
        .iter()
        .any(|n| n == "model.layers.20.self_attn.q_proj.weight"));

    let reloaded = load_f64(LocalModel::HfDir(out.clone()));
    assert_eq!(reloaded.implied_plan.skip, plan.skip);
    let ids = prompt_ids(model);
    assert_eq!(prompt_ids(&reloaded), ids, "tokenizer.json tokenizes alike");
    let want = logits(&model.transformer, &ids, &plan);
    let got = logits(&reloaded.transformer, &ids, &reloaded.implied_plan);
    let diff = common::max_abs_diff(&want, &got);
    eprintln!("decilm reload vs plan: max |Δlogit| = {diff:e}");
    // Measured: 5.7e-6.
    assert!(diff < 2e-5, "max |Δlogit| = {diff}");
}

#[test]
fn decilm_export_with_residual_scales_matches_the_folded_plan() {
    let model = smollm2_f64();
    let plan = plan_with_scales(model.n_layers());
    let work = common::scratch_dir();
    let out = work.path().join("smollm2-pruned-s");
    export_decilm(&plan, &out);
    let reloaded = load_f64(LocalModel::HfDir(out));
    let ids = prompt_ids(model);
    let folded = fold_transformer(&model.transformer, &plan).unwrap();
    let want = logits(&folded, &ids, &unscaled(&plan));
    let got = logits(&reloaded.transformer, &ids, &reloaded.implied_plan);
    let diff = common::max_abs_diff(&want, &got);
    eprintln!("decilm reload vs folded plan: max |Δlogit| = {diff:e}");
    // Measured: 5.7e-6.
    assert!(diff < 2e-5, "max |Δlogit| = {diff}");
    let scaled = logits(&model.transformer, &ids, &plan);
    let diff = common::max_abs_diff(&scaled, &got);
    eprintln!("decilm reload vs plan with scales: max |Δlogit| = {diff:e} (RMSNorm eps)");
    // Measured: 1.9e-3.
    assert!(diff < 5e-3, "max |Δlogit| = {diff}");
}
