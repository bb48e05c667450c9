//! The surgery commands on bad input: one clear error, non-zero exit, no panic.

mod common;

use assert_cmd::Command;
use predicates::prelude::PredicateBooleanExt;
use predicates::str::contains;

fn scalpel() -> Command {
    let mut c = Command::cargo_bin("scalpel").unwrap();
    c.arg("--model").arg(common::smollm2_path());
    c
}

#[test]
fn bad_inputs_give_one_clear_error() {
    let dir = common::scratch_dir();
    // --blocks larger than the number of layers.
    scalpel()
        .args(["search", "--blocks", "31"])
        .arg("--out")
        .arg(dir.path().join("s.json"))
        .assert()
        .failure()
        .stderr(contains("more than the model's 30"))
        .stderr(contains("panicked").not());
    scalpel()
        .args(["compare", "--blocks", "1..40"])
        .assert()
        .failure()
        .stderr(contains("more than"));

    // A calibration file with no usable text.
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "   \n\n").unwrap();
    scalpel()
        .arg("importance")
        .arg("--calib")
        .arg(&empty)
        .assert()
        .failure()
        .stderr(contains("no usable text"));

    // A plan made for another model.
    let plan = dir.path().join("other.json");
    std::fs::write(
        &plan,
        r#"{"format":"scalpel-plan","version":1,"model":{"name":"other","architecture":"llama",
            "n_layers":24,"content_hash":"0000"},"skip":["attn.3"]}"#,
    )
    .unwrap();
    scalpel()
        .arg("fit")
        .arg("--plan")
        .arg(&plan)
        .assert()
        .failure()
        .stderr(contains("belongs to other"));
    // Commands that take no --plan / --skip refuse them instead of
    // reporting numbers for the model without them.
    for (args, hint) in [
        (&["compare", "--blocks", "2"][..], "--routing / --replace"),
        (
            &["search", "--blocks", "2", "--out", "s.json"][..],
            "drop --plan",
        ),
        (
            &["route", "--capacity", "0.8", "--out", "r.json"][..],
            "--base-plan",
        ),
    ] {
        scalpel()
            .args(["--skip", "attn.3"])
            .args(args)
            .assert()
            .failure()
            .stderr(contains("does not run under --plan / --skip"))
            .stderr(contains(hint));
    }
    // Resume without a checkpoint.
    scalpel()
        .args(["search", "--blocks", "2", "--resume"])
        .arg("--out")
        .arg(dir.path().join("none.json"))
        .assert()
        .failure()
        .stderr(contains("does not exist"));
}
