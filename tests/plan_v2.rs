//! Plan file version 2: v1 files still load, sections this build does not
//! know are refused by name, artifacts are content-hashed safetensors files
//! beside the plan, and export refuses what its format cannot express.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use scalpel::plan::{BlockId, LayerScales, ModelIdentity, Plan, PlanFile, PLAN_VERSION};
use sha2::{Digest, Sha256};

fn identity() -> ModelIdentity {
    ModelIdentity {
        name: "m".into(),
        architecture: "llama".into(),
        n_layers: 2,
        content_hash: "abc".into(),
        shape: None,
    }
}

fn hex_sha256(path: &Path) -> String {
    Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn tensors() -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    HashMap::from([
        (
            "w".to_string(),
            Tensor::new(&[[1.5f32, -2.0, 0.25], [3.0, 4.0, -0.5]], &dev).unwrap(),
        ),
        (
            "bias".to_string(),
            Tensor::new(&[7.0f32, 8.0], &dev).unwrap(),
        ),
    ])
}

/// A plan with one artifact, saved as `dir/plan.json`.
fn plan_with_artifact(dir: &Path) -> (PlanFile, std::path::PathBuf) {
    let path = dir.join("plan.json");
    let mut pf = PlanFile::new(identity(), Plan::with_skips([BlockId::attn(1)]));
    pf.write_artifact(&path, "draft_head", &tensors(), Some("test tensors"))
        .unwrap();
    pf.save(&path).unwrap();
    (pf, path)
}

const V1_TEXT: &str = r#"{
  "format": "scalpel-plan",
  "version": 1,
  "model": {"name": "m", "architecture": "llama", "n_layers": 2, "content_hash": "abc"},
  "skip": ["attn.1", "mlp.0"],
  "scales": [
    {"b_att": 0.75, "s_att": 1.0, "b_mlp": 1.0, "s_mlp": 0.5},
    {"b_att": 1.0, "s_att": 0.9, "b_mlp": 1.25, "s_mlp": 1.0}
  ],
  "metrics": {"kl_to_base": 0.031},
  "provenance": {"tool": "scalpel 0.1.0", "command": "fit"}
}
"#;

#[test]
fn a_hand_written_v1_file_loads_identically_and_saves_as_v2() {
    let dir = common::scratch_dir();
    let v1 = dir.path().join("v1.json");
    std::fs::write(&v1, V1_TEXT).unwrap();
    let pf = PlanFile::load(&v1).unwrap();
    assert_eq!(pf.model, identity());
    assert_eq!(
        pf.plan.skip,
        BTreeSet::from([BlockId::attn(1), BlockId::mlp(0)])
    );
    let scales = pf.plan.scales.as_ref().unwrap();
    assert_eq!(
        scales[0],
        LayerScales {
            b_att: 0.75,
            s_att: 1.0,
            b_mlp: 1.0,
            s_mlp: 0.5
        }
    );
    assert_eq!(scales[1].b_mlp, 1.25);
    assert_eq!(pf.metrics["kl_to_base"], 0.031);
    assert_eq!(pf.provenance["command"], "fit");
    assert!(pf.sections.is_empty() && pf.artifacts.is_empty());
    assert!(pf.notes.is_empty(), "{:?}", pf.notes);
    assert_eq!(pf.version, PLAN_VERSION, "read as the current version");

    let v2 = dir.path().join("v2.json");
    pf.save(&v2).unwrap();
    let text = std::fs::read_to_string(&v2).unwrap();
    assert!(text.contains("\"version\": 2"), "{text}");
    let back = PlanFile::load(&v2).unwrap();
    assert_eq!(back.plan, pf.plan);
    assert_eq!(back.metrics, pf.metrics);
    assert_eq!(back.provenance, pf.provenance);
}

