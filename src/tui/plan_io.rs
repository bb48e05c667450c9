//! Saving and opening plan files from the workbench (`s` / `o`).

use std::path::Path;

use anyhow::{Context, Result};

use super::app::App;
use super::jobs::routing::section_of;
use crate::model::routing::{RoutingSection, ROUTING_SECTION};
use crate::plan::{KvSection, Plan, PlanFile, KV_SECTION};

/// The plan sections the workbench carries out (the routing view routes
/// with them, the KV view takes the policy); a plan with any other section
/// is refused, as the CLI does.
pub const HONOURED: &[&str] = &[ROUTING_SECTION, KV_SECTION];

/// Said when a plan with a KV policy opens.
pub const KV_NOTE: &str =
    "; KV policy: KV view (v); blocks view measures the plan with the full cache";

/// Said when a routed plan opens: where its routing shows, and that the
/// blocks view measures the plan under the routers.
pub const ROUTED_NOTE: &str =
    "; routers: routing view (v); blocks view measures the static plan without routing";

/// A plan file as opened: its static plan, what reading it changed (see
/// `PlanFile::notes`) and its routing, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Opened {
    pub plan: Plan,
    pub notes: Vec<String>,
    pub routing: Option<RoutingSection>,
    pub kv: Option<KvSection>,
}

/// Writes the current plan, with what was measured about it, atomically.
pub fn save(app: &App, path: &Path) -> Result<()> {
    plan_file(app)
        .save(path)
        .with_context(|| format!("cannot save the plan to {}", path.display()))
}

/// The current plan as a plan file, with what was measured about it.
pub fn plan_file(app: &App) -> PlanFile {
    let mut file = PlanFile::new(app.info.identity.clone(), app.plan().clone());
    file.provenance
        .insert("made_with".into(), "scalpel workbench".into());
    if let Some(r) = app.current_record() {
        if let Some(q) = r.quality {
            file.metrics
                .insert("heldout".into(), app.info.heldout.clone().into());
            file.metrics
                .insert("perplexity".into(), q.perplexity.into());
            file.metrics.insert("kl_to_base".into(), q.kl.into());
            file.metrics.insert("top1_agreement".into(), q.top1.into());
        }
        if let Some(s) = r.speed {
            file.metrics
                .insert("speed".into(), app.info.speed.clone().into());
            file.metrics
                .insert("prefill_speedup".into(), s.prefill_ratio().into());
            file.metrics
                .insert("decode_speedup".into(), s.decode_ratio().into());
        }
    }
    if let Some(b) = app.base_quality {
        file.metrics
            .insert("base_perplexity".into(), b.perplexity.into());
    }
    if let Some(kv) = app.kv.section() {
        // A KvSection always serialises.
        let _ = file.sections.set(KV_SECTION, &kv);
    }
    file
}

/// Reads a plan file and checks it was made for this model and carries no
/// section the workbench would leave out.
pub fn open(app: &App, path: &Path) -> Result<Opened> {
    let file = PlanFile::load(path)?;
    // A plan made on other weights of the same shapes (another quantization)
    // loads, as it always has here; the CLI prints the warning.
    let _other_weights = file
        .check_model(&app.info.identity)
        .with_context(|| format!("cannot use plan {}", path.display()))?;
    crate::setup::refuse_sections(&file, path, "the workbench", HONOURED)?;
    let routing = section_of(&file)?;
    let kv = file.sections.get::<KvSection>(KV_SECTION)?;
    Ok(Opened {
        plan: file.plan,
        notes: file.notes,
        routing,
        kv,
    })
}
