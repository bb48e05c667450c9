//! Models that do not fit in memory as f32: the quantized-only load keeps
//! no dense copy of the quantized matrices, computes what the quantized
//! path computes today, and a load over the memory limit is refused with
//! the estimate and what to do, before anything is allocated.

mod common;

use std::process::Command;
use std::sync::atomic::AtomicBool;

use candle_core::quantized::QMatMul;
use candle_core::{Device, Tensor};
use scalpel::eval::{generate, perplexity};
use scalpel::model::{
    synthetic, KeepWeights, LoadOptions, LocalModel, Model, Resolved, RunOptions,
};
use scalpel::model::{Pass, Transformer};
use scalpel::plan::Plan;

fn quantized_only() -> Model {
    let resolved = Resolved {
        local: LocalModel::Gguf(common::smollm2_path()),
        origin: "test".into(),
    };
    let opts = LoadOptions {
        keep: KeepWeights::QuantizedOnly,
        ..LoadOptions::default()
    };
    Model::load_for(&resolved, &Device::Cpu, &opts).expect("quantized-only SmolLM2")
}

/// Runs scalpel with a memory limit and returns (success, stderr).
fn scalpel_with_limit(limit: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(args)
        .env("SCALPEL_OFFLINE", "1")
        .env("SCALPEL_MEMORY_LIMIT", limit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "panic for {args:?}: {stderr}");
    (out.status.success(), stderr)
}

/// Greedy decode logits of `prompt`, one token at a time, quantized matmuls.
fn decode_logits(t: &Transformer, prompt: &[u32]) -> Vec<Vec<f32>> {
    let base = Plan::base();
    let mut state = t.new_state(0);
    prompt
        .iter()
        .map(|&id| {
            let x = Tensor::new(&[id], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let mut pass = Pass::plan(&base, RunOptions::QUANTIZED).with_state(&mut state);
            let h = t.forward_hidden(&x, &mut pass).unwrap();
            let logits = t.logits(&h, RunOptions::QUANTIZED).unwrap();
            logits.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        })
        .collect()
}

#[test]
fn a_load_over_the_memory_limit_is_refused_with_the_estimate_and_what_to_do() {
    let gguf = common::smollm2_path().display().to_string();
    // SmolLM2 as f32 + its decode copies: ~1.4 GiB estimated; quantized-only ~0.8 GiB.
    let args = ["--model", &gguf, "eval", "--no-base", "--window", "64"];
    let (ok, err) = scalpel_with_limit("900M", &args);
    assert!(!ok, "expected a refusal: {err}");
    for want in [
        "needs about",
        "but only 900 MiB is available (SCALPEL_MEMORY_LIMIT=900M)",
        "use --weights quantized",
        "fits",
    ] {
        assert!(err.contains(want), "`{want}` not in: {err}");
    }
    // The advice holds: the same limit runs the quantized-only load.
    let text = common::scratch_dir();
    let path = text.path().join("t.txt");
    std::fs::write(
        &path,
        "The quick brown fox jumps over the lazy dog. ".repeat(20),
    )
    .unwrap();
    let p = path.display().to_string();
    let mut quant = args.to_vec();
    quant.extend(["--weights", "quantized", "--text", &p]);
    let (ok, err) = scalpel_with_limit("900M", &quant);
    assert!(ok, "quantized-only eval under 900M failed: {err}");
    // Far too little for either: no suggestion that cannot work.
    let (ok, err) = scalpel_with_limit("50M", &quant);
    assert!(
        !ok && err.contains("needs about") && !err.contains("fits)"),
        "{err}"
    );
}

#[test]
fn the_synthetic_8b_model_is_refused_as_f32_under_12g_and_told_to_use_quantized() {
    let args = ["bench", "--synthetic", "llama-8b", "--runs", "1"];
    let (ok, err) = scalpel_with_limit("12G", &args);
    assert!(!ok, "{err}");
    assert!(!err.contains("memory allocation"), "{err}");
    assert!(
        err.contains("synthetic llama-8b needs about")
            && err.contains("only 12.0 GiB is available")
            && err.contains("use --weights quantized")
            && err.contains(", fits)"),
        "{err}"
    );
}

#[test]
fn quantized_only_load_gives_todays_quantized_decode_logits_with_far_fewer_bytes() {
    let both = common::smollm2();
    let qonly = quantized_only();
    let r = common::read_json(common::shared_dir().join("reference/smollm2.json"));
    let prompt: Vec<u32> = common::json_ints::<u32>(&r["prompt_ids"]);
    let a = decode_logits(&both.transformer, &prompt);
    let b = decode_logits(&qonly.transformer, &prompt);
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| common::max_abs_diff(x, y))
        .fold(0f32, f32::max);
    // Same kernels on the same quantized tensors; token rows come from the
    // quantized embeddings, which dequantize to the f32 ones: exactly equal.
    assert_eq!(worst, 0.0, "max |Δlogit| {worst}");

    let cfg = both.cfg();
    let (attn, mlp) = cfg.block_params();
    // Tied embeddings: one vocab × hidden matrix.
    let params = cfg.vocab_size * cfg.hidden_size + cfg.n_layers * (attn + mlp);
    let f32_bytes = 4 * params;
    let (wa, wb) = (
        both.transformer.weight_bytes(),
        qonly.transformer.weight_bytes(),
    );
    // Today: f32 + Q8_0 copies (~4 + 1.06 bytes a weight); quantized-only ~1.06.
    assert!(wb * 4 < wa, "quantized-only {wb} B vs {wa} B");
    assert!(
        wb * 3 < f32_bytes,
        "quantized-only {wb} B vs f32 {f32_bytes} B"
    );
}

