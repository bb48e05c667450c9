//! `scalpel report` renders: the HTML opened in headless Chromium (Debian's
//! `chromium`, installed by .ci/run) has the headline, the charts and the
//! table, the base is exactly 1.00×, and bad input is refused before any
//! measurement.

mod common;

use std::path::Path;
use std::process::Command;

use scalpel::plan::{BlockId, Plan, PlanFile};

fn chromium() -> &'static str {
    for name in ["chromium", "chromium-browser"] {
        if Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return name;
        }
    }
    panic!(
        "headless Chromium is not installed, so the report cannot be checked in a browser; \
         install it as .ci/run does: apt-get install -y chromium"
    );
}

fn save(dir: &Path, name: &str, plan: Plan) -> String {
    let path = dir.join(name);
    PlanFile::new(common::smollm2().identity.clone(), plan)
        .save(&path)
        .unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn the_report_renders_its_charts_in_a_browser() {
    let browser = chromium();
    let work = common::scratch_dir();
    let p2 = save(
        work.path(),
        "two-attn.json",
        Plan::with_skips([BlockId::attn(15), BlockId::attn(25)]),
    );
    let p4 = save(
        work.path(),
        "four-blocks.json",
        Plan::with_skips([
            BlockId::attn(15),
            BlockId::mlp(20),
            BlockId::attn(25),
            BlockId::mlp(25),
        ]),
    );
    let out = work.path().join("report.html");
    assert_cmd::Command::cargo_bin("scalpel")
        .unwrap()
        .args(["--model", common::smollm2_path().to_str().unwrap()])
        .args([
            "report",
            "--plans",
            &p2,
            &p4,
            "--max-windows",
            "1",
            "--runs",
            "1",
            "--out",
        ])
        .arg(&out)
        .assert()
        .success();
    // A point per plan (3) and a legend marker per method (base, by hand).
    for stem in ["quality-vs-blocks", "speed-vs-blocks", "quality-vs-speed"] {
        let svg = std::fs::read_to_string(work.path().join(format!("report-{stem}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.matches("<circle").count() == 5,
            "{stem}"
        );
    }
    let html = std::fs::read_to_string(&out).unwrap();
    assert!(
        !html.contains("<script") && !html.contains("src=\"http"),
        "self-contained"
    );
    // The base is the reference, exactly 1, not itself timed twice.
    let base_row = html
        .lines()
        .find(|l| l.starts_with("<tr") && l.contains("<td class=\"name\">base</td>"))
        .expect("a base row");
    assert_eq!(
        base_row
            .matches("1.000×<br><span class=\"spread\">1.000–1.000</span>")
            .count(),
        2,
        "prefill and decode speed-ups of the base: {base_row}"
    );
    // The charts' grid closes before the tables (they once flowed into it).
    assert!(
        html.contains("</figure>\n</div>\n<h2>Comparison</h2>"),
        "charts grid closed before the comparison"
    );
    // The headline names the recommendation and the model as given.
    assert!(html.contains("id=\"headline\""));
    assert!(
        html.contains("quality budget of +10% perplexity"),
        "recommendation"
    );
    let model_file = common::smollm2_path();
    let file_name = model_file.file_name().unwrap().to_string_lossy();
    assert!(html.contains(&format!("Trade-offs of pruning {file_name}")));

    let profile = common::scratch_dir();
    let run = |extra: &[&str]| {
        let o = Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(format!("file://{}", out.display()))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    // The DOM as the browser built it: three charts with a point per plan.
    let dom = run(&["--dump-dom"]);
    assert_eq!(dom.matches("class=\"chart\"").count(), 3, "{dom}");
    assert_eq!(
        dom.matches("<circle").count(),
        15,
        "3 charts × (base + 2 plans + 2 legend markers)"
    );
    for name in ["base", "two-attn", "four-blocks"] {
        assert!(dom.contains(name), "{name} missing");
    }
    assert!(dom.contains("id=\"comparison\"") && dom.contains("id=\"settings\""));
    assert!(dom.contains("id=\"headline\"") && dom.contains("id=\"reproduce\""));
    // And it paints: a screenshot is written and is not blank.
    let shot = work.path().join("shot.png");
    run(&[
        &format!("--screenshot={}", shot.display()),
        "--window-size=1400,1800",
    ]);
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
}

fn report_cmd(out: &Path, plans: &[&str], extra: &[&str]) -> assert_cmd::assert::Assert {
    let mut c = assert_cmd::Command::cargo_bin("scalpel").unwrap();
    c.args([
        "--model",
        common::smollm2_path().to_str().unwrap(),
        "report",
    ]);
    if !plans.is_empty() {
        c.arg("--plans").args(plans);
    }
    c.args(["--max-windows", "1"]);
    if !extra.contains(&"--runs") {
        c.args(["--runs", "1"]);
    }
    c.args(extra).arg("--out").arg(out).assert()
}

/// Nothing was measured: no per-plan result line was printed.
fn measured_nothing(stderr: &str) -> bool {
    !stderr.contains("scalpel: base: perplexity")
}

#[test]
fn bad_input_is_refused_before_any_measurement() {
    let work = common::scratch_dir();
    let plan = save(work.path(), "p.json", Plan::with_skips([BlockId::attn(3)]));
    let cases: Vec<(Vec<String>, Vec<&str>, std::path::PathBuf, &str)> = vec![
        (
            vec![plan.clone()],
            vec![],
            work.path().join("missing").join("r.html"),
            "does not exist",
        ),
        (
            vec![plan.clone()],
            vec!["--runs", "0"],
            work.path().join("r.html"),
            "--runs must be at least 1",
        ),
        (vec![], vec![], work.path().join("r.html"), "--plans"),
    ];
    for (plans, extra, out, want) in cases {
        let plans: Vec<&str> = plans.iter().map(String::as_str).collect();
        let a = report_cmd(&out, &plans, &extra).failure();
        let err = String::from_utf8_lossy(&a.get_output().stderr).into_owned();
        assert!(err.contains(want), "want `{want}` in: {err}");
        assert!(measured_nothing(&err), "{err}");
    }
    // A file that is not a plan, and a plan made for another model.
    let not_plan = work.path().join("notes.json");
    std::fs::write(&not_plan, "{\"hello\": 1}").unwrap();
    let tiny = common::load_tiny("llama");
    let other = work.path().join("other.json");
    PlanFile::new(tiny.identity.clone(), Plan::with_skips([BlockId::attn(1)]))
        .save(&other)
        .unwrap();
    // A plan whose section changes what it computes (a KV budget) is not
    // measured as if it were its skips alone.
    let kv = work.path().join("kv.json");
    let mut pf = PlanFile::new(
        common::smollm2().identity.clone(),
        Plan::with_skips([BlockId::attn(3)]),
    );
    pf.sections
        .set(
            scalpel::plan::KV_SECTION,
            &scalpel::plan::KvSection {
                policy: "quest:512".into(),
            },
        )
        .unwrap();
    pf.save(&kv).unwrap();
    for (p, want) in [
        (&not_plan, "not a scalpel plan"),
        (&other, "cannot use plan"),
        (
            &kv,
            "has a `kv` section, which `report` does not measure yet",
        ),
    ] {
        let a = report_cmd(
            &work.path().join("r.html"),
            &[&plan, p.to_str().unwrap()],
            &[],
        )
        .failure();
        let err = String::from_utf8_lossy(&a.get_output().stderr).into_owned();
        assert!(err.contains(want), "want `{want}` in: {err}");
        assert!(measured_nothing(&err), "{err}");
    }
    assert!(!work.path().join("r.html").exists());
    // The same plan is refused, not run without its policy, by a command
    // that does not carry out KV sections.
    let a = assert_cmd::Command::cargo_bin("scalpel")
        .unwrap()
        .args(["--model", common::smollm2_path().to_str().unwrap()])
        .args(["--plan", kv.to_str().unwrap(), "bench", "--runs", "1"])
        .assert()
        .failure();
    let err = String::from_utf8_lossy(&a.get_output().stderr).into_owned();
    assert!(
        err.contains("has a `kv` section, which this command does not measure yet"),
        "{err}"
    );
}
