//! Replays the fuzz corpora (`fuzz/`) through the same parse functions the
//! fuzz targets call, on stable Rust: every input must give Ok or an error,
//! never a panic. The seeds are valid files and must load; the saved crash
//! inputs were panics or huge allocations before their fixes and must now be
//! refused with an error.

#[path = "../fuzz/fuzz_targets/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};

type Parse = fn(&[u8]) -> anyhow::Result<()>;

const TARGETS: [(&str, Parse); 4] = [
    ("gguf", harness::gguf),
    ("safetensors", harness::safetensors),
    ("hf_config", harness::hf_config),
    ("plan", harness::plan),
];

fn files(sub: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(sub)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

#[test]
fn every_seed_loads() {
    for (target, parse) in TARGETS {
        let seeds = files("seeds", target);
        assert!(!seeds.is_empty(), "no seeds for {target}");
        for path in seeds {
            let data = std::fs::read(&path).unwrap();
            if let Err(e) = parse(&data) {
                panic!("{}: {e:#}", path.display());
            }
        }
    }
}

#[test]
fn every_corpus_input_parses_or_fails_cleanly() {
    for (target, parse) in TARGETS {
        let corpus = files("corpus", target);
        let (mut ok, mut err) = (0, 0);
        for path in &corpus {
            let data = std::fs::read(path).unwrap();
            match parse(&data) {
                Ok(()) => ok += 1,
                Err(_) => err += 1,
            }
        }
        eprintln!(
            "{target}: {} corpus inputs, {ok} load, {err} refused",
            corpus.len()
        );
    }
}

#[test]
fn every_crash_input_is_refused_with_an_error() {
    for (target, parse) in TARGETS {
        for path in files("artifacts", target) {
            let data = std::fs::read(&path).unwrap();
            let result = parse(&data);
            assert!(result.is_err(), "{} now loads", path.display());
            eprintln!("{}: {:#}", path.display(), result.unwrap_err());
        }
    }
}
