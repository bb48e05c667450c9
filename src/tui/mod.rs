//! The workbench: a terminal UI where a person explores redundancy live.
//! `app` is the state (plain data), `keys` declares every key binding,
//! `handler` turns keys into changes,
//! `ui` draws, `worker` runs the model on background threads, `jobs` says
//! what each job computes, `autosave` keeps the session on disk.

pub mod app;
pub mod autosave;
pub mod event;
pub mod handler;
pub mod jobs;
pub mod keys;
pub mod plan_io;
pub mod ui;
pub mod worker;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::model::Model;
use crate::plan::Plan;
use crate::setup::{self, ModelSource, PlanSource};
use app::{App, ModelInfo};
use autosave::Autosave;

pub const DEFAULT_PROMPT: &str = "Explain in two sentences why the sky is blue.";

/// What the panels show about the model and the measuring setup.
pub fn model_info(model: &Model, setup: &jobs::Setup) -> ModelInfo {
    let cfg = model.cfg();
    let (attn_params, mlp_params) = cfg.block_params();
    ModelInfo {
        identity: model.identity.clone(),
        n_layers: model.n_layers(),
        attn_params,
        mlp_params,
        head_params: cfg.vocab_size * cfg.hidden_size,
        heldout: setup.describe_heldout(),
        calibration: setup.describe_calibration(),
        speed: setup.describe_speed(),
        search_name: jobs::search::NAME.into(),
    }
}

/// Opens the workbench on the model, with the given plan (if any) as the first plan.
pub fn run(msource: &ModelSource, psource: &PlanSource) -> Result<()> {
    // Before anything starts rayon's pool.
    event::lower_compute_priority();
    let model = setup::load_model(msource)?;
    let (plan, file) = setup::load_plan_honouring(psource, &model, plan_io::HONOURED)?;
    let routing = match &file {
        Some(f) => jobs::routing::section_of(f)?,
        None => None,
    };
    let kv = match &file {
        Some(f) => f
            .sections
            .get::<crate::plan::KvSection>(crate::plan::KV_SECTION)?,
        None => None,
    };
    let setup = jobs::Setup::for_model(&model)?;
    let mut app = App::new(
        model_info(&model, &setup),
        Plan::base(),
        DEFAULT_PROMPT.into(),
        Instant::now(),
    );
    let mut autosave = Autosave::new(&autosave::session_dir(), &model.identity.content_hash);
    match autosave.restore(&mut app) {
        Ok(0) => {}
        Ok(n) => app.set_status(format!("restored the last session ({n} plans)"), false),
        Err(e) => app.set_status(format!("last session not restored: {e:#}"), true),
    }
    if psource.is_given() {
        // Evaluated below by `start`.
        let _ = app.push_plan(plan.clone());
    }
    if let Some(kv) = &kv {
        app.kv.adopt(kv)?;
        app.set_status(format!("{}{}", kv.policy, plan_io::KV_NOTE), false);
    }
    // The decisions are routed when the routing view opens.
    if let (Some(section), Some(path)) = (routing, &psource.plan) {
        app.routing = Some(jobs::routing::RoutingState::new(
            path.clone(),
            section,
            plan,
        ));
        app.set_status(format!("{}{}", path.display(), plan_io::ROUTED_NOTE), false);
    }
    let (tx, rx) = mpsc::channel();
    let worker = worker::Worker::spawn(Arc::new(model), Arc::new(setup), tx);
    autosave.start();

    let mut terminal = ratatui::try_init().context("cannot open the terminal")?;
    event::enable_mouse();
    let result = event::run_loop(&mut terminal, &mut app, &worker, &rx, &autosave);
    event::disable_mouse();
    ratatui::restore();
    worker.shutdown();
    app.dirty = true;
    let saved = autosave.save_if_dirty(&mut app);
    autosave.finish();
    result?;
    saved?;
    eprintln!(
        "scalpel: session saved; the last plan is in {}",
        autosave.current_plan_path().display()
    );
    Ok(())
}
