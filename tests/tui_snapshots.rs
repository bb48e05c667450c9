//! Snapshot tests of every workbench screen, drawn with ratatui's
//! TestBackend from an `App` built out of plain data (no model).

mod common;

use std::time::{Duration, Instant};

use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::style::Color;
use ratatui::Terminal;

use scalpel::model::routing::{KvPolicy, RouteOn, RoutingSection, ROUTERS_ARTIFACT};
use scalpel::plan::{BlockId, LayerScales, Plan};
use scalpel::tui::app::View;
use scalpel::tui::app::{
    App, BlockScores, DraftStats, InputKind, JobKind, LaneName, LongJob, Mode, ModelInfo, Origin,
    Overlap, Quality, Record, Request, Side, Speed, Update,
};
use scalpel::tui::jobs::routing::{Cell, Decisions, RouteKey, RoutedTokens, RoutingState};
use scalpel::tui::jobs::{importance, prompt_run};
use scalpel::tui::{handler, keys, ui};

fn info() -> ModelInfo {
    common::workbench_info(common::smollm2_identity(), 30)
}

fn quality(ppl: f64, kl: f64, top1: f64) -> Quality {
    Quality {
        perplexity: ppl,
        kl,
        top1,
    }
}

fn speed(prefill: f64, decode: f64) -> Speed {
    Speed {
        base_prefill: 410.0,
        base_decode: 38.0,
        plan_prefill: prefill,
        plan_decode: decode,
        overlap: Overlap::default(),
    }
}

/// Deterministic importance: a smooth pattern with late attention cheap.
fn scores(app: &mut App) {
    for l in 0..30 {
        for (block, base) in [(BlockId::attn(l), 0.02), (BlockId::mlp(l), 0.08)] {
            let v = base + ((l * 7 + block.kind as usize * 3) % 11) as f64 * 0.01;
            app.apply(Update::job(importance::Scored {
                block,
                scores: BlockScores {
                    delta_loss: Some(v),
                    influence: Some(v / 3.0),
                },
            }));
        }
    }
}

/// A session in full swing: two user plans, a search trace, generation done.
fn busy_app() -> App {
    let now = Instant::now();
    let mut app = App::new(
        info(),
        Plan::base(),
        "Explain in two sentences why the sky is blue.".into(),
        now,
    );
    app.now = now;
    scores(&mut app);
    app.apply(Update::Baseline(quality(22.20, 0.0, 1.0)));
    let user = [
        (Plan::base(), quality(22.20, 0.0, 1.0), speed(410.0, 38.0)),
        (
            Plan::with_skips([BlockId::attn(25)]),
            quality(22.61, 0.021, 0.962),
            speed(421.0, 39.1),
        ),
        (
            Plan::with_skips([BlockId::attn(25), BlockId::attn(27)]),
            quality(23.48, 0.047, 0.931),
            speed(433.0, 40.6),
        ),
    ];
    let search = [
        (
            Plan::with_skips([BlockId::attn(20)]),
            quality(22.40, 0.012, 0.975),
        ),
        (
            Plan::with_skips([BlockId::attn(20), BlockId::attn(12)]),
            quality(22.90, 0.027, 0.955),
        ),
        (
            Plan::with_skips([BlockId::attn(20), BlockId::attn(12), BlockId::attn(16)]),
            quality(23.60, 0.044, 0.936),
        ),
    ];
    for (plan, q, s) in user.clone() {
        app.records.push(Record {
            plan,
            quality: Some(q),
            speed: Some(s),
            origin: Origin::User,
            speculative: None,
        });
    }
    for (plan, q) in search {
        app.records.push(Record {
            plan,
            quality: Some(q),
            speed: None,
            origin: Origin::Search,
            speculative: None,
        });
    }
    app.history = user.iter().map(|(p, _, _)| p.clone()).collect();
    app.at = 2;
    app.cursor = BlockId::attn(27);
    app.gen.plan_label = app.plan().describe();
    app.apply(Update::job(prompt_run::Text {
        side: Side::Base,
        text: "The sky appears blue because air molecules scatter short blue wavelengths \
               of sunlight more than red ones."
            .into(),
    }));
    app.apply(Update::job(prompt_run::Done {
        side: Side::Base,
        prefill_tps: 402.3,
        decode_tps: 37.9,
    }));
    app.apply(Update::job(prompt_run::Text {
        side: Side::Plan,
        text: "The sky is blue because sunlight is scattered by the air, and blue light \
               scatters most."
            .into(),
    }));
    app.apply(Update::job(prompt_run::Done {
        side: Side::Plan,
        prefill_tps: 431.0,
        decode_tps: 40.2,
    }));
    app
}

