//! SmolLM2 as a Hugging Face folder, read as transformers reads it: the
//! tokenizer files transformers wrote from the test GGUF
//! (tests/fixtures/make_smollm2_hf.py), with f32 weights dequantized from
//! the same GGUF by scalpel at test time, checked against transformers' ids,
//! its chat prompt and PyTorch's perplexity on those ids (shared/peers).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use candle_core::Device;
use scalpel::model::{LocalModel, Model, Resolved};
use scalpel::plan::Plan;

const HUB_ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
/// PyTorch f32 on transformers' 7,658 ids, windows of 512 (shared/peers/README.md).
const PYTORCH_PPL: f64 = 22.0475;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn expected() -> &'static serde_json::Value {
    static E: OnceLock<serde_json::Value> = OnceLock::new();
    E.get_or_init(|| common::read_json(fixture_dir().join("smollm2_hf_expected.json")))
}

fn transformers_ids() -> Vec<u32> {
    common::json_ints::<u32>(&expected()["ids"])
}

/// The scratch layout, built once per test binary:
/// `folder/` (the HF folder) and `hub/` (a hub cache whose snapshot links to
/// the folder's files, as the hub cache links to its blobs).
struct Layout {
    _scratch: tempfile::TempDir,
    folder: PathBuf,
    hub: PathBuf,
}

fn layout() -> &'static Layout {
    static L: OnceLock<Layout> = OnceLock::new();
    L.get_or_init(|| {
        let scratch = common::scratch_dir();
        let folder = scratch.path().join("SmolLM2-hf");
        write_folder(&folder);
        let hub = scratch.path().join("hub");
        let repo = hub.join("models--HuggingFaceTB--SmolLM2-135M-Instruct");
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            std::os::unix::fs::symlink(&path, snap.join(path.file_name().unwrap())).unwrap();
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123").unwrap();
        Layout {
            _scratch: scratch,
            folder,
            hub,
        }
    })
}

/// The fixture's tokenizer files and config, plus `model.safetensors`: the
/// test GGUF's weights dequantized to f32 under Hugging Face names.
fn write_folder(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(fixture_dir().join("smollm2-hf")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let gguf = Resolved {
        local: LocalModel::Gguf(common::smollm2_path()),
        origin: "test".into(),
    };
    let model = Model::load(&gguf, &Device::Cpu).expect("loading SmolLM2");
    let tensors = scalpel::export::decilm::folded_tensors(&model, &Plan::base()).unwrap();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}

fn load_folder() -> Model {
    let resolved = Resolved {
        local: LocalModel::HfDir(layout().folder.clone()),
        origin: "test".into(),
    };
    Model::load(&resolved, &Device::Cpu).expect("loading the HF folder")
}

fn eval_text() -> String {
    std::fs::read_to_string(common::shared_dir().join("peers/eval.txt")).unwrap()
}

/// `scalpel --offline --model HUB_ID ARGS` with the hub cache pointed at the layout.
fn scalpel_on_hub_id(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(["--offline", "--model", HUB_ID])
        .args(args)
        .env("HF_HUB_CACHE", &layout().hub)
        .env_remove("HF_HOME")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scalpel {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn folder_tokenizes_as_transformers_and_adds_no_bos() {
    let model = load_folder();
    let codec = model.codec().unwrap();
    let ids = codec.encode(&eval_text()).unwrap();
    let want = transformers_ids();
    assert_eq!(
        want.len(),
        7658,
        "the fixture holds transformers' 7,658 ids"
    );
    assert_eq!(ids, want);
    // SmolLM2's post-processor adds nothing, so neither does scalpel,
    // though config.json names a bos_token_id.
    assert_eq!(expected()["adds_special_tokens"], 0);
    assert_eq!(codec.prepended_special(), None);
    assert!(!model.cfg().add_bos, "a BOS would be added to every window");
}

#[test]
fn chat_prompt_is_the_one_transformers_renders() {
    let model = load_folder();
    let codec = model.codec().unwrap();
    let user = expected()["chat_user"].as_str().unwrap();
    let prompt = codec.chat_prompt(user).unwrap();
    assert_eq!(prompt, expected()["chat_prompt"].as_str().unwrap());
    let ids = codec.encode_with_specials(&prompt).unwrap();
    assert_eq!(
        ids,
        common::json_ints::<u32>(&expected()["chat_prompt_ids"])
    );
}

#[test]
fn hub_id_is_named_by_its_id_and_gives_pytorchs_perplexity() {
    let text = common::shared_dir().join("peers/eval.txt");
    let out = scalpel_on_hub_id(&[
        "eval",
        "--text",
        text.to_str().unwrap(),
        "--window",
        "512",
        "--no-base",
        "--json",
    ]);
    let r = stdout_json(&out);
    assert_eq!(r["model"]["name"], HUB_ID, "{r}");
    assert_eq!(r["tokens"], 7658, "transformers' ids, no BOS: {r}");
    assert_eq!(r["windows"], 15);
    let ppl = r["perplexity"].as_f64().unwrap();
    let rel = (ppl - PYTORCH_PPL).abs() / PYTORCH_PPL;
    eprintln!("HF folder perplexity {ppl:.6} vs PyTorch {PYTORCH_PPL} (rel {rel:.2e})");
    assert!(
        rel < 2e-5,
        "perplexity {ppl} vs PyTorch {PYTORCH_PPL} (rel {rel:.2e})"
    );
}

#[test]
fn generate_chat_works_on_the_hub_id() {
    let user = expected()["chat_user"].as_str().unwrap();
    let out = scalpel_on_hub_id(&["generate", "--chat", "--prompt", user, "-n", "3", "--json"]);
    let r = stdout_json(&out);
    let chat_ids = expected()["chat_prompt_ids"].as_array().unwrap().len();
    assert_eq!(r["prompt_tokens"], chat_ids, "{r}");
    assert_eq!(r["new_tokens"].as_array().unwrap().len(), 3, "{r}");
}
