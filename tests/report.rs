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
    // A KV budget on a plan that also skips is measured by no command (the
    // budget is measured on the full model), so it is refused, not run as
    // its skips alone.
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
    // Two modes in one plan: no command measures the combination.
    let both = work.path().join("both.json");
    let mut pf = PlanFile::new(common::smollm2().identity.clone(), Plan::base());
    pf.sections
        .set(
            scalpel::plan::KV_SECTION,
            &scalpel::plan::KvSection {
                policy: "window:64".into(),
            },
        )
        .unwrap();
    let model = common::smollm2();
    pf.sections
        .set(
            scalpel::surgery::sparsity::SPARSITY_SECTION,
            &scalpel::surgery::sparsity::SparsitySection {
                method: scalpel::surgery::sparsity::Method::Random,
                level: 0.25,
                split: "per-layer".into(),
                shape: scalpel::surgery::sparsity::Shape::of(model.cfg()),
                mask: Some(
                    scalpel::surgery::sparsity::UnitMask::from_scores(
                        &scalpel::surgery::sparsity::UnitScores::random(model, 1),
                        0.25,
                    )
                    .unwrap(),
                ),
                thresholds: None,
                artifact: None,
            },
        )
        .unwrap();
    pf.save(&both).unwrap();
    for (p, want) in [
        (&both, "combines a KV budget, sparsity or routing"),
        (&not_plan, "not a scalpel plan"),
        (&other, "cannot use plan"),
        (
            &kv,
            "has a `kv` section and also skips, rescales or trains blocks",
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

/// The comparison-table row of plan `name`.
fn table_row<'a>(html: &'a str, name: &str) -> &'a str {
    let cell = format!("<td class=\"name\">{name}</td>");
    html.lines()
        .find(|l| l.starts_with("<tr") && l.contains(&cell))
        .unwrap_or_else(|| panic!("no comparison row for {name}"))
}

/// The reproduce-table cell of plan `name` (its mode's facts).
fn facts_of<'a>(html: &'a str, name: &str) -> &'a str {
    let head = format!("<tr><th class=\"name\">{name}</th>");
    html.lines()
        .find(|l| l.starts_with(&head))
        .unwrap_or_else(|| panic!("no facts for {name}"))
}