fn render(app: &App, w: u16, h: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
    terminal.draw(|f| ui::draw(f, app)).unwrap();
    terminal.backend().to_string()
}

#[test]
fn main_screen_80x24() {
    insta::assert_snapshot!(render(&busy_app(), 80, 24));
}

#[test]
fn main_screen_scales_up_to_140x45() {
    insta::assert_snapshot!(render(&busy_app(), 140, 45));
}

#[test]
fn first_frame_before_anything_is_measured() {
    let mut app = App::new(info(), Plan::base(), "Hello".into(), Instant::now());
    let reqs = app.start();
    assert_eq!(reqs, vec![Request::Evaluate(Plan::base())]);
    insta::assert_snapshot!(render(&app, 80, 24));
}

#[test]
fn evaluating_after_a_toggle() {
    let mut app = busy_app();
    app.cursor = BlockId::mlp(3);
    let reqs = handler::handle_key(&mut app, key(KeyCode::Char(' ')));
    let plan = app.plan().clone();
    assert_eq!(reqs, vec![Request::Evaluate(plan.clone())]);
    app.apply(Update::EvalProgress {
        plan,
        done: 1,
        total: 2,
    });
    insta::assert_snapshot!(render(&app, 80, 24));
}

#[test]
fn a_speed_measured_beside_another_job_is_marked() {
    let mut app = busy_app();
    app.at = 0;
    // The base timed alone while importance scoring ran: equal sides, marked.
    let speed = Speed::same_as_base(
        396.0,
        36.2,
        Overlap {
            importance: true,
            ..Default::default()
        },
    );
    app.apply(Update::Speed {
        plan: Plan::base(),
        speed,
    });
    let screen = render(&app, 80, 24);
    assert!(
        screen.contains("decode       36.2       36.2    ×1.00"),
        "{screen}"
    );
    assert!(
        screen.contains("⚠ importance running: not comparable"),
        "{screen}"
    );
    insta::assert_snapshot!(screen);
}

#[test]
fn search_running_with_progress_eta_and_loss() {
    let mut app = busy_app();
    let mut job = LongJob::new(JobKind::Search { k: 4 }, app.now - Duration::from_secs(30));
    job.done = 20;
    job.total = 60;
    job.loss = Some(2.9134);
    job.detail = "step 1/4".into();
    app.job = Some(job);
    insta::assert_snapshot!(render(&app, 80, 24));
}

#[test]
fn fitted_scales_are_marked() {
    let mut app = busy_app();
    let mut plan = app.plan().clone();
    let mut scales = vec![LayerScales::IDENTITY; 30];
    scales[26].b_mlp = 0.91;
    scales[27].s_att = 1.04;
    scales[27].b_att = 0.0;
    plan.scales = Some(scales);
    app.push_plan(plan);
    app.cursor = BlockId::attn(27);
    insta::assert_snapshot!(render(&app, 80, 24));
}

#[test]
fn help_popup() {
    let mut app = busy_app();
    handler::handle_key(&mut app, key(KeyCode::Char('?')));
    assert_eq!(app.mode, Mode::Help);
    insta::assert_snapshot!(render(&app, 80, 40));
}

#[test]
fn history_popup() {
    let mut app = busy_app();
    handler::handle_key(&mut app, key(KeyCode::Char('H')));
    handler::handle_key(&mut app, key(KeyCode::Up));
    insta::assert_snapshot!(render(&app, 80, 24));
    // Enter jumps to the selected plan.
    handler::handle_key(&mut app, key(KeyCode::Enter));
    assert_eq!(app.at, 1);
}

