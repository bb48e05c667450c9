//! The workbench's KV view: the kept-keys map on the real model keeps what
//! each policy's definition says (a window its last B positions,
//! StreamingLLM its sinks and window, Quest B / page pages of the last
//! query with the sink page, a skipped attention layer nothing), the map
//! draws those cells at 80×24 and 120×40, the keys change the policy and
//! ask for a new map, `a` puts the policy in the saved plan's `kv` section,
//! and the long-context job measures what `eval --kv` measures.

mod common;

use std::time::Instant;

use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;

use scalpel::eval::data::DEFAULT_EVAL_TEXT;
use scalpel::eval::kv::{evaluate_kv_under, KvEvalOptions};
use scalpel::model::kv::KvSpec;
use scalpel::model::RunOptions;
use scalpel::plan::{BlockId, KvSection, Plan, PlanFile, KV_SECTION};
use scalpel::tui::app::{App, Request, View};
use scalpel::tui::jobs::kv::{
    kept_map, KeptMap, KvLongJob, KvMapJob, MapKey, Mapped, LONG_CONTEXT, MAP_CHUNK,
};
use scalpel::tui::jobs::Apply;
use scalpel::tui::ui::kv::{shade, NO_KV};
use scalpel::tui::{handler, plan_io, ui};

const RUN: RunOptions = RunOptions::QUANTIZED;

fn prompt_ids() -> Vec<u32> {
    let model = common::smollm2();
    let ids = model.codec().unwrap().encode(DEFAULT_EVAL_TEXT).unwrap();
    ids[..100].to_vec()
}

fn map(spec: &str, plan: &Plan) -> KeptMap {
    let model = common::smollm2();
    let spec: KvSpec = spec.parse().unwrap();
    kept_map(model, plan, &prompt_ids(), &spec, MAP_CHUNK, RUN).unwrap()
}

fn kept(layer: &[f32]) -> Vec<usize> {
    (0..layer.len()).filter(|&p| layer[p] > 0.0).collect()
}

#[test]
fn the_map_keeps_what_each_policy_says() {
    let mut plan = Plan::base();
    plan.toggle(BlockId::attn(3));
    let window = map("window:16", &plan);
    assert_eq!(window.tokens, 100);
    assert_eq!(window.layers[3], None, "a skipped attention holds no K/V");
    for (l, layer) in window.layers.iter().enumerate().filter(|(l, _)| *l != 3) {
        let layer = layer.as_ref().unwrap();
        assert_eq!(kept(layer), (84..100).collect::<Vec<_>>(), "layer {l}");
        assert!(layer[84..].iter().all(|&s| s == 1.0));
    }
    assert!(window.kv_bytes < window.full_kv_bytes / 4, "{window:?}");

    let streaming = map("streaming:16:4", &Plan::base());
    let want: Vec<usize> = (0..4).chain(88..100).collect();
    for layer in streaming.layers.iter().flatten() {
        assert_eq!(kept(layer), want);
    }

    // Quest: the last query's pages per KV head, the sink page among them.
    let quest = map("quest:32:16:2", &Plan::base());
    assert!(
        quest.kv_bytes > quest.full_kv_bytes,
        "Quest keeps every key and its pages"
    );
    // Its first two layers stay dense, as the reference leaves them.
    for layer in quest.layers[..2].iter().flatten() {
        assert!(layer.iter().all(|&s| s == 1.0));
    }
    for layer in quest.layers[2..].iter().flatten() {
        let share_kept: f32 = layer.iter().sum();
        // 3 KV heads, 2 pages of 16 each (the own page holds 100 − 96 = 4).
        assert!(layer[..16].iter().all(|&s| s == 1.0), "{layer:?}");
        assert!(layer[96..].iter().all(|&s| s == 1.0), "{layer:?}");
        assert!((share_kept - 20.0).abs() < 1e-4, "{share_kept}");
    }

    // SnapKV and H2O keep the budget per KV head (heads may differ).
    for spec in ["snapkv:32:8", "h2o:32"] {
        let m = map(spec, &Plan::base());
        for layer in m.layers.iter().flatten() {
            let per_head: f32 = layer.iter().sum();
            assert!((per_head - 32.0).abs() < 1e-3, "{spec}: {per_head}");
        }
    }
}

fn render(app: &App, w: u16, h: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
    terminal.draw(|f| ui::draw(f, app)).unwrap();
    terminal.backend().to_string()
}

fn app() -> App {
    let model = common::smollm2();
    let mut app = App::new(
        common::workbench_info(model.identity.clone(), model.n_layers()),
        Plan::base(),
        "Hello".into(),
        Instant::now(),
    );
    app.view = View::Kv;
    app
}

fn key(c: char) -> KeyEvent {
    KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE)
}

/// The map request for the app's policy on the prompt "Hello".
fn map_request(app: &App) -> Request {
    Request::run(KvMapJob {
        key: MapKey {
            spec: app.kv.spec(),
            plan: Plan::base(),
            prompt: "Hello".into(),
            continuation: String::new(),
        },
    })
}

/// The map's rows: (position range, cells), from the panel's inner text.
fn map_rows(screen: &str) -> Vec<(String, String)> {
    screen
        .lines()
        .filter_map(|l| {
            let inner: String = l.chars().skip(2).take_while(|c| *c != '│').collect();
            let (label, cells) = inner.split_at_checked(inner.char_indices().nth(10)?.0)?;
            let label = label.trim();
            let numeric = label.split('–').all(|n| n.parse::<usize>().is_ok());
            (label.contains('–') && numeric)
                .then(|| (label.to_string(), cells.trim_end().to_string()))
        })
        .collect()
}

