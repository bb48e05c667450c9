//! Bad input gets one clear error and a non-zero exit, never a panic.

mod common;

use std::path::Path;
use std::process::Command;

use scalpel::plan::{BlockId, ModelIdentity, Plan, PlanFile};

/// Runs scalpel and returns stderr, asserting a clean failure.
fn fails(args: &[&str], expect: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(args)
        .env("SCALPEL_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "expected failure for {args:?}; stderr: {stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit code for {args:?}; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic for {args:?}: {stderr}");
    assert!(
        stderr.contains("error:"),
        "no error line for {args:?}: {stderr}"
    );
    assert!(
        stderr.to_lowercase().contains(&expect.to_lowercase()),
        "for {args:?} expected `{expect}` in: {stderr}"
    );
    stderr
}

fn gguf() -> String {
    common::smollm2_path().display().to_string()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

#[test]
fn truncated_gguf_is_reported_as_truncated() {
    let dir = common::scratch_dir();
    let bytes = std::fs::read(common::smollm2_path()).unwrap();
    let cut = write(dir.path(), "cut.gguf", &bytes[..bytes.len() / 2]);
    fails(&["--model", &cut, "info"], "truncated");
    let header_only = write(dir.path(), "head.gguf", &bytes[..4096]);
    fails(&["--model", &header_only, "info"], "not a readable GGUF");
}

#[test]
fn corrupt_gguf_is_refused() {
    let dir = common::scratch_dir();
    let junk: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let p = write(dir.path(), "junk.gguf", &junk);
    fails(&["--model", &p, "info"], "not a readable GGUF");
    // Right magic, garbage after it.
    let mut bad = b"GGUF\x03\x00\x00\x00".to_vec();
    bad.extend_from_slice(&junk);
    let p = write(dir.path(), "bad.gguf", &bad);
    fails(&["--model", &p, "info"], "not a readable GGUF");
}

fn copy_tiny(to: &Path) {
    let src = common::tiny_dir("llama");
    std::fs::create_dir_all(to).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), to.join(f)).unwrap();
    }
}

#[test]
fn truncated_or_corrupt_safetensors_is_refused() {
    let dir = common::scratch_dir();
    let m = dir.path().join("m");
    copy_tiny(&m);
    let st = m.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 3]).unwrap();
    fails(&["--model", m.to_str().unwrap(), "info"], "safetensors");
    std::fs::write(&st, b"not a safetensors file at all").unwrap();
    fails(&["--model", m.to_str().unwrap(), "info"], "safetensors");
}

#[test]
fn unknown_architecture_is_named() {
    let dir = common::scratch_dir();
    let m = dir.path().join("m");
    copy_tiny(&m);
    let cfg = std::fs::read_to_string(m.join("config.json"))
        .unwrap()
        .replace("LlamaForCausalLM", "GPTNeoXForCausalLM");
    std::fs::write(m.join("config.json"), cfg).unwrap();
    fails(
        &["--model", m.to_str().unwrap(), "info"],
        "unsupported architecture `gptneoxforcausallm`",
    );
}

#[test]
fn plan_for_another_model_is_refused_with_its_owner() {
    let dir = common::scratch_dir();
    let other = ModelIdentity {
        name: "tiny-llama".into(),
        architecture: "llama".into(),
        n_layers: 4,
        shape: None,
        content_hash: "0123456789abcdef".into(),
    };
    let plan = write(dir.path(), "p.json", b"");
    PlanFile::new(other, Plan::with_skips([BlockId::attn(1)]))
        .save(Path::new(&plan))
        .unwrap();
    fails(
        &["--model", &gguf(), "eval", "--plan", &plan],
        "belongs to tiny-llama",
    );
}

#[test]
fn plan_for_other_shapes_is_refused_naming_both_models() {
    let dir = common::scratch_dir();
    let tiny = common::load_tiny("llama");
    let mut shape = tiny
        .identity
        .shape
        .expect("a loaded model records its shapes");
    shape.intermediate_size *= 2;
    let other = ModelIdentity {
        name: "wider-llama".into(),
        shape: Some(shape),
        ..tiny.identity.clone()
    };
    let plan = write(dir.path(), "p.json", b"");
    PlanFile::new(other, Plan::with_skips([BlockId::attn(1)]))
        .save(Path::new(&plan))
        .unwrap();
    let out = dir.path().join("recipe.yaml");
    let model = common::tiny_dir("llama");
    let err = fails(
        &[
            "--model",
            model.to_str().unwrap(),
            "--plan",
            &plan,
            "export",
            "--format",
            "mergekit",
            "--out",
            out.to_str().unwrap(),
        ],
        "belongs to wider-llama",
    );
    assert!(err.contains(&tiny.identity.name), "{err}");
    assert!(err.contains("FFN 256") && err.contains("FFN 128"), "{err}");
    assert!(!out.exists());
}

#[test]
fn plan_naming_layer_99_is_refused() {
    fails(
        &["--model", &gguf(), "eval", "--skip", "attn.99"],
        "only 30 layers",
    );
    fails(
        &["--model", &gguf(), "eval", "--skip", "attn.x"],
        "not a layer number",
    );
}

#[test]
fn empty_and_short_texts_are_refused() {
    let dir = common::scratch_dir();
    let empty = write(dir.path(), "empty.txt", b"");
    fails(&["--model", &gguf(), "eval", "--text", &empty], "empty");
    let short = write(dir.path(), "short.txt", b"Just a few words of text.");
    fails(
        &["--model", &gguf(), "eval", "--text", &short],
        "fewer than one window",
    );
    fails(
        &[
            "--model",
            &gguf(),
            "eval",
            "--text",
            "/nonexistent/file.txt",
        ],
        "cannot read --text",
    );
}

#[test]
fn missing_model_and_offline_hub_miss_are_clear() {
    fails(
        &["--model", "/nonexistent/model.gguf", "info"],
        "neither an existing file",
    );
    let dir = common::scratch_dir();
    let out = Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(["--offline", "--model", "nobody/no-such-model", "info"])
        .env("HF_HOME", dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("not in the Hugging Face cache"), "{stderr}");
}

#[test]
fn hub_ids_load_from_the_hf_cache_offline() {
    // The hf-hub cache layout: models--org--name/{refs/main, snapshots/<rev>/...}.
    let home = common::scratch_dir();
    let repo = home.path().join("hub/models--test--tiny-llama");
    let snap = repo.join("snapshots/0123abcd");
    copy_tiny(&snap);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(["--offline", "--model", "test/tiny-llama", "info"])
        .env("HF_HOME", home.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("layers       4"), "{stdout}");
    assert!(
        stdout.contains("hub test/tiny-llama") || stdout.contains("origin"),
        "{stdout}"
    );
}