#[test]
fn save_prompt() {
    let mut app = busy_app();
    handler::handle_key(&mut app, key(KeyCode::Char('s')));
    assert!(matches!(
        app.mode,
        Mode::Input {
            kind: InputKind::SavePath,
            ..
        }
    ));
    insta::assert_snapshot!(render(&app, 80, 24));
}

#[test]
fn chart_against_measured_speed() {
    let mut app = busy_app();
    handler::handle_key(&mut app, key(KeyCode::Char('x')));
    handler::handle_key(&mut app, key(KeyCode::Char('y')));
    insta::assert_snapshot!(render(&app, 80, 24));
}

#[test]
fn too_small_terminal_gets_a_message() {
    insta::assert_snapshot!(render(&busy_app(), 60, 20));
}

#[test]
fn save_then_open_round_trips_through_the_prompt() {
    let dir = common::scratch_dir();
    // Every letter is text in a prompt, even those that are commands
    // outside it (`F` once started a fit from here).
    let path = dir.path().join("Fitted plan.json");
    let mut app = busy_app();
    handler::handle_key(&mut app, key(KeyCode::Char('s')));
    type_text(&mut app, &path.display().to_string());
    assert!(!app.status.as_ref().unwrap().error, "{:?}", app.status);
    assert!(path.exists(), "not saved to {}", path.display());
    let saved = app.plan().clone();
    app.clear_skips();
    handler::handle_key(&mut app, key(KeyCode::Char('o')));
    type_text(&mut app, &path.display().to_string());
    assert_eq!(app.plan(), &saved);
    // A missing file is a message, never a panic.
    handler::handle_key(&mut app, key(KeyCode::Char('o')));
    type_text(&mut app, "/no/such/plan.json");
    assert!(app.status.as_ref().unwrap().error);
}

fn key(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

/// Clears the open prompt, types `text` and presses Enter.
fn type_text(app: &mut App, text: &str) {
    handler::handle_key(
        app,
        KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL),
    );
    for c in text.chars() {
        handler::handle_key(app, key(KeyCode::Char(c)));
    }
    handler::handle_key(app, key(KeyCode::Enter));
}

/// `d` runs the plan as a draft: the right column is the full model's text
/// again, drafted tokens in green, with α, τ, the speed-up against the
/// plain run and whether the text is the same.
#[test]
fn draft_view_marks_drafted_tokens_and_checks_the_text() {
    let mut app = busy_app();
    let reqs = handler::handle_key(&mut app, key(KeyCode::Char('d')));
    assert_eq!(
        reqs.iter().map(|r| r.job_name()).collect::<Vec<_>>(),
        [Some("draft run".to_string())],
        "{reqs:?}"
    );
    let base = "The sky appears blue because air scatters blue light.";
    app.apply(Update::job(prompt_run::Text {
        side: Side::Base,
        text: base.into(),
    }));
    app.apply(Update::job(prompt_run::Done {
        side: Side::Base,
        prefill_tps: 402.3,
        decode_tps: 40.0,
    }));
    let words: Vec<&str> = base.split_inclusive(' ').collect();
    let pieces: Vec<(String, bool)> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i % 4 != 0))
        .collect();
    app.apply(Update::job(prompt_run::DraftText { pieces }));
    app.apply(Update::job(prompt_run::DraftDone {
        prefill_tps: 398.0,
        decode_tps: 50.0,
        stats: DraftStats {
            acceptance_rate: 0.75,
            mean_accepted: 2.5,
        },
        new_tokens: 10,
    }));
    let mut terminal = Terminal::new(TestBackend::new(140, 45)).unwrap();
    terminal.draw(|f| ui::draw(f, &app)).unwrap();
    let screen = terminal.backend().to_string();
    assert!(
        screen.contains("same text ✓ · α 75% · τ 2.50 · 1.25× plain"),
        "{screen}"
    );
    // "sky" (the second piece) was drafted: green; "The" was the verifier's.
    let buf = terminal.backend().buffer();
    let find = |word: &str| {
        let row = screen.lines().position(|l| l.contains("draft:")).unwrap() + 2;
        let line: Vec<char> = screen.lines().nth(row).unwrap().chars().collect();
        let col = (0..line.len())
            .rev()
            .find(|&i| line[i..].iter().collect::<String>().starts_with(word))
            .unwrap();
        buf[(col as u16, row as u16)].fg
    };
    assert_eq!(find("sky"), Color::Green);
    assert_ne!(find("The"), Color::Green);
    insta::assert_snapshot!(screen);
    // At 80×24 the verdict still shows: on the second line of the column,
    // or in the header when a job's progress line leaves only one.
    let small = render(&app, 80, 24);
    assert!(small.contains("same text ✓ · α 75%"), "{small}");
    app.job = Some(LongJob::new(JobKind::Importance, app.now));
    let smaller = render(&app, 80, 24);
    assert!(
        smaller.contains("draft: attn.25 attn.27 · same text ✓"),
        "{smaller}"
    );
}

