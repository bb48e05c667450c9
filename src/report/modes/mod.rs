//! Plans of the modes beyond block skips, measured for the report through
//! each mode's own evaluation and timing, never as their skips alone:
//! - a KV budget at its context: `eval --kv`'s `evaluate_kv` (quality
//!   against the full cache on the positions past the budget) and
//!   `decode_speed` (the full cache and the policies, interleaved);
//! - contextual sparsity: `eval`'s sparse evaluation; decode timed here on
//!   the f32 candle path the sliced weights run on, against the unmodified
//!   model on that path (TEAL/WINA executed by the sparse-input kernel);
//! - token routing: `eval`'s routed evaluation (the realised compute) and
//!   `bench`'s routed timing on real text;
//! - any plan as the draft of lossless self-speculative decoding:
//!   `speculate`'s loop against plain decoding, interleaved.

mod draft;
mod kv;
mod measure;
mod routed;
mod sparse;

use std::path::Path;

use anyhow::{bail, Result};

pub use draft::{draft_speeds, DRAFT_LEN, DRAFT_TOKENS};
pub use kv::{kv_context, kv_quality, kv_speeds, KV_CHUNK, KV_MAX_CONTEXT};
pub use measure::{quality, speeds};
pub use routed::{routed_quality, routed_speeds};
pub use sparse::{sparse_quality, sparse_speeds};

use crate::eval::bench::Stat;
use crate::model::kv::KvSpec;
use crate::model::routing::{load_from_plan, Routers, RoutingSection};
use crate::model::Model;
use crate::plan::{KvSection, Plan, PlanFile, KV_SECTION};
use crate::surgery::sparsity::{Sparsifier, SparsitySection, SPARSITY_SECTION};

/// What a plan computes besides its skips and scales.
pub enum Mode {
    /// Skips, scales, healed or replaced blocks: one forward pass, timed
    /// with the other such plans.
    Plain,
    Kv(KvSpec),
    /// The section and what it runs (a shadow plan's predictor loaded).
    Sparse(SparsitySection, Sparsifier),
    Routed(RoutingSection, Routers),
}

impl Mode {
    /// The plan's mode, refusing what no command measures (a KV budget on
    /// a plan that also skips, two modes in one plan) before any work.
    pub fn of(pf: &PlanFile, plan: &Plan, model: &Model, path: &Path) -> Result<Mode> {
        let kv = pf.sections.get::<KvSection>(KV_SECTION)?;
        let sparse = pf.sections.get::<SparsitySection>(SPARSITY_SECTION)?;
        let routed = load_from_plan(pf, model)?;
        let modes = [kv.is_some(), sparse.is_some(), routed.is_some()];
        if modes.iter().filter(|&&m| m).count() > 1 {
            bail!(
                "plan {} combines a KV budget, sparsity or routing; no command measures such a \
                 combination yet: keep one of those sections",
                path.display()
            );
        }
        if let Some(kv) = kv {
            if *plan != Plan::base() {
                bail!(
                    "plan {} has a `kv` section and also skips, rescales or trains blocks; KV \
                     budgets are measured on the full model only (as `eval --kv` does): keep \
                     only the `kv` section",
                    path.display()
                );
            }
            return Ok(Mode::Kv(kv.spec()?));
        }
        if let Some(s) = sparse {
            let sp = s.sparsifier_in(pf, model)?;
            return Ok(Mode::Sparse(s, sp));
        }
        if let Some((s, r)) = routed {
            return Ok(Mode::Routed(s, r));
        }
        Ok(Mode::Plain)
    }

    /// The method the report colours it by: one per mode.
    pub fn method(&self) -> Option<&'static str> {
        match self {
            Mode::Plain => None,
            Mode::Kv(_) => Some("KV budget"),
            Mode::Sparse(..) => Some("sparsity"),
            Mode::Routed(..) => Some("token routing"),
        }
    }
}

/// A plan's measured quality and the mode's facts behind it.
pub struct Quality {
    pub perplexity: f64,
    pub reference_perplexity: Option<f64>,
    pub kl_to_base: f64,
    pub top1_agreement: f64,
    /// Blocks removed or their equivalent in compute; `None`: the skips.
    pub blocks_removed: Option<f64>,
    pub summary: Option<String>,
    pub facts: Vec<(String, String)>,
}

/// A plan's timing against its reference (the unmodified model on the same
/// path, in the same rounds).
pub struct Speed {
    pub prefill: Option<Stat>,
    pub prefill_speedup: Option<Stat>,
    pub decode: Stat,
    pub decode_speedup: Stat,
    pub executed: bool,
    /// What the speed-up is against, when not the base row's timing.
    pub reference: Option<String>,
    pub facts: Vec<(String, String)>,
}

pub(crate) fn fact(k: &str, v: String) -> (String, String) {
    (k.to_string(), v)
}
