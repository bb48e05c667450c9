//! The llama.cpp `deci` GGUF export, judged by llama.cpp itself
//! (llama-cpp-python, installed by .ci/run): same perplexity as scalpel's
//! evaluation of the plan (within 1%), the skipped blocks' tensors absent
//! from the file (so llama.cpp neither reads nor computes them), and scalpel
//! loads the file back with the plan's skips. Its speed is a benchmark, not a
//! test: `.ci/bench-export-llamacpp` times both files interleaved.

mod common;
mod export_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;

use candle_core::Device;
use export_support::plan_with_scales;
use scalpel::eval::perplexity::{evaluate, EvalOptions};
use scalpel::export::gguf::ZERO_FFN_WIDTH;
use scalpel::model::{LocalModel, Model, Resolved, RunOptions};
use scalpel::plan::{BlockId, Plan, PlanFile};

/// Every tensor of a GGUF file: name to shape.
fn tensor_shapes(path: &Path) -> BTreeMap<String, Vec<usize>> {
    let mut file = std::fs::File::open(path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    content
        .tensor_infos
        .into_iter()
        .map(|(name, info)| (name, info.shape.dims().to_vec()))
        .collect()
}

/// The block a llama.cpp tensor name (`blk.N.attn_q.weight`) belongs to,
/// with its pre-block norm; `None` for embeddings and the final norm.
fn block_of(name: &str) -> Option<BlockId> {
    let (layer, tensor) = name.strip_prefix("blk.")?.split_once('.')?;
    let layer = layer.parse().ok()?;
    if tensor.starts_with("attn_") {
        Some(BlockId::attn(layer))
    } else if tensor.starts_with("ffn_") {
        Some(BlockId::mlp(layer))
    } else {
        None
    }
}

/// The skipped blocks' tensors are left out, except a skipped MLP written as
/// the all-zero FFN of width `ZERO_FFN_WIDTH` (see `export::gguf`); every
/// other tensor keeps its shape. Returns how many weights the file lost.
fn assert_skipped_tensors_left_out(plan: &Plan, pruned: &Path, base: &Path) -> usize {
    let pruned = tensor_shapes(pruned);
    let base = tensor_shapes(base);
    let mut removed = 0;
    for (name, shape) in &base {
        let skipped = block_of(name).is_some_and(|b| plan.is_skipped(b));
        match (skipped, pruned.get(name)) {
            (false, got) => assert_eq!(got, Some(shape), "{name} changed or went missing"),
            (true, None) => removed += shape.iter().product::<usize>(),
            (true, Some(got)) => {
                let zero_ffn = name.ends_with("ffn_norm.weight")
                    || got.contains(&ZERO_FFN_WIDTH) && !shape.contains(&ZERO_FFN_WIDTH);
                assert!(
                    zero_ffn,
                    "{name} of a skipped block is still in the file as {got:?}"
                );
                removed += shape.iter().product::<usize>() - got.iter().product::<usize>();
            }
        }
    }
    assert!(
        pruned.keys().all(|n| base.contains_key(n)),
        "the export added tensors"
    );
    removed
}

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
fn llama_cpp_runs_the_deci_gguf_with_the_plans_perplexity_without_the_skipped_tensors() {
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

    // What llama.cpp neither reads nor computes: two attention blocks
    // (4 projections and a norm each), layer 25's MLP with its norm, and all
    // but 256 columns of layer 20's MLP (kept as a zero FFN, its norm kept).
    let removed = assert_skipped_tensors_left_out(&plan, &gguf, &common::smollm2_path());
    let (d, kv, ffn) = (576, 192, 1536);
    let attention = 2 * d * d + 2 * d * kv;
    let mlps = (3 * d * ffn + d) + 3 * d * (ffn - ZERO_FFN_WIDTH);
    assert_eq!(removed, 2 * (attention + d) + mlps);

    // llama.cpp's number on the same ids and windows.
    let ids_path = work.path().join("ids.json");
    std::fs::write(&ids_path, serde_json::json!({ "ids": ids }).to_string()).unwrap();
    let result_path = work.path().join("llama.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/llamacpp_eval.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(["--ids", ids_path.to_str().unwrap(), "--window", "512"])
        .args(["--ppl", gguf.to_str().unwrap()])
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
    eprintln!(
        "perplexity: scalpel eval --plan {ours:.4}, llama.cpp on the deci GGUF {theirs:.4} \
         ({:.3}% apart)",
        rel * 100.0,
    );
    assert!(rel < 0.01, "llama.cpp {theirs} vs scalpel {ours}");

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