#[test]
fn a_v2_plan_with_an_artifact_round_trips_and_travels_with_the_plan() {
    let dir = common::scratch_dir();
    let (written, path) = plan_with_artifact(dir.path());
    let a = written.artifact("draft_head").unwrap().clone();
    assert_eq!(a.file, "plan.draft_head.safetensors");
    assert_eq!(a.tensors["w"], vec![2, 3]);
    assert_eq!(a.sha256, hex_sha256(&dir.path().join(&a.file)));

    let back = PlanFile::load(&path).unwrap();
    assert_eq!(back.artifacts, written.artifacts);
    let t = back.load_artifact("draft_head", &Device::Cpu).unwrap();
    for (name, want) in tensors() {
        let got = &t[&name];
        assert_eq!(got.dims(), want.dims(), "{name}");
        let (g, w): (Vec<f32>, Vec<f32>) = (
            got.flatten_all().unwrap().to_vec1().unwrap(),
            want.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(g, w, "{name}");
    }
    let err = back.load_artifact("nope", &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("has: draft_head"), "{err}");

    // Saved elsewhere, the plan takes its artifact along.
    let other = common::scratch_dir();
    let moved = other.path().join("moved.json");
    back.save(&moved).unwrap();
    let there = PlanFile::load(&moved).unwrap();
    assert!(there.load_artifact("draft_head", &Device::Cpu).is_ok());
    assert_eq!(
        hex_sha256(&other.path().join(&a.file)),
        a.sha256,
        "copied byte for byte"
    );
}

#[test]
fn a_missing_artifact_is_refused_naming_the_file() {
    let dir = common::scratch_dir();
    let (pf, path) = plan_with_artifact(dir.path());
    let file = dir.path().join(&pf.artifacts[0].file);
    std::fs::remove_file(&file).unwrap();
    let err = format!("{:#}", PlanFile::load(&path).unwrap_err());
    assert!(
        err.contains("plan artifact `draft_head`")
            && err.contains(&file.display().to_string())
            && err.contains("is missing")
            && err.contains(&pf.artifacts[0].sha256),
        "{err}"
    );
}

#[test]
fn a_changed_artifact_is_refused_with_both_hashes() {
    let dir = common::scratch_dir();
    let (pf, path) = plan_with_artifact(dir.path());
    let file = dir.path().join(&pf.artifacts[0].file);
    let mut bytes = std::fs::read(&file).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let actual = hex_sha256(&file);
    let err = format!("{:#}", PlanFile::load(&path).unwrap_err());
    assert!(
        err.contains(&file.display().to_string())
            && err.contains(&actual)
            && err.contains(&pf.artifacts[0].sha256),
        "{err}"
    );
    // The in-memory plan refuses it too, when the tensors are asked for.
    let mut pf = pf;
    let err = pf.load_artifact("draft_head", &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains(&actual), "{err}");
    // Writing the artifact again replaces the broken file and its entry.
    pf.write_artifact(&path, "draft_head", &tensors(), None)
        .unwrap();
    pf.save(&path).unwrap();
    assert_eq!(pf.artifacts.len(), 1);
    assert!(PlanFile::load(&path).is_ok());
}

#[test]
fn an_unknown_section_is_refused_by_name() {
    let text = V1_TEXT.replace("\"version\": 1", "\"version\": 2").replace(
        "\"metrics\"",
        "\"sections\": {\"foo\": {\"k\": 3}},\n  \"metrics\"",
    );
    let err = PlanFile::from_json(&text, "p.json")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plan section `foo` is not known by this scalpel")
            && err.contains("written by a newer scalpel or another tool")
            && err.starts_with("p.json"),
        "{err}"
    );
    // Nor can this build write one it could not read back.
    let mut pf = PlanFile::new(identity(), Plan::base());
    let err = pf.sections.set("foo", &3).unwrap_err().to_string();
    assert!(err.contains("plan section `foo` is not known"), "{err}");
}

