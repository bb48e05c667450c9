//! The workbench's background worker on the real test model: what it
//! measures and sends, without a terminal.

mod common;

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use candle_core::Device;
use ratatui::backend::TestBackend;
use ratatui::Terminal;
use scalpel::model::{LocalModel, Model, Resolved};
use scalpel::plan::{BlockId, LayerScales, Plan};
use scalpel::tui::app::{App, Request, Speed, Update, View};
use scalpel::tui::jobs::Setup;
use scalpel::tui::worker::Worker;

/// Waits for the speed of `plan`, passing over everything else.
fn speed_of(rx: &mpsc::Receiver<Update>, plan: &Plan) -> Speed {
    loop {
        match rx.recv_timeout(Duration::from_secs(600)) {
            Ok(Update::Speed { plan: p, speed }) if &p == plan => return speed,
            Ok(Update::EvalFailed { plan: p, error }) if &p == plan => panic!("{error}"),
            Ok(Update::Crashed { message, .. }) => panic!("a job crashed: {message}"),
            Ok(_) => {}
            Err(e) => panic!("no speed for {}: {e}", plan.describe()),
        }
    }
}

fn smollm2() -> Model {
    let resolved = Resolved {
        local: LocalModel::Gguf(common::smollm2_path()),
        origin: "test".into(),
    };
    Model::load(&resolved, &Device::Cpu).expect("loading SmolLM2")
}

#[test]
fn plans_equal_to_the_base_show_the_base_speed_exactly() {
    let model = smollm2();
    let setup = Setup::for_model(&model).unwrap();
    let (tx, rx) = mpsc::channel();
    // The worker measures the base first on its own.
    let worker = Worker::spawn(Arc::new(model), Arc::new(setup), tx);
    let base = speed_of(&rx, &Plan::base());
    // Timed against itself it used to differ (×0.47 and ×2.06 were seen).
    assert_eq!(base.plan_decode, base.base_decode, "{base:?}");
    assert_eq!(base.plan_prefill, base.base_prefill, "{base:?}");
    assert!(base.base_decode > 0.0 && base.base_prefill > 0.0);

    // Scales that are all 1 compute the base model: not timed again.
    let mut identity = Plan::base();
    identity.scales = Some(vec![LayerScales::IDENTITY; 30]);
    worker.send(Request::Evaluate(identity.clone()));
    let same = speed_of(&rx, &identity);
    assert_eq!((same.decode_ratio(), same.prefill_ratio()), (1.0, 1.0));
    if base.overlap.is_clean() {
        assert_eq!(same, base, "the base's clean measurement is reused");
    }
    worker.shutdown();
}

/// `d` goes to the worker as a job behind the job interface; its results,
/// applied as they come, give the full model's greedy text back through
/// the draft and one measured entry in the speculative view.
#[test]
fn a_draft_run_through_the_job_interface_gives_the_plain_greedy_text() {
    let model = smollm2();
    let setup = Setup::for_model(&model).unwrap();
    let info = scalpel::tui::model_info(&model, &setup);
    let (tx, rx) = mpsc::channel();
    let worker = Worker::spawn(Arc::new(model), Arc::new(setup), tx);
    let mut app = App::new(
        info,
        Plan::base(),
        scalpel::tui::DEFAULT_PROMPT.into(),
        Instant::now(),
    );
    // The Hopscotch skip set on SmolLM2, without its scales.
    let draft = Plan::with_skips([6, 7, 25, 28].map(BlockId::attn));
    let _ = app.push_plan(draft.clone());
    let reqs = app.generate(true);
    assert_eq!(reqs[0].job_name().as_deref(), Some("draft run"));
    reqs.into_iter().for_each(|r| worker.send(r));
    let deadline = Instant::now() + Duration::from_secs(900);
    while app.draft_runs.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Update::Crashed { message, .. }) => panic!("a job crashed: {message}"),
            Ok(u) => drop(app.apply(u)),
            Err(e) => panic!("no draft run finished: {e}"),
        }
        if let Some(e) = app.gen.base.error.as_ref().or(app.gen.plan.error.as_ref()) {
            panic!("generation failed: {e}");
        }
    }
    // Importance, the long lane's job behind the same interface, started
    // with the worker: every block gets both scores (computed or cached).
    let complete = |app: &App| {
        app.importance.len() == 60
            && app
                .importance
                .values()
                .all(|b| b.delta_loss.is_some() && b.influence.is_some())
    };
    while !complete(&app) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Update::Crashed { message, .. }) => panic!("a job crashed: {message}"),
            Ok(Update::JobFailed(e)) => panic!("importance failed: {e}"),
            Ok(u) => drop(app.apply(u)),
            Err(e) => panic!("importance did not arrive: {e}"),
        }
    }
    worker.shutdown();
    let run = app.draft_runs[0].clone();
    assert_eq!(run.plan, draft);
    assert!(!app.gen.base.text.is_empty());
    assert_eq!(app.gen.plan.text, app.gen.base.text, "draft output differs");
    assert!(run.identical);
    assert!(run.new_tokens > 0 && run.new_tokens <= 48, "{run:?}");
    assert!((0.0..=1.0).contains(&run.stats.acceptance_rate), "{run:?}");
    assert!(run.stats.mean_accepted >= 1.0, "{run:?}");
    assert!(run.plain_decode.unwrap() > 0.0 && run.draft_decode > 0.0);
    // The marked pieces are the text, and the draft proposed some of them.
    assert!(app.gen.plan.pieces.iter().any(|(_, drafted)| *drafted));
    let speculative = app.record(&draft).unwrap().speculative.unwrap();
    assert_eq!(Some(speculative.speedup), run.speedup());
    eprintln!(
        "draft {}: {} tokens, α {:.2}, τ {:.2}, plain {:.1} tok/s, speculative {:.1} tok/s",
        draft.describe(),
        run.new_tokens,
        run.stats.acceptance_rate,
        run.stats.mean_accepted,
        run.plain_decode.unwrap(),
        run.draft_decode
    );

    app.view = View::Speculative;
    let mut terminal = Terminal::new(TestBackend::new(100, 30)).unwrap();
    terminal.draw(|f| scalpel::tui::ui::draw(f, &app)).unwrap();
    let screen = terminal.backend().to_string();
    assert!(screen.contains("identical output 1/1"), "{screen}");
    assert!(screen.contains("attn.6 attn.7 attn.25 attn.28"), "{screen}");
}
