//! Contextual sparsity: drop attention heads and MLP neurons (ShadowLLM's
//! plainact scores: static, random, oracle masks) or zero projection input
//! channels per token (TEAL, WINA), measured on held-out text.
//!
//! - `scores`: per-head and per-neuron scores on calibration data (cached);
//! - `masks`: masks at a level and the policy that executes them (sliced
//!   weights: executed);
//! - `activation`: TEAL / WINA thresholds and the probe that applies them
//!   (masked inputs in multi-row passes; executed at one-row decode steps
//!   by `kernels::sparse_input`);
//! - `evaluate`: held-out perplexity, KL and top-1 under any of them, and
//!   the comparison over levels;
//! - the `sparsity` plan section (`SparsitySection`) that `eval` carries out.

pub mod activation;
pub mod evaluate;
pub mod masks;
pub mod predictor;
pub mod scores;
pub mod speed;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::eval::data::Sequence;
use crate::model::{Model, ModelConfig};
use crate::plan::{Plan, PlanFile};
pub use activation::{ChannelThresholds, ColumnNorms, Criterion};
pub use masks::{check_level, MaskPolicy, Split, UnitMask};
pub use scores::UnitScores;

/// The name of the plan section.
pub const SPARSITY_SECTION: &str = "sparsity";

/// How units are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Heads and neurons dropped at random (seeded): the control.
    Random,
    /// Lowest mean activation magnitude on calibration data.
    Magnitude,
    /// Lowest plainact score on calibration data (ShadowLLM's criterion, one mask).
    Static,
    /// Lowest plainact score on the evaluated text itself: an upper bound
    /// (it reads the targets), not a deployable method.
    Oracle,
    /// Lowest score predicted per prompt from the layer-0 attention output
    /// (ShadowLLM's predictor, `predictor`).
    Shadow,
    /// Per-token |x| thresholds on every projection input.
    Teal,
    /// Per-token |x|·‖W col‖ thresholds on every projection input.
    Wina,
}