/// What a key can change, as text: two apps in the same state print the same.
fn observe(app: &App, reqs: &[Request]) -> String {
    format!(
        "{:?} {:?} {:?} {:?} {:?} {:?} quit={} at={}/{} {:?} cancelling={:?} scroll={:?} {reqs:?}",
        app.view,
        app.mode,
        app.cursor,
        app.metric,
        app.chart_x,
        app.chart_y,
        app.quit,
        app.at,
        app.history.len(),
        app.status,
        app.job.as_ref().map(|j| j.cancelling),
        app.routing.as_ref().map(|r| r.scroll),
    )
}

/// A state in which every main-screen action has something to do.
fn ready_for(command: &keys::Command<keys::Action>, action: keys::Action) -> App {
    let mut app = busy_app();
    app.at = 1; // both undo and redo possible; one block skipped (F can fit)
    app.cursor = if action == keys::Action::Up {
        BlockId::mlp(5)
    } else {
        BlockId::attn(5)
    };
    if command.when == keys::When::JobRunning {
        app.job = Some(LongJob::new(JobKind::Importance, app.now));
    }
    if let keys::When::InView(view) = command.when {
        app.view = view;
    }
    if command.when == keys::When::InView(View::Routing) {
        app.routing = Some(routed_session());
    }
    app
}

/// A routed plan open with 40 routed tokens, scrolled to the middle (the
/// routing view's keys all have something to do).
fn routed_session() -> RoutingState {
    let section = RoutingSection {
        artifact: ROUTERS_ARTIFACT.into(),
        on: RouteOn::Both,
        capacity: 0.8,
        kv: KvPolicy::Write,
        threshold: 0.0,
    };
    let mut r = RoutingState::new("routed.json".into(), section, Plan::base());
    r.tokens = Some(RoutedTokens {
        key: RouteKey {
            path: "routed.json".into(),
            prompt: "old prompt".into(),
            continuation: String::new(),
        },
        pieces: (0..40).map(|i| format!("t{i}")).collect(),
        prompt_tokens: 40,
        decisions: Decisions {
            cells: vec![vec![Cell::Ran; 60]; 40],
            executed_fraction: 1.0,
            routed_share: 1.0,
        },
    });
    r.scroll = 16;
    r
}

#[test]
fn every_key_binding_is_handled_and_shown_in_help() {
    let mut help = busy_app();
    handler::handle_key(&mut help, key(KeyCode::Char('?')));
    // Tall enough for every line of the help.
    let help = render(&help, 80, 40);
    let mut bound = 0;
    for c in keys::main_commands() {
        assert!(
            help.contains(&format!("  {:<12}{}", c.keys, c.description)),
            "`{}` is not in the help:\n{help}",
            c.keys
        );
        for (_, k, _) in c.bar {
            assert!(
                c.keys.contains(k),
                "bar key `{k}` is not one of `{}`",
                c.keys
            );
        }
        assert!(
            !c.bindings.is_empty() || c.keys == "click",
            "`{}` binds no key",
            c.keys
        );
        for (k, action) in c.bindings {
            let g = k.glyph();
            assert!(
                c.keys.split_whitespace().any(|w| w.contains(&g)) || c.description.contains(&g),
                "key `{g}` of `{}` is not shown in its help line",
                c.keys
            );
            // The handler reaches this binding (no earlier one takes its key)...
            let (found, a) = keys::find(keys::main_commands(), &k.event()).unwrap();
            assert!(
                std::ptr::eq(found, c) && a == *action,
                "`{g}` is taken by `{}`",
                found.keys
            );
            // ...runs exactly the table's action, and that action does something.
            let mut by_key = ready_for(c, *action);
            let reqs = handler::handle_key(&mut by_key, k.event());
            let mut by_action = ready_for(c, *action);
            let expected = handler::run(&mut by_action, *action);
            let before = ready_for(c, *action);
            assert_eq!(
                observe(&by_key, &reqs),
                observe(&by_action, &expected),
                "`{g}`"
            );
            assert_ne!(
                observe(&by_key, &reqs),
                observe(&before, &[]),
                "`{g}` did nothing"
            );
            bound += 1;
        }
    }
    assert!(bound >= 30, "only {bound} keys bound");
}