#[test]
fn bad_files_are_refused_with_a_reason() {
    let cases = [
        (V1_TEXT.replace("\"version\": 1", "\"version\": 3"), "newer scalpel"),
        (V1_TEXT.replace("\"version\": 1", "\"version\": 0"), "no valid plan format version"),
        (
            V1_TEXT.replace("\"metrics\"", "\"sections\": [1],\n  \"metrics\""),
            "\"sections\" must be an object",
        ),
        (
            V1_TEXT.replace(
                "\"metrics\"",
                &format!(
                    "\"artifacts\": [{{\"name\": \"a\", \"file\": \"../x.safetensors\", \"sha256\": \"{}\"}}],\n  \"metrics\"",
                    "0".repeat(64)
                ),
            ),
            "inside the plan's folder",
        ),
        (
            V1_TEXT.replace(
                "\"metrics\"",
                "\"artifacts\": [{\"name\": \"a\", \"file\": \"a.safetensors\", \"sha256\": \"xyz\"}],\n  \"metrics\"",
            ),
            "not 64 lowercase hex",
        ),
        ("{\"format\": \"scalpel-plan\"".to_string(), "not valid JSON"),
    ];
    for (text, want) in cases {
        let err = format!("{:#}", PlanFile::from_json(&text, "p.json").unwrap_err());
        assert!(err.contains(want), "want `{want}` in: {err}");
    }
}

#[test]
fn an_old_restored_block_with_a_zero_output_scale_is_reset_on_load_and_said_so() {
    // attn.0 kept with b_att = 0 (an old workbench restore), attn.1 skipped with b_att = 0.
    let text = V1_TEXT
        .replace("\"b_att\": 0.75", "\"b_att\": 0.0")
        .replace(
            "\"skip\": [\"attn.1\", \"mlp.0\"]",
            "\"skip\": [\"attn.1\"]",
        )
        .replace(
            "\"b_att\": 1.0, \"s_att\": 0.9",
            "\"b_att\": 0.0, \"s_att\": 0.9",
        );
    let pf = PlanFile::from_json(&text, "old.json").unwrap();
    let s = pf.plan.scales.as_ref().unwrap();
    assert_eq!((s[0].b_att, s[1].b_att), (1.0, 1.0));
    assert_eq!(s[1].s_att, 0.9, "a skipped block's s_att stays");
    assert_eq!(pf.notes.len(), 1, "{:?}", pf.notes);
    assert!(
        pf.notes[0].contains("attn.0 is kept but its b_att was 0"),
        "{:?}",
        pf.notes
    );
}

/// A plan with a section, as another tool or a newer scalpel could write it
/// (read without `from_json`'s check, as a build that knows the section would).
fn plan_with_section(identity: ModelIdentity) -> PlanFile {
    let mut v = serde_json::to_value(PlanFile::new(identity, Plan::base())).unwrap();
    v["sections"] = serde_json::json!({"some_mode": {"budget": 4}});
    serde_json::from_value(v).unwrap()
}

#[test]
fn export_refuses_a_section_or_an_artifact_its_format_cannot_express() {
    use scalpel::export::{check_expressible, DECILM, GGUF, MERGEKIT};
    let pf = plan_with_section(identity());
    for target in [&DECILM, &GGUF, &MERGEKIT] {
        let err = check_expressible(&pf, target).unwrap_err().to_string();
        assert!(
            err.contains("plan section `some_mode`") && err.contains(target.format),
            "{err}"
        );
    }
    let dir = common::scratch_dir();
    let (with_artifact, _) = plan_with_artifact(dir.path());
    let err = check_expressible(&with_artifact, &GGUF)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plan artifact `draft_head`") && err.contains("gguf"),
        "{err}"
    );
    assert!(check_expressible(&PlanFile::new(identity(), Plan::base()), &GGUF).is_ok());
}

