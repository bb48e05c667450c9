//! `scalpel report` renders: the HTML opened in headless Chromium (Debian's
//! `chromium`, installed by .ci/run) has the charts and the table.

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
    for stem in ["quality-vs-blocks", "speed-vs-blocks", "quality-vs-speed"] {
        let svg = std::fs::read_to_string(work.path().join(format!("report-{stem}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.matches("<circle").count() == 3,
            "{stem}"
        );
    }
    let html = std::fs::read_to_string(&out).unwrap();
    assert!(
        !html.contains("<script") && !html.contains("src=\"http"),
        "self-contained"
    );

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
        9,
        "3 charts × (base + 2 plans)"
    );
    for name in ["base", "two-attn", "four-blocks"] {
        assert!(dom.contains(name), "{name} missing");
    }
    assert!(dom.contains("id=\"comparison\"") && dom.contains("id=\"settings\""));
    // And it paints: a screenshot is written and is not blank.
    let shot = work.path().join("shot.png");
    run(&[
        &format!("--screenshot={}", shot.display()),
        "--window-size=1400,1600",
    ]);
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
}