impl Method {
    pub const ALL: [Method; 7] = [
        Method::Random,
        Method::Magnitude,
        Method::Static,
        Method::Shadow,
        Method::Oracle,
        Method::Teal,
        Method::Wina,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Random => "random",
            Method::Magnitude => "magnitude",
            Method::Static => "static",
            Method::Oracle => "oracle",
            Method::Shadow => "shadow",
            Method::Teal => "teal",
            Method::Wina => "wina",
        }
    }

    /// Whether it drops whole heads and neurons (sliced weights) rather
    /// than input channels per token (TEAL, WINA: executed at decode by the
    /// sparse-input kernel, masked in multi-row passes).
    pub fn drops_units(self) -> bool {
        !matches!(self, Method::Teal | Method::Wina)
    }

    /// What the level counts.
    pub fn unit(self) -> &'static str {
        if self.drops_units() {
            "query heads and MLP neurons per layer"
        } else {
            "input channels of every projection, per token"
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s.trim())
            .with_context(|| {
                let names: Vec<_> = Method::ALL.iter().map(|m| m.name()).collect();
                format!(
                    "unknown sparsity method `{s}`: expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// The shapes a section was made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shape {
    pub n_layers: usize,
    pub n_heads: usize,
    pub intermediate_size: usize,
    pub hidden_size: usize,
}

impl Shape {
    pub fn of(cfg: &ModelConfig) -> Self {
        Self {
            n_layers: cfg.n_layers,
            n_heads: cfg.n_heads,
            intermediate_size: cfg.intermediate_size,
            hidden_size: cfg.hidden_size,
        }
    }
}

/// The `sparsity` plan section: a method at a level, with what it needs
/// (a mask for random/magnitude/static, thresholds for teal/wina; oracle
/// scores each evaluated window on its own text).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparsitySection {
    pub method: Method,
    pub level: f64,
    /// "per-layer": every layer drops the same fraction; "global": the
    /// lowest of all layers' units; "per-projection" for teal/wina (every
    /// projection's input at that level).
    pub split: String,
    pub shape: Shape,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<UnitMask>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds: Option<ChannelThresholds>,
    /// `shadow`: the artifact holding the predictor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<String>,
}

/// Checks a section's JSON when a plan is read.
pub fn check_section(value: &serde_json::Value) -> Result<()> {
    let s: SparsitySection = serde_json::from_value(value.clone()).context(
        "expected {\"method\", \"level\", \"split\", \"shape\", and \"mask\" or \"thresholds\"}, as `scalpel sparsify` writes it",
    )?;
    check_level(s.level)?;
    if (s.method == Method::Shadow) != s.artifact.is_some() {
        bail!(
            "method {} needs the predictor artifact exactly when it is `shadow`",
            s.method
        );
    }
    if s.method.drops_units() {
        s.split.parse::<Split>()?;
    }
    let needs_mask = matches!(
        s.method,
        Method::Random | Method::Magnitude | Method::Static
    );
    let needs_thresholds = matches!(s.method, Method::Teal | Method::Wina);
    if needs_mask != s.mask.is_some() || needs_thresholds != s.thresholds.is_some() {
        bail!(
            "method {} needs {}",
            s.method,
            if needs_mask {
                "a mask and no thresholds"
            } else if needs_thresholds {
                "thresholds and no mask"
            } else {
                "neither a mask nor thresholds"
            }
        );
    }
    Ok(())
}

impl SparsitySection {
    /// What this section executes on `model`; refuses another model's shapes.
    pub fn sparsifier(&self, model: &Model) -> Result<Sparsifier> {
        self.check_shape(model)?;
        if self.level == 0.0 {
            return Ok(Sparsifier::Dense);
        }
        Ok(match (self.method, &self.mask, &self.thresholds) {
            (Method::Shadow, _, _) => bail!(
                "a shadow plan predicts each prompt's mask with the predictor in its artifact: \
                 read the section with its plan file (`sparsifier_in`)"
            ),
            (Method::Oracle, _, _) => Sparsifier::Oracle {
                level: self.level,
                split: self.split.parse()?,
                cached: None,
            },
            (_, Some(mask), _) => {
                mask.check(model.cfg())?;
                Sparsifier::Mask(mask.clone())
            }
            (m, None, Some(t)) => Sparsifier::Channels {
                thresholds: t.clone(),
                norms: match m {
                    Method::Wina => Some(Arc::new(ColumnNorms::of(model)?)),
                    _ => None,
                },
            },
            (m, None, None) => bail!("sparsity method {m} has neither a mask nor thresholds"),
        })
    }

    /// Refuses a level outside [0, 1) and another model's shapes.
    fn check_shape(&self, model: &Model) -> Result<()> {
        check_level(self.level)?;
        let have = Shape::of(model.cfg());
        if self.shape != have {
            bail!(
                "the plan's sparsity section was made for a model of {} layers, {} heads, {} neurons, hidden {}; this model has {} layers, {} heads, {} neurons, hidden {}: run `scalpel sparsify` on this model",
                self.shape.n_layers,
                self.shape.n_heads,
                self.shape.intermediate_size,
                self.shape.hidden_size,
                have.n_layers,
                have.n_heads,
                have.intermediate_size,
                have.hidden_size
            );
        }
        Ok(())
    }
}

impl SparsitySection {
    /// `sparsifier`, with a shadow plan's predictor read from `file`'s
    /// artifact (hash-checked, shapes checked against `model`).
    pub fn sparsifier_in(&self, file: &crate::plan::PlanFile, model: &Model) -> Result<Sparsifier> {
        if self.method != Method::Shadow || self.level == 0.0 {
            return self.sparsifier(model);
        }
        self.check_shape(model)?;
        let name = self
            .artifact
            .as_deref()
            .context("a shadow section names its artifact")?;
        let tensors = file.load_artifact(name, model.device())?;
        Ok(Sparsifier::Predicted {
            predictor: Arc::new(predictor::Predictor::from_tensors(&tensors, model)?),
            level: self.level,
            split: self.split.parse()?,
        })
    }
}

/// A plan file's sparsity section and what it runs on `model` (a shadow
/// plan's predictor loaded), if it has one; refuses one that also routes
/// (no pass runs both).
pub fn load_from_given(
    file: Option<&PlanFile>,
    model: &Model,
) -> Result<Option<(SparsitySection, Sparsifier)>> {
    let Some(file) = file else {
        return Ok(None);
    };
    let Some(section) = file.sections.get::<SparsitySection>(SPARSITY_SECTION)? else {
        return Ok(None);
    };
    if file
        .sections
        .names()
        .any(|n| n == crate::model::routing::ROUTING_SECTION)
    {
        bail!("a plan with both routing and sparsity is not run yet: keep one of the two sections");
    }
    let sp = section.sparsifier_in(file, model)?;
    Ok(Some((section, sp)))
}

/// What a sparse plan drops while decoding one prompt, in words (executed
/// or simulated), for the commands that decode.
pub fn decode_note(
    section: &SparsitySection,
    mask: Option<&UnitMask>,
    cfg: &ModelConfig,
) -> String {
    match mask {
        Some(m) => {
            let (heads, neurons) = m.dropped_fractions(cfg);
            format!(
                "{} sparsity at level {} (executed: {:.1}% of query heads and {:.1}% of MLP \
                 neurons not computed, on sliced f32 weights)",
                section.method,
                section.level,
                100.0 * heads,
                100.0 * neurons
            )
        }
        None if section.method.drops_units() => format!("{} sparsity at level 0", section.method),
        None => format!(
            "{} sparsity at level {} (executed at decode: each projection reads only its kept \
             input channels' columns of a column-major f32 copy; the prompt's rows masked)",
            section.method, section.level
        ),
    }
}

impl Sparsifier {
    /// The head/neuron mask this runs on the text `ids` — the predictor's
    /// from its first tokens, the oracle's from its own plainact scores (it
    /// reads the text's targets: an upper bound) — or `None` where no head
    /// or neuron is dropped (level 0; TEAL/WINA zero channels per token).
    pub fn mask_for(&self, model: &Model, plan: &Plan, ids: &[u32]) -> Result<Option<UnitMask>> {
        Ok(match self {
            Sparsifier::Dense | Sparsifier::Channels { .. } => None,
            Sparsifier::Mask(m) => Some(m.clone()),
            Sparsifier::Oracle { level, split, .. } => {
                if ids.len() < 2 {
                    bail!("the oracle scores a text of at least two tokens");
                }
                let seq = Sequence {
                    ids: ids.to_vec(),
                    scored_from: 1,
                };
                let scores = scores::sequence_scores(model, &seq, plan)?.0;
                Some(UnitMask::with_split(&scores, *level, *split)?)
            }
            Sparsifier::Predicted {
                predictor,
                level,
                split,
            } => {
                let end = predictor::window_prefix_end(ids);
                let scores = predictor.scores(model, ids, end)?;
                Some(UnitMask::with_split(&scores, *level, *split)?)
            }
        })
    }
}

/// What a pass runs beyond the plan's block skips.
#[derive(Clone)]
pub enum Sparsifier {
    /// Nothing dropped (level 0): the plan itself.
    Dense,
    /// One head/neuron mask for every input (executed).
    Mask(UnitMask),
    /// Per-window scores at `level` (executed): each window's own plainact
    /// scores (the oracle), or `cached` ones computed already, one per
    /// window (the oracle's, or the predictor's).
    Oracle {
        level: f64,
        split: Split,
        cached: Option<Arc<Vec<UnitScores>>>,
    },
    /// Each window's mask from the ShadowLLM predictor's scores at `level`,
    /// predicted from the window's first `predictor::PREFIX_TOKENS` tokens
    /// (executed).
    Predicted {
        predictor: Arc<predictor::Predictor>,
        level: f64,
        split: Split,
    },
    /// Per-token channel thresholds (a probe: masked, or executed at decode
    /// with `ChannelProbe::executed`).
    Channels {
        thresholds: ChannelThresholds,
        norms: Option<Arc<ColumnNorms>>,
    },
}