/// Through the command line, on the tiny llama: a v2 plan exports (mergekit:
/// the only format the tiny model's FFN width fits), the same plan with an
/// artifact is refused by name and leaves nothing behind.
#[test]
fn scalpel_export_takes_a_v2_plan_and_refuses_its_artifact() {
    let model = common::load_tiny("llama");
    let dir = common::scratch_dir();
    let path = dir.path().join("plan.json");
    let mut pf = PlanFile::new(
        model.identity.clone(),
        Plan::with_skips([BlockId::attn(1), BlockId::mlp(1)]),
    );
    pf.save(&path).unwrap();
    let export = |out: &Path| {
        assert_cmd::Command::cargo_bin("scalpel")
            .unwrap()
            .args(["--model", common::tiny_dir("llama").to_str().unwrap()])
            .args(["--plan", path.to_str().unwrap()])
            .args(["export", "--format", "mergekit", "--out"])
            .arg(out)
            .output()
            .unwrap()
    };
    let recipe = dir.path().join("ok.yaml");
    let ok = export(&recipe);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(std::fs::read_to_string(&recipe)
        .unwrap()
        .contains("passthrough"));

    pf.write_artifact(&path, "draft_head", &tensors(), None)
        .unwrap();
    pf.save(&path).unwrap();
    let out = dir.path().join("refused.yaml");
    let bad = export(&out);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        err.contains("plan artifact `draft_head`")
            && err.contains("mergekit")
            && !err.contains("panicked"),
        "{err}"
    );
    assert!(!out.exists());
}

/// A command reading an old plan whose kept block has `b_att = 0` says
/// that it reset the scale.
#[test]
fn a_command_says_when_it_resets_a_kept_blocks_zero_scale() {
    let model = common::load_tiny("llama");
    let dir = common::scratch_dir();
    let mut plan = Plan::with_skips([BlockId::attn(1), BlockId::mlp(1)]);
    let mut scales = vec![LayerScales::IDENTITY; model.n_layers()];
    scales[0].b_att = 0.0;
    plan.scales = Some(scales);
    let mut v = serde_json::to_value(PlanFile::new(model.identity.clone(), plan)).unwrap();
    v["version"] = 1.into();
    let path = dir.path().join("old.json");
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    let out = assert_cmd::Command::cargo_bin("scalpel")
        .unwrap()
        .args(["--model", common::tiny_dir("llama").to_str().unwrap()])
        .args(["--plan", path.to_str().unwrap()])
        .args(["export", "--format", "mergekit", "--out"])
        .arg(dir.path().join("r.yaml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("old.json: attn.0 is kept but its b_att was 0") && err.contains("reset to 1"),
        "{err}"
    );
}

/// The workbench's `o` opens a v1 plan with a kept zero `b_att` and a v2
/// plan with an artifact; the reset is in the status line.
#[test]
fn the_workbench_opens_v1_and_v2_plans_and_says_what_it_reset() {
    use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
    use scalpel::tui::app::{App, ModelInfo};
    use scalpel::tui::handler;

    let info = ModelInfo {
        identity: identity(),
        n_layers: 2,
        attn_params: 1,
        mlp_params: 1,
        head_params: 1,
        heldout: String::new(),
        calibration: String::new(),
        speed: String::new(),
        search_name: "search".into(),
    };
    let mut app = App::new(info, Plan::base(), String::new(), std::time::Instant::now());
    let open = |app: &mut App, path: &Path| {
        handler::handle_key(app, KeyEvent::new(KeyCode::Char('o'), KeyModifiers::NONE));
        handler::handle_key(
            app,
            KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL),
        );
        for c in path.display().to_string().chars() {
            handler::handle_key(app, KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE));
        }
        handler::handle_key(app, KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE));
        app.status.clone().unwrap()
    };
    let dir = common::scratch_dir();
    let old = dir.path().join("old.json");
    std::fs::write(&old, V1_TEXT.replace("\"b_att\": 0.75", "\"b_att\": 0.0")).unwrap();
    let status = open(&mut app, &old);
    assert!(
        !status.error && status.text.contains("attn.0 is kept but its b_att was 0"),
        "{}",
        status.text
    );
    assert_eq!(app.plan().scales_for(0).b_att, 1.0);

    let (_, v2) = plan_with_artifact(dir.path());
    let status = open(&mut app, &v2);
    assert!(!status.error, "{}", status.text);
    assert_eq!(app.plan(), &Plan::with_skips([BlockId::attn(1)]));
}