/// The number right after `prefix` in `text`.
fn number_after(text: &str, prefix: &str) -> f64 {
    let at = text
        .find(prefix)
        .unwrap_or_else(|| panic!("`{prefix}` not in: {text}"))
        + prefix.len();
    let rest = &text[at..];
    let sign = usize::from(rest.starts_with(['-', '+']));
    let len = sign
        + rest[sign..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .count();
    let digits = &rest[..len];
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after `{prefix}` in: {text}"))
}

/// The cells (`<td>…</td>` contents) of a table row.
fn cells(row: &str) -> Vec<&str> {
    row.split("<td")
        .skip(1)
        .map(|c| {
            let c = &c[c.find('>').unwrap() + 1..];
            &c[..c.find("</td>").unwrap()]
        })
        .collect()
}

#[test]
fn plans_of_every_mode_are_measured_with_their_mode_and_name_its_facts() {
    use candle_core::Tensor;
    use rand::{Rng, SeedableRng};
    use scalpel::eval::kv::{evaluate_kv, KvEvalOptions};
    use scalpel::model::routing::{
        save_to_plan, KvPolicy, RouteOn, Router, Routers, RoutingSection, ROUTERS_ARTIFACT,
    };
    use scalpel::plan::{KvSection, KV_SECTION};
    use scalpel::surgery::routing::routed_blocks;
    use scalpel::surgery::sparsity::{
        ChannelThresholds, Criterion, Method, Shape, SparsitySection, UnitMask, UnitScores,
        SPARSITY_SECTION,
    };

    let model = common::smollm2();
    let work = common::scratch_dir();
    let dir = work.path();
    let with_section = |name: &str, plan: Plan, section: &str, value: &dyn erased::Section| {
        let path = dir.join(name);
        let mut pf = PlanFile::new(model.identity.clone(), plan);
        value.put(&mut pf, section);
        pf.save(&path).unwrap();
        path.to_string_lossy().into_owned()
    };
    // The default Hopscotch skips, also measured as a draft.
    let skips = save(
        dir,
        "attn4.json",
        Plan::with_skips([6, 7, 25, 28].map(BlockId::attn)),
    );
    // A KV budget well inside the 512-token context.
    let kv = with_section(
        "kv.json",
        Plan::base(),
        KV_SECTION,
        &KvSection {
            policy: "window:128".into(),
        },
    );
    // `sparsify --method random --level 0.25`'s mask (executed), and TEAL
    // thresholds (executed at decode).
    let shape = Shape::of(model.cfg());
    let sparse = with_section(
        "random25.json",
        Plan::base(),
        SPARSITY_SECTION,
        &SparsitySection {
            method: Method::Random,
            level: 0.25,
            split: "per-layer".into(),
            shape,
            mask: Some(UnitMask::from_scores(&UnitScores::random(model, 7), 0.25).unwrap()),
            thresholds: None,
            artifact: None,
        },
    );
    let teal = with_section(
        "teal.json",
        Plan::base(),
        SPARSITY_SECTION,
        &SparsitySection {
            method: Method::Teal,
            level: 0.3,
            split: "per-projection".into(),
            shape,
            mask: None,
            thresholds: Some(ChannelThresholds {
                criterion: Criterion::Teal,
                level: 0.3,
                layers: vec![[0.05; 7]; model.n_layers()],
            }),
            artifact: None,
        },
    );
    // Routers on every attention block with random weights and no bias:
    // some tokens run a block, others skip it.
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let h = model.cfg().hidden_size;
    let mut routers = Routers::default();
    for block in routed_blocks(model, &Plan::base(), RouteOn::Attn) {
        let w: Vec<f32> = (0..h).map(|_| rng.random_range(-0.05..=0.05)).collect();
        routers.by_block.insert(
            block,
            Router {
                w: Tensor::new(w.as_slice(), model.device()).unwrap(),
                b: Tensor::new(&[0f32], model.device()).unwrap(),
                hidden: None,
            },
        );
    }
    let routed = dir.join("routed.json");
    let mut pf = PlanFile::new(model.identity.clone(), Plan::base());
    let section = RoutingSection {
        artifact: ROUTERS_ARTIFACT.into(),
        on: RouteOn::Attn,
        capacity: 0.75,
        kv: KvPolicy::Write,
        threshold: 0.0,
    };
    save_to_plan(&mut pf, &routed, &routers, &section).unwrap();
    pf.save(&routed).unwrap();
    let routed = routed.to_string_lossy().into_owned();

    let out = dir.join("modes.html");
    let a = report_cmd(
        &out,
        &[&skips, &kv, &sparse, &teal, &routed],
        &["--speculative"],
    )
    .success();
    let stderr = String::from_utf8_lossy(&a.get_output().stderr).into_owned();
    let html = std::fs::read_to_string(&out).unwrap();
    let n_cells = cells(table_row(&html, "base")).len();
    for name in ["attn4", "kv", "random25", "teal", "routed"] {
        assert_eq!(cells(table_row(&html, name)).len(), n_cells, "{name}");
    }
    // Columns: plan, method, removes, blocks, perplexity, Δ, KL, top-1,
    // decode tok/s, decode ×, prefill tok/s, prefill ×, speed, draft, skips.
    let col = |name: &str, i: usize| cells(table_row(&html, name))[i].to_string();
    let kl = |name: &str| col(name, 6).parse::<f64>().unwrap();

    // KV: the budget, the context, and the quality measured with the policy
    // applied (the same numbers as `eval --kv` at that context).
    let kv_facts = facts_of(&html, "kv");
    assert!(
        kv_facts.contains("KV budget: window:128: 128 keys per layer"),
        "{kv_facts}"
    );
    let context = number_after(kv_facts, "quality measured at a ") as usize;
    let mut ids = model
        .codec()
        .unwrap()
        .encode(scalpel::eval::data::DEFAULT_EVAL_TEXT)
        .unwrap();
    ids.truncate(512 - usize::from(model.cfg().add_bos));
    assert_eq!(context, ids.len() + usize::from(model.cfg().add_bos));
    let direct = evaluate_kv(
        model,
        &ids,
        &["window:128".parse().unwrap()],
        KvEvalOptions {
            context,
            chunk: 256,
            recall: false,
            run: scalpel::model::RunOptions::FAST,
            parallel_windows: false,
            cancel: None,
        },
        |_, _| {},
    )
    .unwrap();
    let row = &direct.rows[0];
    assert_eq!(col("kv", 1), "KV budget");
    assert_eq!(col("kv", 4), format!("{:.3}", row.perplexity));
    assert_eq!(col("kv", 6), format!("{:.4}", row.kl_to_full));
    assert!(row.kl_to_full > 1e-3, "the budget changes the output");
    assert!(
        kv_facts.contains(&format!("(perplexity {:.3})", direct.full_perplexity)),
        "{kv_facts}"
    );
    assert!(
        col("kv", 5).contains("vs the full cache"),
        "{}",
        col("kv", 5)
    );
    assert!(
        col("kv", 12).starts_with("executed") && col("kv", 12).contains("vs the full cache"),
        "{}",
        col("kv", 12)
    );
    assert!(
        col("kv", 10).contains("not timed"),
        "KV prefill is not timed"
    );

    // Sparsity: method and level; the mask executed, TEAL executed at decode
    // by the sparse-input kernel.
    let sp = facts_of(&html, "random25");
    assert!(sp.contains("sparsity: random at level 0.25"), "{sp}");
    assert!(number_after(sp, "dropped: ") > 20.0, "{sp}");
    assert!(
        col("random25", 12).starts_with("executed") && col("random25", 12).contains("f32"),
        "{}",
        col("random25", 12)
    );
    assert!(kl("random25") > 0.0);
    let tf = facts_of(&html, "teal");
    assert!(tf.contains("sparsity: teal at level 0.3"), "{tf}");
    let zeroed = number_after(tf, "channels zeroed: ");
    assert!(zeroed > 1.0 && zeroed < 99.0, "{tf}");
    assert!(
        col("teal", 12).starts_with("executed") && tf.contains("sparse_input"),
        "{} | {tf}",
        col("teal", 12)
    );
    assert!(kl("teal") > 0.0);

    // Routing: the realised compute, which is also what the charts count.
    let rf = facts_of(&html, "routed");
    let executed = number_after(rf, "realised compute: ");
    assert!(executed > 50.0 && executed < 100.0, "{rf}");
    assert_eq!(col("routed", 1), "token routing");
    let removed = number_after(&col("routed", 3), "");
    assert!(
        (removed - (1.0 - executed / 100.0) * 60.0).abs() < 0.1,
        "{removed} blocks removed at {executed}% executed"
    );
    assert!(col("routed", 12).contains("vs the base, on the text"));
    assert!(rf.contains("timed against the unmodified model on the evaluation text"));

    // The skip plan as a draft: α, τ and a speed-up with its spread.
    assert!(html.contains("<th>as a draft (lossless speed-up)</th>"));
    let draft = col("attn4", 13);
    let alpha = number_after(&draft, "α ");
    let tau = number_after(&draft, "τ ");
    assert!(alpha > 0.0 && alpha <= 1.0, "{draft}");
    assert!((1.0..=5.0).contains(&tau), "{draft}");
    assert!(number_after(&draft, "") > 0.0, "{draft}");
    assert_eq!(col("kv", 13), "—", "only skip plans draft");
    let df = facts_of(&html, "attn4");
    assert!(
        df.contains("as a draft: α") && df.contains("speculate --prompt-set all"),
        "{df}"
    );

    // One colour and legend entry per method in every chart; every point
    // filled (all executed; `report/charts.rs` tests the hollow ones).
    for stem in ["quality-vs-blocks", "speed-vs-blocks", "quality-vs-speed"] {
        let svg = std::fs::read_to_string(dir.join(format!("modes-{stem}.svg"))).unwrap();
        for m in ["base", "by hand", "KV budget", "sparsity", "token routing"] {
            assert!(svg.contains(m), "{stem}: legend names {m}");
        }
        assert_eq!(svg.matches("<circle").count(), 6 + 5, "{stem}");
        assert!(
            !svg.split("<circle").skip(1).any(|c| c
                .split("/>")
                .next()
                .unwrap()
                .contains("fill=\"none\"")),
            "{stem}: no hollow (simulated) point"
        );
    }
    for name in ["kv", "random25", "teal", "routed"] {
        assert!(
            stderr.contains(&format!("scalpel: {name}: perplexity")),
            "{stderr}"
        );
    }
}

/// Sets a typed section on a plan file (so the test can list sections of
/// different types).
mod erased {
    use scalpel::plan::PlanFile;

    pub trait Section {
        fn put(&self, pf: &mut PlanFile, name: &str);
    }

    impl<T: serde::Serialize> Section for T {
        fn put(&self, pf: &mut PlanFile, name: &str) {
            pf.sections.set(name, self).unwrap();
        }
    }
}