#[test]
fn popup_and_prompt_keys_come_from_their_tables() {
    let mut app = busy_app();
    handler::handle_key(&mut app, key(KeyCode::Char('H')));
    let bar = ui::cmdbar::keys(&app);
    for c in keys::HISTORY {
        for (k, _) in c.bindings {
            let (found, _) = keys::find(keys::HISTORY, &k.event()).unwrap();
            assert!(std::ptr::eq(found, c), "`{}` shadowed", k.glyph());
        }
        for (_, k, name) in c.bar {
            assert!(bar.contains(&(*k, *name)), "{k} {name} not in {bar:?}");
        }
    }
    handler::handle_key(&mut app, key(KeyCode::Char('q')));
    assert_eq!(app.mode, Mode::Normal, "q closes the history list");

    handler::handle_key(&mut app, key(KeyCode::Char('e')));
    let screen = render(&app, 140, 24);
    for c in keys::INPUT {
        for (k, _) in c.bindings {
            let (found, _) = keys::find(keys::INPUT, &k.event()).unwrap();
            assert!(std::ptr::eq(found, c), "`{}` shadowed", k.glyph());
        }
        for (_, k, name) in c.bar {
            assert!(
                screen.contains(&format!("{k} {name}")),
                "{k} {name}:\n{screen}"
            );
        }
    }
    // In a prompt, `q` types; ^c still quits.
    handler::handle_key(&mut app, key(KeyCode::Char('q')));
    assert!(matches!(&app.mode, Mode::Input { text, .. } if text.ends_with('q')));
    handler::handle_key(&mut app, keys::FORCE_QUIT.event());
    assert!(app.quit);
}

#[test]
fn a_key_that_cannot_run_now_says_why() {
    let mut app = busy_app();
    handler::handle_key(&mut app, key(KeyCode::Esc));
    assert_eq!(
        app.status.as_ref().unwrap().text,
        "no background job to cancel"
    );
    app.job = Some(LongJob::new(JobKind::Importance, app.now));
    handler::handle_key(&mut app, key(KeyCode::Char('S')));
    assert_eq!(app.mode, Mode::Normal, "no K prompt while a job runs");
    assert!(app.status.as_ref().unwrap().error);
    let bar = ui::cmdbar::keys(&app);
    assert_eq!(bar[0], ("esc", "cancel job"));
    assert!(!bar.contains(&("S", "search")), "{bar:?}");
}

#[test]
fn a_crashed_job_becomes_a_message_and_the_screen_stays() {
    let mut app = busy_app();
    app.cursor = BlockId::mlp(3);
    handler::handle_key(&mut app, key(KeyCode::Char(' ')));
    assert!(render(&app, 80, 24).contains("evaluating…"));
    app.apply(Update::Crashed {
        lane: LaneName::Eval,
        message: "index out of bounds".into(),
    });
    let screen = render(&app, 80, 24);
    assert!(!screen.contains("evaluating…"), "{screen}");
    assert!(screen.contains("blocks · 3/60 skipped"), "{screen}");
    let status = app.status.clone().unwrap();
    assert!(
        status.error && status.text.contains("index out of bounds"),
        "{status:?}"
    );
    insta::assert_snapshot!(screen);

    // A search that crashes releases the plan it was locking.
    app.start_search(2);
    assert!(app.search_running());
    app.apply(Update::Crashed {
        lane: LaneName::Long,
        message: "boom".into(),
    });
    assert!(app.job.is_none());
    assert!(app
        .status
        .as_ref()
        .unwrap()
        .text
        .starts_with("search K=2 crashed: boom"));
    app.cursor = BlockId::mlp(7);
    assert_eq!(app.toggle_cursor().len(), 1, "the plan is editable again");

    // Generation: the running side says so instead of waiting forever.
    app.generate(false);
    app.apply(Update::Crashed {
        lane: LaneName::Gen,
        message: "boom".into(),
    });
    assert!(!app.gen.base.queued && !app.gen.plan.queued);
    assert_eq!(app.gen.plan.error.as_deref(), Some("crashed"));
}

