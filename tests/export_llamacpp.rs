//! The llama.cpp `deci` GGUF export, judged by llama.cpp itself
//! (llama-cpp-python, installed by .ci/run): same perplexity as scalpel's
//! evaluation of the plan (within 1%), faster than the unpruned GGUF, and
//! scalpel loads the file back with the plan's skips.

mod common;
mod export_support;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;

use candle_core::Device;
use export_support::plan_with_scales;
use scalpel::eval::perplexity::{evaluate, EvalOptions};
use scalpel::model::{LocalModel, Model, Resolved, RunOptions};
use scalpel::plan::PlanFile;

/// Fails (never skips) when llama-cpp-python is missing.
fn require_llama_cpp() {
    let ok = Command::new("python3")
        .args(["-c", "import llama_cpp"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "llama-cpp-python is not installed, so llama.cpp cannot judge the export. Install it as \
         .ci/run does: CMAKE_ARGS=\"-DGGML_NATIVE=ON ...\" python3 -m pip install llama-cpp-python"
    );
}

fn export_gguf(plan_path: &Path, out: &Path) {
    assert_cmd::Command::cargo_bin("scalpel")
        .unwrap()
        .args(["--model", common::smollm2_path().to_str().unwrap()])
        .args(["--plan", plan_path.to_str().unwrap()])
        .args(["export", "--format", "gguf", "--no-measure", "--out"])
        .arg(out)
        .assert()
        .success();
}

#[test]
fn llama_cpp_runs_the_deci_gguf_with_the_plans_perplexity_and_faster() {
    require_llama_cpp();
    let model = common::smollm2();
    let plan = plan_with_scales(model.n_layers());
    let work = common::scratch_dir();
    let plan_path = work.path().join("plan.json");
    PlanFile::new(model.identity.clone(), plan.clone())
        .save(&plan_path)
        .unwrap();
    let gguf = work.path().join("pruned.gguf");
    export_gguf(&plan_path, &gguf);

    // scalpel's own number: the plan with scales on the source model.
    let text = scalpel::commands::eval::DEFAULT_EVAL_TEXT;
    let ids = model.codec().unwrap().encode(text).unwrap();
    let opts = EvalOptions {
        window: 512,
        compare_base: false,
        run: RunOptions::FAST,
        parallel_windows: true,
    };
    let ours = evaluate(model, &ids, &plan, opts, &AtomicBool::new(false), |_, _| {})
        .unwrap()
        .perplexity;

    // llama.cpp's number on the same ids and windows, and the timing.
    let ids_path = work.path().join("ids.json");
    std::fs::write(&ids_path, serde_json::json!({ "ids": ids }).to_string()).unwrap();
    let result_path = work.path().join("llama.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/llamacpp_eval.py");
    let base = common::smollm2_path();
    let out = Command::new("python3")
        .arg(&script)
        .args(["--ids", ids_path.to_str().unwrap(), "--window", "512"])
        .args(["--ppl", gguf.to_str().unwrap()])
        .args(["--time", gguf.to_str().unwrap(), base.to_str().unwrap()])
        .args(["--out", result_path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "llama.cpp evaluation failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = common::read_json(result_path);
    let theirs = r["ppl"].as_f64().unwrap();
    assert_eq!(
        r["windows"].as_u64().unwrap() as usize,
        ids.len().div_ceil(512)
    );
    let rel = (theirs / ours - 1.0).abs();
    let t_pruned = r["prefill_best_s"][gguf.to_str().unwrap()]
        .as_f64()
        .unwrap();
    let t_base = r["prefill_best_s"][base.to_str().unwrap()]
        .as_f64()
        .unwrap();
    eprintln!(
        "perplexity: scalpel eval --plan {ours:.4}, llama.cpp on the deci GGUF {theirs:.4} \
         ({:.3}% apart); llama.cpp 512-token prefill best of 7: pruned {:.1} ms, unpruned {:.1} ms \
         ({:.3}× faster)",
        rel * 100.0,
        t_pruned * 1e3,
        t_base * 1e3,
        t_base / t_pruned
    );
    assert!(rel < 0.01, "llama.cpp {theirs} vs scalpel {ours}");
    assert!(
        t_pruned < t_base,
        "the pruned GGUF ({t_pruned}s) is not faster than the unpruned one ({t_base}s)"
    );

    // scalpel reads its own export back: the skips come back as the implied plan.
    let reloaded = Model::load(
        &Resolved {
            local: LocalModel::Gguf(gguf.clone()),
            origin: "test".into(),
        },
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(reloaded.implied_plan.skip, plan.skip);
    let back = evaluate(
        &reloaded,
        &ids,
        &reloaded.implied_plan,
        opts,
        &AtomicBool::new(false),
        |_, _| {},
    )
    .unwrap()
    .perplexity;
    eprintln!("scalpel on its own deci GGUF: {back:.4}");
    assert!((back / ours - 1.0).abs() < 0.01, "{back} vs {ours}");
}