#[test]
fn dense_weight_of_a_quantized_only_linear_is_its_dequantized_tensor() {
    let qonly = quantized_only();
    let both = common::smollm2();
    let lin = &qonly.transformer.layers[3].mlp.down;
    assert!(
        lin.weight.is_none(),
        "a quantized-only load keeps no dense copy"
    );
    let Some(QMatMul::QTensor(q)) = &lin.quantized else {
        panic!("no quantized tensor")
    };
    let want = q.dequantize(&Device::Cpu).unwrap();
    let got = lin.dense_weight().unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got.dims(), want.dims());
    assert_eq!(flat(&got), flat(&want));
    // And close to the exact f32 weights (Q8_0 of Q4_1 levels).
    let exact = both.transformer.layers[3].mlp.down.dense_weight().unwrap();
    let diff = common::max_abs_diff(&flat(&got), &flat(&exact));
    // Measured 0.0092 on layer 3 (Q8_0 steps of the widest blocks).
    assert!(diff < 0.01, "max |Δw| {diff}");
}

#[test]
fn eval_and_generate_on_the_quantized_only_load_match_todays_quantized_path() {
    let both = common::smollm2();
    let qonly = quantized_only();
    let text = scalpel::commands::eval::DEFAULT_EVAL_TEXT;
    let ids = both.codec().unwrap().encode(text).unwrap();
    let ids = &ids[..ids.len().min(1024)];
    let opts = perplexity::EvalOptions {
        window: 256,
        compare_base: false,
        run: RunOptions::QUANTIZED,
        parallel_windows: false,
    };
    let ppl = |m: &Model| {
        perplexity::evaluate(
            m,
            ids,
            &Plan::base(),
            opts,
            &AtomicBool::new(false),
            |_, _| {},
        )
        .unwrap()
        .perplexity
    };
    let (pa, pb) = (ppl(both), ppl(&qonly));
    assert!((pa - pb).abs() / pa < 1e-5, "perplexity {pa} vs {pb}");

    let prompt = both.prompt_ids("The capital of France is", false).unwrap();
    let gen = |m: &Model| {
        let opts = generate::GenOptions {
            max_new_tokens: 16,
            temperature: 0.0,
            seed: 1,
            stop_at_eos: false,
            run: RunOptions::QUANTIZED,
        };
        generate::generate(m, &prompt, &Plan::base(), opts, |_| Ok(()))
            .unwrap()
            .new_tokens
    };
    assert_eq!(gen(both), gen(&qonly));
}

#[test]
fn a_quantized_synthetic_model_holds_q4_weights_only_and_decodes() {
    let m =
        synthetic::build_with("smollm2-135m", &Device::Cpu, KeepWeights::QuantizedOnly).unwrap();
    let t = &m.transformer;
    assert!(m.has_quantized && t.embed.is_none());
    assert!(t.layers.iter().all(|l| l.mlp.up.weight.is_none()));
    // 576-wide rows are Q4_0 (4.5 bits a weight), 1536-wide ones Q4_K (4.5 too).
    let cfg = m.cfg();
    let (attn, mlp) = cfg.block_params();
    let params = 2 * cfg.vocab_size * cfg.hidden_size + cfg.n_layers * (attn + mlp);
    let bits = t.weight_bytes() as f64 * 8.0 / params as f64;
    assert!((4.5..4.6).contains(&bits), "{bits} bits a weight");
    let logits = decode_logits(t, &[1, 2, 3]);
    assert!(logits.iter().flatten().all(|v| v.is_finite()));
    assert_eq!(logits[0].len(), cfg.vocab_size);
}
