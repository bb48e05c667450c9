//! Autosave: the session (plan history, every measured plan, the prompt) is
//! written atomically whenever it changes, so a crash or Ctrl-C loses
//! nothing; the next start on the same model picks it up again. The current
//! plan is also kept as a normal plan file, loadable with `scalpel eval --plan`.
//! Writing happens on its own thread so a slow disk never stalls a frame.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::app::{App, Record};
use super::plan_io;
use crate::plan::{write_atomic, Plan};

const SESSION_FORMAT: &str = "scalpel-session";
const SESSION_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Session {
    format: String,
    version: u32,
    model_hash: String,
    history: Vec<Plan>,
    at: usize,
    records: Vec<Record>,
    prompt: String,
}

/// Where sessions live: `$SCALPEL_SESSION_DIR`, else scalpel's cache folder.
pub fn session_dir() -> PathBuf {
    match std::env::var_os("SCALPEL_SESSION_DIR") {
        Some(p) => PathBuf::from(p),
        None => crate::model::source::cache_dir().join("sessions"),
    }
}

/// (session JSON, current plan JSON) ready to write.
type Snapshot = (String, String);

pub struct Autosave {
    session: PathBuf,
    current_plan: PathBuf,
    tx: Option<Sender<Snapshot>>,
    writer: Option<JoinHandle<()>>,
    last_error: Arc<Mutex<Option<String>>>,
}

impl Autosave {
    pub fn new(dir: &Path, model_hash: &str) -> Self {
        let id = &model_hash[..model_hash.len().min(16)];
        Self {
            session: dir.join(format!("{id}.session.json")),
            current_plan: dir.join(format!("{id}.current-plan.json")),
            tx: None,
            writer: None,
            last_error: Arc::new(Mutex::new(None)),
        }
    }

    pub fn current_plan_path(&self) -> &Path {
        &self.current_plan
    }

    /// Starts the writer thread.
    pub fn start(&mut self) {
        let (tx, rx) = channel::<Snapshot>();
        let (session, plan) = (self.session.clone(), self.current_plan.clone());
        let err = Arc::clone(&self.last_error);
        self.writer = Some(std::thread::spawn(move || {
            while let Ok(mut snap) = rx.recv() {
                // Only the newest snapshot matters.
                while let Ok(newer) = rx.try_recv() {
                    snap = newer;
                }
                let r = write_both(&session, &plan, &snap);
                *err.lock().unwrap_or_else(|e| e.into_inner()) = r.err().map(|e| format!("{e:#}"));
            }
        }));
        self.tx = Some(tx);
    }

    /// Queues the session for writing if anything changed.
    pub fn save_if_dirty(&self, app: &mut App) -> Result<()> {
        if !app.dirty {
            return Ok(());
        }
        app.dirty = false;
        let session = Session {
            format: SESSION_FORMAT.into(),
            version: SESSION_VERSION,
            model_hash: app.info.identity.content_hash.clone(),
            history: app.history.clone(),
            at: app.at,
            records: app.records.clone(),
            prompt: app.gen.prompt.clone(),
        };
        let snap = (
            serde_json::to_string_pretty(&session)? + "\n",
            serde_json::to_string_pretty(&plan_io::plan_file(app))? + "\n",
        );
        match &self.tx {
            Some(tx) => {
                let _ = tx.send(snap);
            }
            None => write_both(&self.session, &self.current_plan, &snap)?,
        }
        Ok(())
    }

    /// The last write's error, once.
    pub fn take_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Waits for pending writes.
    pub fn finish(&mut self) {
        self.tx = None;
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }

    /// Restores the last session on this model into `app`; returns the number of plans.
    pub fn restore(&self, app: &mut App) -> Result<usize> {
        if !self.session.exists() {
            return Ok(0);
        }
        let text = std::fs::read_to_string(&self.session)
            .with_context(|| format!("cannot read {}", self.session.display()))?;
        let s: Session = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a scalpel session", self.session.display()))?;
        if s.format != SESSION_FORMAT || s.version != SESSION_VERSION {
            bail!("{} is an unknown session format", self.session.display());
        }
        if s.model_hash != app.info.identity.content_hash {
            bail!("{} belongs to another model", self.session.display());
        }
        let n = app.info.n_layers;
        if s.history.is_empty()
            || s.at >= s.history.len()
            || s.history.iter().any(|p| p.validate(n).is_err())
        {
            bail!("{} does not fit this model", self.session.display());
        }
        app.history = s.history;
        app.at = s.at;
        app.records = s.records;
        if !s.prompt.trim().is_empty() {
            app.gen.prompt = s.prompt;
        }
        Ok(app.history.len())
    }
}

fn write_both(session: &Path, plan: &Path, snap: &Snapshot) -> Result<()> {
    if let Some(dir) = session.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    write_atomic(session, snap.0.as_bytes())?;
    write_atomic(plan, snap.1.as_bytes())
}
