//! Bad input to `scalpel export`: one clear error, a non-zero exit, and no
//! partial file left behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use scalpel::plan::{BlockId, LayerScales, Plan, PlanFile};

fn scalpel() -> assert_cmd::Command {
    let mut c = assert_cmd::Command::cargo_bin("scalpel").unwrap();
    c.args(["--model", common::smollm2_path().to_str().unwrap()]);
    c
}

fn save_plan(dir: &Path, plan: Plan) -> PathBuf {
    let path = dir.join("plan.json");
    PlanFile::new(common::smollm2().identity.clone(), plan)
        .save(&path)
        .unwrap();
    path
}

fn small_plan() -> Plan {
    Plan::with_skips([BlockId::attn(15), BlockId::attn(25)])
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn stderr_of(a: &assert_cmd::assert::Assert) -> String {
    String::from_utf8_lossy(&a.get_output().stderr).into_owned()
}

#[test]
fn a_plan_for_another_model_is_refused() {
    let work = common::scratch_dir();
    let mut id = common::smollm2().identity.clone();
    id.content_hash = "0".repeat(64);
    // Other weights alone only warn; another layer count refuses.
    id.n_layers += 1;
    let plan_path = work.path().join("other.json");
    PlanFile::new(id, small_plan()).save(&plan_path).unwrap();
    let out = work.path().join("x.gguf");
    let a = scalpel()
        .args(["--plan", plan_path.to_str().unwrap()])
        .args(["export", "--format", "gguf", "--no-measure", "--out"])
        .arg(&out)
        .assert()
        .failure();
    let err = stderr_of(&a);
    assert!(
        err.contains("belongs to") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn an_existing_output_is_kept_unless_forced() {
    let work = common::scratch_dir();
    let plan = save_plan(work.path(), small_plan());
    let out = work.path().join("x.gguf");
    std::fs::write(&out, b"precious").unwrap();
    let a = scalpel()
        .args(["--plan", plan.to_str().unwrap()])
        .args(["export", "--format", "gguf", "--no-measure", "--out"])
        .arg(&out)
        .assert()
        .failure();
    assert!(
        stderr_of(&a).contains("already exists; pass --force"),
        "{}",
        stderr_of(&a)
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    scalpel()
        .args(["--plan", plan.to_str().unwrap()])
        .args([
            "export",
            "--format",
            "gguf",
            "--no-measure",
            "--force",
            "--out",
        ])
        .arg(&out)
        .assert()
        .success();
    assert!(std::fs::metadata(&out).unwrap().len() > 1_000_000);
    assert_eq!(entries(work.path()), ["plan.json", "x.gguf"]);
}

#[test]
fn an_unwritable_destination_is_a_clear_error() {
    let work = common::scratch_dir();
    let plan = save_plan(work.path(), small_plan());
    // A "folder" that is a file, and a kernel folder nobody may create files in
    // (root ignores permission bits, so a chmod-ed folder would not do).
    let not_a_dir = work.path().join("file");
    std::fs::write(&not_a_dir, b"").unwrap();
    for out in [
        not_a_dir.join("x.gguf"),
        PathBuf::from("/proc/scalpel-x.gguf"),
    ] {
        let a = scalpel()
            .args(["--plan", plan.to_str().unwrap()])
            .args(["export", "--format", "gguf", "--no-measure", "--out"])
            .arg(&out)
            .assert()
            .failure();
        let err = stderr_of(&a);
        assert!(err.contains("cannot create a file in"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert_eq!(entries(work.path()), ["file", "plan.json"]);
}

/// A small filesystem that fills up: a 4 MiB tmpfs where mounting is
/// allowed (root in CI), otherwise a 4 MiB file-size limit, which fails the
/// same write calls the same way.
fn run_on_full_disk(dir: &Path, args: &[&str]) -> (bool, String) {
    let bin = assert_cmd::cargo::cargo_bin("scalpel");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    let mut cmd = if mounted {
        Command::new(&bin)
    } else {
        let mut c = Command::new("bash");
        c.args(["-c", "trap '' XFSZ; ulimit -f 4096; exec \"$0\" \"$@\""])
            .arg(&bin);
        c
    };
    let out = cmd
        .args(["--model", common::smollm2_path().to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    let left = entries(dir);
    if mounted {
        Command::new("umount").arg(dir).status().unwrap();
    }
    assert!(left.is_empty(), "left behind: {left:?}");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_full_disk_leaves_no_partial_file() {
    let work = common::scratch_dir();
    let plan = save_plan(work.path(), small_plan());
    let full = work.path().join("full");
    std::fs::create_dir(&full).unwrap();
    let plan = plan.to_str().unwrap();
    for (format, name) in [("gguf", "x.gguf"), ("decilm", "pruned")] {
        let out = full.join(name);
        let (ok, err) = run_on_full_disk(
            &full,
            &[
                "--plan",
                plan,
                "export",
                "--format",
                format,
                "--no-measure",
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert!(
            !ok && err.contains("cannot write") && !err.contains("panicked"),
            "{format}: {err}"
        );
    }
}

#[test]
fn scales_that_cannot_fold_are_refused() {
    let work = common::scratch_dir();
    let mut plan = small_plan();
    let mut scales = vec![LayerScales::IDENTITY; 30];
    scales[7].s_att = -0.5;
    plan.scales = Some(scales);
    let plan = save_plan(work.path(), plan);
    let out = work.path().join("x");
    let a = scalpel()
        .args(["--plan", plan.to_str().unwrap()])
        .args(["export", "--format", "decilm", "--no-measure", "--out"])
        .arg(&out)
        .assert()
        .failure();
    let err = stderr_of(&a);
    assert!(
        err.contains("layer 7 has s_att = -0.5") && err.contains("positive"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn mergekit_writes_whole_layer_plans_and_refuses_single_blocks() {
    let work = common::scratch_dir();
    let out = work.path().join("recipe.yaml");
    let plan = save_plan(work.path(), small_plan());
    let a = scalpel()
        .args(["--plan", plan.to_str().unwrap()])
        .args([
            "export",
            "--format",
            "mergekit",
            "--base-model",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        ])
        .arg("--out")
        .arg(&out)
        .assert()
        .failure();
    let err = stderr_of(&a);
    assert!(
        err.contains("only drop whole layers") && err.contains("attn.15"),
        "{err}"
    );
    assert!(!out.exists());

    let whole = Plan::with_skips([
        BlockId::attn(20),
        BlockId::mlp(20),
        BlockId::attn(21),
        BlockId::mlp(21),
    ]);
    let plan = save_plan(work.path(), whole);
    scalpel()
        .args(["--plan", plan.to_str().unwrap()])
        .args([
            "export",
            "--format",
            "mergekit",
            "--base-model",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        ])
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let yaml = std::fs::read_to_string(&out).unwrap();
    assert!(yaml.contains("merge_method: passthrough"), "{yaml}");
    assert!(
        yaml.contains("layer_range: [0, 20]") && yaml.contains("layer_range: [22, 30]"),
        "{yaml}"
    );
}