/// Runs the current plan as a draft: plain decode `plain` tok/s, speculative `spec`.
fn draft_run(app: &mut App, plain: f64, spec: f64, alpha: f64) {
    handler::handle_key(app, key(KeyCode::Char('d')));
    app.apply(Update::job(prompt_run::Done {
        side: Side::Base,
        prefill_tps: 400.0,
        decode_tps: plain,
    }));
    app.apply(Update::job(prompt_run::DraftDone {
        prefill_tps: 390.0,
        decode_tps: spec,
        stats: DraftStats {
            acceptance_rate: alpha,
            mean_accepted: 1.0 + 3.0 * alpha,
        },
        new_tokens: 48,
    }));
}

#[test]
fn the_chart_offers_speculative_speed_up_once_a_draft_ran() {
    use scalpel::tui::app::ChartX;
    let mut app = busy_app();
    // No draft measured yet: x goes skipped → decode × → skipped.
    handler::handle_key(&mut app, key(KeyCode::Char('x')));
    handler::handle_key(&mut app, key(KeyCode::Char('x')));
    assert_eq!(app.chart_x, ChartX::BlocksSkipped);

    draft_run(&mut app, 40.0, 46.0, 0.8);
    app.at = 1;
    draft_run(&mut app, 40.0, 52.0, 0.9);
    let spec = |app: &App, at: usize| app.record(&app.history[at]).unwrap().speculative;
    let s = spec(&app, 1).unwrap();
    assert!((s.speedup - 1.3).abs() < 1e-12 && s.acceptance_rate == 0.9);
    assert!((spec(&app, 2).unwrap().speedup - 1.15).abs() < 1e-12);

    handler::handle_key(&mut app, key(KeyCode::Char('x')));
    handler::handle_key(&mut app, key(KeyCode::Char('x')));
    assert_eq!(app.chart_x, ChartX::SpeculativeSpeedup);
    let screen = render(&app, 80, 24);
    assert!(screen.contains("KL vs draft ×"), "{screen}");
    // The two drafted plans span the axis.
    assert!(
        screen.contains("×1.15") && screen.contains("×1.30"),
        "{screen}"
    );
    insta::assert_snapshot!(screen);
    handler::handle_key(&mut app, key(KeyCode::Char('x')));
    assert_eq!(app.chart_x, ChartX::BlocksSkipped);
}

/// A draft run whose texts are given: `plain` by the base model, `spec` by
/// the speculative run (they must match; a mismatch must show).
fn draft_run_with_text(app: &mut App, plain_tps: f64, spec_tps: f64, plain: &str, spec: &str) {
    handler::handle_key(app, key(KeyCode::Char('d')));
    app.apply(Update::job(prompt_run::Text {
        side: Side::Base,
        text: plain.into(),
    }));
    app.apply(Update::job(prompt_run::Done {
        side: Side::Base,
        prefill_tps: 400.0,
        decode_tps: plain_tps,
    }));
    let pieces: Vec<(String, bool)> = spec
        .split_inclusive(' ')
        .enumerate()
        .map(|(i, w)| (w.to_string(), i % 3 != 0))
        .collect();
    let n = pieces.len();
    app.apply(Update::job(prompt_run::DraftText { pieces }));
    app.apply(Update::job(prompt_run::DraftDone {
        prefill_tps: 390.0,
        decode_tps: spec_tps,
        stats: DraftStats {
            acceptance_rate: 0.6,
            mean_accepted: 2.2,
        },
        new_tokens: n,
    }));
}