#[test]
fn the_view_draws_the_map_at_80x24_and_120x40() {
    let mut app = app();
    let m = map("window:16", &Plan::base());
    let key = MapKey {
        spec: "window:16".parse().unwrap(),
        plan: Plan::base(),
        prompt: "Hello".into(),
        continuation: String::new(),
    };
    app.kv.pending = Some(key.clone());
    Box::new(Mapped {
        key,
        result: Ok(m.clone()),
    })
    .apply(&mut app);
    for (w, h) in [(80u16, 24u16), (120, 40)] {
        let screen = render(&app, w, h);
        let rows = map_rows(&screen);
        assert!(rows.len() >= 8, "{screen}");
        let (first, last) = (&rows[0], &rows[rows.len() - 1]);
        assert!(first.0.starts_with("0–"), "{screen}");
        assert!(last.0.ends_with("–99"), "{screen}");
        // 30 layers, a cell (1 or 2 columns) each: evicted, then kept by every head.
        assert!(first.1.chars().all(|c| c == shade(0.0)), "{screen}");
        assert!(last.1.chars().all(|c| c == shade(1.0)), "{screen}");
        assert!([30, 60].contains(&last.1.chars().count()), "{screen}");
        assert!(
            screen.contains("kept per layer and KV head: 16.0 of 100 keys"),
            "{screen}"
        );
        assert!(rows.iter().all(|r| !r.1.contains(NO_KV)), "{screen}");
    }
    // Too small a terminal: the message, not a garbled map.
    assert!(render(&app, 60, 15).contains("needs a bigger terminal"));
}

#[test]
fn keys_change_the_policy_attach_it_and_ask_for_measurements() {
    let mut app = app();
    assert_eq!(app.kv.spec().to_string(), "quest:32:16:2");
    let reqs = handler::handle_key(&mut app, key('t'));
    assert_eq!(app.kv.spec().name(), "streaming");
    assert!(
        reqs.contains(&map_request(&app)),
        "a new policy is mapped: {reqs:?}"
    );
    // Asked for already: the same key asks nothing more.
    assert!(app.refresh_kv_map().is_empty());
    handler::handle_key(&mut app, key('+'));
    assert_eq!(app.kv.spec().budget(), Some(64));
    for _ in 0..3 {
        handler::handle_key(&mut app, key('-'));
    }
    assert_eq!(app.kv.spec().budget(), Some(16), "the budget stops at 16");

    // Not attached: a saved plan has no kv section; attached: it has.
    assert!(plan_io::plan_file(&app).sections.is_empty());
    handler::handle_key(&mut app, key('a'));
    let file = plan_io::plan_file(&app);
    let section: KvSection = file.sections.get(KV_SECTION).unwrap().unwrap();
    assert_eq!(section.policy, app.kv.spec().to_string());
    let dir = common::scratch_dir();
    let path = dir.path().join("kv-plan.json");
    file.save(&path).unwrap();
    assert!(PlanFile::load(&path)
        .unwrap()
        .sections
        .get::<KvSection>(KV_SECTION)
        .unwrap()
        .is_some());

    let reqs = handler::handle_key(&mut app, key('L'));
    let long = Request::run(KvLongJob {
        spec: app.kv.spec(),
        plan: Plan::base(),
        context: LONG_CONTEXT,
    });
    assert_eq!(reqs, vec![long], "L measures at long context");

    // The view's keys belong to the view.
    app.view = View::Blocks;
    assert!(handler::handle_key(&mut app, key('t')).is_empty());
    assert!(app
        .status
        .as_ref()
        .unwrap()
        .text
        .contains("only in the KV view"));
}

/// The background measurement is `eval --kv` on the built-in text: the
/// same numbers as calling it directly (here at 512 tokens to stay quick).
#[test]
fn the_long_context_job_measures_what_eval_kv_measures() {
    let model = common::smollm2();
    let spec: KvSpec = "quest:128".parse().unwrap();
    let job = KvLongJob {
        spec: spec.clone(),
        plan: Plan::base(),
        context: 512,
    };
    let row = job.measure(model, None, |_, _| {}).unwrap();
    let mut ids = model.codec().unwrap().encode(DEFAULT_EVAL_TEXT).unwrap();
    ids.truncate(512);
    let opts = KvEvalOptions {
        context: 512,
        chunk: 256,
        recall: true,
        run: RunOptions::FAST,
        parallel_windows: false,
        cancel: None,
    };
    let want = evaluate_kv_under(model, &ids, &Plan::base(), &[spec], opts, |_, _| {}).unwrap();
    assert_eq!(row.perplexity, want.rows[0].perplexity);
    assert_eq!(row.kl, want.rows[0].kl_to_full);
    assert_eq!(row.recall, want.rows[0].attention_recall);
    assert_eq!(row.full_perplexity, want.full_perplexity);
    assert!(row.kl > 0.0 && row.recall.unwrap() < 1.0, "{row:?}");
    assert_eq!(row.scored_from, 128);

    // A cancel stops it between prefill chunks (a long context is one
    // window), instead of running to the end.
    let cancelled = std::sync::atomic::AtomicBool::new(true);
    let err = job.measure(model, Some(&cancelled), |_, _| {}).unwrap_err();
    assert_eq!(err.to_string(), "cancelled");
}