/// `v` switches the main panel to the speculative view: every draft run of
/// the session with its measurements, a mismatch marked; the grid's keys
/// are then refused with the way back, and `v` again restores the grid.
#[test]
fn the_speculative_view_lists_this_sessions_draft_runs() {
    let mut app = busy_app();
    let empty = {
        let mut a = busy_app();
        handler::handle_key(&mut a, key(KeyCode::Char('v')));
        render(&a, 80, 24)
    };
    assert!(empty.contains("no draft runs yet"), "{empty}");

    let text = "The sky is blue because air scatters blue light most.";
    draft_run_with_text(&mut app, 40.0, 50.0, text, text);
    app.at = 1;
    draft_run_with_text(
        &mut app,
        40.0,
        46.0,
        text,
        "The sky is blue because of the sea.",
    );
    assert_eq!(app.draft_runs.len(), 2);
    assert!(app.draft_runs[0].identical && !app.draft_runs[1].identical);
    assert_eq!(app.draft_runs[0].new_tokens, 10);

    handler::handle_key(&mut app, key(KeyCode::Char('v')));
    assert_eq!(app.view, scalpel::tui::app::View::Speculative);
    let screen = render(&app, 80, 24);
    assert!(screen.contains("speculative view"), "{screen}");
    // Run 1 drafted with attn.25 attn.27; run 2 with attn.25, the current plan.
    let row = |n: usize| screen.lines().nth(n).unwrap().to_string();
    assert!(row(2).contains("   # draft plan"), "{screen}");
    assert!(
        row(3).contains(
            "   1 attn.25 attn.27                 10   60%  2.20   40.0   50.0  1.25×  ✓"
        ),
        "{screen}"
    );
    assert!(
        row(4).contains(
            "●  2 attn.25                          8   60%  2.20   40.0   46.0  1.15×  ✗"
        ),
        "{screen}"
    );
    assert!(
        screen.contains("identical output 1/2 (✗ differs: run 2) · mean τ 2.20 · best 1.25×"),
        "{screen}"
    );
    insta::assert_snapshot!(screen);

    // The grid's tools belong to its view.
    let bar = ui::cmdbar::keys(&app);
    assert!(
        !bar.contains(&("space", "skip")) && bar.contains(&("v", "view")),
        "{bar:?}"
    );
    let before = app.plan().clone();
    handler::handle_key(&mut app, key(KeyCode::Char(' ')));
    assert_eq!(app.plan(), &before, "space toggled a block out of sight");
    assert_eq!(
        app.status.as_ref().unwrap().text,
        "only in the blocks view; v switches"
    );

    // Nor does a click where the grid would be (row 3: attention, column 8: layer 1).
    let click = |kind| ratatui::crossterm::event::MouseEvent {
        kind,
        column: 8,
        row: 3,
        modifiers: KeyModifiers::NONE,
    };
    let right = ratatui::crossterm::event::MouseEventKind::Down(
        ratatui::crossterm::event::MouseButton::Right,
    );
    let screen_rect = ratatui::layout::Rect::new(0, 0, 80, 24);
    assert!(handler::handle_mouse(&mut app, click(right), screen_rect).is_empty());
    assert_eq!(app.plan(), &before, "a click toggled a block out of sight");

    // v cycles blocks → speculative → routing → KV → blocks.
    handler::handle_key(&mut app, key(KeyCode::Char('v')));
    assert_eq!(app.view, scalpel::tui::app::View::Routing);
    handler::handle_key(&mut app, key(KeyCode::Char('v')));
    assert_eq!(app.view, scalpel::tui::app::View::Kv);
    handler::handle_key(&mut app, key(KeyCode::Char('v')));
    let screen = render(&app, 80, 24);
    assert!(screen.contains("┌ blocks · 1/60 skipped"), "{screen}");
    // Back in the blocks view the same click skips attn.1.
    let reqs = handler::handle_mouse(&mut app, click(right), screen_rect);
    assert_eq!(reqs.len(), 1);
    assert!(app.plan().skips_attn(1), "{}", app.plan().describe());
    assert!(!screen.contains("speculative"), "{screen}");
}
