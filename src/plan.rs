//! A `Plan` says which attention / MLP blocks are skipped and which per-layer
//! Hopscotch scalars apply. It is plain data: the forward pass takes it as an
//! argument, so one set of base weights serves the base model and every
//! candidate. `PlanFile` is the versioned on-disk form, tied to one model.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

mod artifacts;
mod sections;

pub use crate::surgery::heal::HEAL_SECTION;
pub use artifacts::{sha256_hex, Artifact};
pub use sections::{KvSection, SectionSpec, Sections, KV_SECTION, SECTIONS};

/// Attention or MLP sub-block of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum BlockKind {
    Attn,
    Mlp,
}

/// One block, named TransformerLens-style: `attn.10`, `mlp.3` (layers from 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockId {
    pub layer: usize,
    pub kind: BlockKind,
}

impl BlockId {
    pub fn attn(layer: usize) -> Self {
        Self {
            layer,
            kind: BlockKind::Attn,
        }
    }
    pub fn mlp(layer: usize) -> Self {
        Self {
            layer,
            kind: BlockKind::Mlp,
        }
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            BlockKind::Attn => "attn",
            BlockKind::Mlp => "mlp",
        };
        write!(f, "{kind}.{}", self.layer)
    }
}

impl FromStr for BlockId {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        // Accept the short form and TransformerLens' `blocks.N.attn` / `blocks.N.mlp`.
        let (kind, layer) = if let Some(rest) = s.strip_prefix("blocks.") {
            let (layer, kind) = rest
                .split_once('.')
                .with_context(|| format!("block `{s}`: expected blocks.N.attn or blocks.N.mlp"))?;
            (kind, layer)
        } else {
            s.split_once('.')
                .with_context(|| format!("block `{s}`: expected attn.N or mlp.N (e.g. attn.10)"))?
        };
        let kind = match kind {
            "attn" | "attention" => BlockKind::Attn,
            "mlp" | "ffn" => BlockKind::Mlp,
            other => bail!("block `{s}`: unknown block kind `{other}` (use attn or mlp)"),
        };
        let layer = layer
            .parse::<usize>()
            .with_context(|| format!("block `{s}`: `{layer}` is not a layer number"))?;
        Ok(Self { layer, kind })
    }
}

impl Serialize for BlockId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BlockId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses `attn.10,attn.15,mlp.3` (the `--skip` syntax).
pub fn parse_block_list(s: &str) -> Result<Vec<BlockId>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::parse)
        .collect()
}

/// The four Hopscotch scalars of one layer:
/// `x1 = b_att·Attn(norm(x)) + s_att·x`, `out = b_mlp·MLP(norm(x1)) + s_mlp·x1`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerScales {
    pub b_att: f32,
    pub s_att: f32,
    pub b_mlp: f32,
    pub s_mlp: f32,
}

impl LayerScales {
    pub const IDENTITY: Self = Self {
        b_att: 1.0,
        s_att: 1.0,
        b_mlp: 1.0,
        s_mlp: 1.0,
    };

    pub fn is_identity(&self) -> bool {
        *self == Self::IDENTITY
    }

    pub fn as_array(&self) -> [f32; 4] {
        [self.b_att, self.s_att, self.b_mlp, self.s_mlp]
    }

    /// The scale on a block's own output: `b_att` or `b_mlp`.
    pub fn output_scale(&self, kind: BlockKind) -> f32 {
        match kind {
            BlockKind::Attn => self.b_att,
            BlockKind::Mlp => self.b_mlp,
        }
    }

    pub fn output_scale_mut(&mut self, kind: BlockKind) -> &mut f32 {
        match kind {
            BlockKind::Attn => &mut self.b_att,
            BlockKind::Mlp => &mut self.b_mlp,
        }
    }

    pub fn from_array(a: [f32; 4]) -> Self {
        Self {
            b_att: a[0],
            s_att: a[1],
            b_mlp: a[2],
            s_mlp: a[3],
        }
    }
}

impl Default for LayerScales {
    fn default() -> Self {
        Self::IDENTITY
    }
}

/// Which blocks are skipped, plus optional per-layer scales (absent = all 1).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    #[serde(default)]
    pub skip: BTreeSet<BlockId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scales: Option<Vec<LayerScales>>,
    /// Attention layers replaced by trained mixers, with their weights: set
    /// at run time from the plan file's `replace` section and its artifact
    /// (`surgery::replace`), never written here.
    #[serde(skip)]
    pub replace: Option<crate::model::mixer::Replaced>,
    /// Trained tensors the plan applies by name (a heal's low-rank factors),
    /// loaded from its artifact; never written inline (the artifact is).
    #[serde(skip)]
    pub tensors: Option<PlanTensors>,
}

/// Named tensors a plan carries (`ParamSource::tensor` reads them).
#[derive(Debug, Clone)]
pub struct PlanTensors(pub std::sync::Arc<std::collections::BTreeMap<String, candle_core::Tensor>>);

impl PlanTensors {
    pub fn new(tensors: impl IntoIterator<Item = (String, candle_core::Tensor)>) -> Self {
        Self(std::sync::Arc::new(tensors.into_iter().collect()))
    }

    pub fn get(&self, name: &str) -> Option<&candle_core::Tensor> {
        self.0.get(name)
    }
}

/// Equal when the same names hold the same values.
impl PartialEq for PlanTensors {
    fn eq(&self, other: &Self) -> bool {
        if std::sync::Arc::ptr_eq(&self.0, &other.0) {
            return true;
        }
        let values = |t: &candle_core::Tensor| -> Option<Vec<f32>> {
            t.to_dtype(candle_core::DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .ok()
        };
        self.0.len() == other.0.len()
            && self.0.iter().zip(other.0.iter()).all(|((ka, a), (kb, b))| {
                ka == kb && a.dims() == b.dims() && values(a).is_some() && values(a) == values(b)
            })
    }
}

impl Plan {
    pub fn base() -> Self {
        Self::default()
    }

    pub fn with_skips(blocks: impl IntoIterator<Item = BlockId>) -> Self {
        Self {
            skip: blocks.into_iter().collect(),
            ..Self::default()
        }
    }

    /// Whether `layer`'s attention runs as a mixer.
    pub fn replaces_attn(&self, layer: usize) -> bool {
        self.replace
            .as_ref()
            .is_some_and(|r| r.layers.contains(&layer))
    }

    pub fn skips_attn(&self, layer: usize) -> bool {
        self.skip.contains(&BlockId::attn(layer))
    }

    pub fn skips_mlp(&self, layer: usize) -> bool {
        self.skip.contains(&BlockId::mlp(layer))
    }

    pub fn is_skipped(&self, block: BlockId) -> bool {
        self.skip.contains(&block)
    }

    /// Flips one block's skip; returns whether it is now skipped.
    pub fn toggle(&mut self, block: BlockId) -> bool {
        if !self.skip.remove(&block) {
            self.skip.insert(block);
            true
        } else {
            false
        }
    }

    pub fn scales_for(&self, layer: usize) -> LayerScales {
        self.scales
            .as_ref()
            .and_then(|s| s.get(layer).copied())
            .unwrap_or_default()
    }

    pub fn has_scales(&self) -> bool {
        self.scales
            .as_ref()
            .is_some_and(|s| s.iter().any(|l| !l.is_identity()))
    }

    /// Sets one block's output scale (`b_att` / `b_mlp`) to neutral 1: what a
    /// restored block needs, and all a skipped block's ever is (never read).
    pub fn reset_output_scale(&mut self, block: BlockId) {
        if let Some(s) = self.scales.as_mut().and_then(|s| s.get_mut(block.layer)) {
            *s.output_scale_mut(block.kind) = 1.0;
        }
    }

    /// Puts every meaningless output scale back to 1: a skipped block's
    /// (never used, so the forward pass is unchanged) and a kept block's
    /// exact 0, which older scalpels left on a restored block (it computed
    /// the block and dropped its output). Returns a note per kept block reset.
    pub fn neutralise_output_scales(&mut self) -> Vec<String> {
        let Some(scales) = &self.scales else {
            return Vec::new();
        };
        let mut notes = Vec::new();
        let blocks: Vec<BlockId> = (0..scales.len())
            .flat_map(|l| [BlockId::attn(l), BlockId::mlp(l)])
            .collect();
        for block in blocks {
            let b = self.scales_for(block.layer).output_scale(block.kind);
            if b == 1.0 {
                continue;
            }
            if self.is_skipped(block) {
                self.reset_output_scale(block);
            } else if b == 0.0 {
                self.reset_output_scale(block);
                let name = match block.kind {
                    BlockKind::Attn => "b_att",
                    BlockKind::Mlp => "b_mlp",
                };
                notes.push(format!(
                    "{block} is kept but its {name} was 0 (left by an older scalpel when the block \
                     was restored after a fit: it was computed and its output dropped); reset to 1"
                ));
            }
        }
        notes
    }

    pub fn skipped_attn_layers(&self) -> Vec<usize> {
        self.skip
            .iter()
            .filter(|b| b.kind == BlockKind::Attn)
            .map(|b| b.layer)
            .collect()
    }

    pub fn skipped_mlp_layers(&self) -> Vec<usize> {
        self.skip
            .iter()
            .filter(|b| b.kind == BlockKind::Mlp)
            .map(|b| b.layer)
            .collect()
    }

    /// Checks that every named layer exists and the scales cover the model.
    pub fn validate(&self, n_layers: usize) -> Result<()> {
        if let Some(b) = self.skip.iter().find(|b| b.layer >= n_layers) {
            bail!(
                "plan skips `{b}`, but the model has only {n_layers} layers (0..={})",
                n_layers.saturating_sub(1)
            );
        }
        for &l in self.replace.iter().flat_map(|r| &r.layers) {
            if l >= n_layers {
                bail!("plan replaces attn.{l}, but the model has only {n_layers} layers");
            }
            if self.skips_attn(l) {
                bail!(
                    "plan both skips and replaces attn.{l}: a block is either skipped or replaced"
                );
            }
        }
        if let Some(scales) = &self.scales {
            if scales.len() != n_layers {
                bail!(
                    "plan has scales for {} layers, but the model has {n_layers}",
                    scales.len()
                );
            }
            if let Some((i, _)) = scales
                .iter()
                .enumerate()
                .find(|(_, s)| s.as_array().iter().any(|v| !v.is_finite()))
            {
                bail!("plan has a non-finite scale in layer {i}; refit it");
            }
        }
        Ok(())
    }

    /// Short human summary: `attn.10 attn.15 (+scales)`.
    pub fn describe(&self) -> String {
        let mut s = if self.skip.is_empty() {
            "base (nothing skipped)".to_string()
        } else {
            self.skip
                .iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        if let Some(r) = self.replace.as_ref().filter(|r| !r.layers.is_empty()) {
            let layers: Vec<String> = r.layers.iter().map(|l| format!("attn.{l}")).collect();
            if self.skip.is_empty() {
                s.clear();
            } else {
                s.push(' ');
            }
            s.push_str(&format!("replaced: {}", layers.join(" ")));
        }
        if self.has_scales() {
            s.push_str(" (+scales)");
        }
        if self.tensors.is_some() {
            s.push_str(" (+healed)");
        }
        s
    }
}

/// What a plan was made on. A plan runs on any model with the same
/// architecture, layer count and shapes; other weights only warn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    pub name: String,
    pub architecture: String,
    pub n_layers: usize,
    /// Absent in plan files written before scalpel recorded it; those are
    /// matched by architecture and layer count alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<ShapeSignature>,
    /// sha256 over the weights' names, shapes, stored types and a sample of
    /// their stored bytes (so neither the load dtype nor the device changes it).
    pub content_hash: String,
}

impl ModelIdentity {
    /// Why a plan made on `self` cannot run on `other`, if it cannot.
    fn incompatibility(&self, other: &ModelIdentity) -> Option<String> {
        if self.architecture != other.architecture {
            return Some(format!(
                "architecture {} vs {}",
                self.architecture, other.architecture
            ));
        }
        if self.n_layers != other.n_layers {
            return Some(format!("{} vs {} layers", self.n_layers, other.n_layers));
        }
        match (&self.shape, &other.shape) {
            (Some(a), Some(b)) if a != b => Some(format!("shapes {a} vs {b}")),
            _ => None,
        }
    }
}

impl fmt::Display for ModelIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, {} layers, hash {})",
            self.name,
            self.architecture,
            self.n_layers,
            // By characters: a plan file's hash may be any text.
            self.content_hash.chars().take(12).collect::<String>()
        )
    }
}

/// The tensor shapes a plan's scales and skips were measured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeSignature {
    pub hidden_size: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
}

impl fmt::Display for ShapeSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "(hidden {}, {} heads / {} KV of {}, FFN {}, vocab {})",
            self.hidden_size,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
            self.intermediate_size,
            self.vocab_size
        )
    }
}

pub const PLAN_FORMAT: &str = "scalpel-plan";
/// The version `save` writes.
pub const PLAN_VERSION: u32 = 2;
/// The oldest version `load` reads (v1: no sections, no artifacts).
pub const PLAN_MIN_VERSION: u32 = 1;

/// The saved form of a plan: versioned, tied to a model, with free-form
/// metrics and provenance (which command made it, with what settings).
/// Version 2 adds optional per-mode `sections` and content-hashed
/// `artifacts` (safetensors files beside the plan).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanFile {
    pub format: String,
    pub version: u32,
    pub model: ModelIdentity,
    #[serde(flatten)]
    pub plan: Plan,
    #[serde(default, skip_serializing_if = "Sections::is_empty")]
    pub sections: Sections,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<Artifact>,
    #[serde(default)]
    pub metrics: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub provenance: serde_json::Map<String, serde_json::Value>,
    /// The folder artifact paths are relative to: the plan's own folder
    /// once it is loaded, saved or given an artifact.
    #[serde(skip)]
    pub dir: Option<PathBuf>,
    /// What reading the file changed, for the command to tell the user.
    #[serde(skip)]
    pub notes: Vec<String>,
}

impl PlanFile {
    pub fn new(model: ModelIdentity, plan: Plan) -> Self {
        let mut provenance = serde_json::Map::new();
        provenance.insert(
            "tool".into(),
            format!("scalpel {}", env!("CARGO_PKG_VERSION")).into(),
        );
        Self {
            format: PLAN_FORMAT.into(),
            version: PLAN_VERSION,
            model,
            plan,
            sections: Sections::default(),
            artifacts: Vec::new(),
            metrics: Default::default(),
            provenance,
            dir: None,
            notes: Vec::new(),
        }
    }

    /// Reads a plan file and verifies every artifact it lists.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read plan file {}", path.display()))?;
        let mut file = Self::from_json(&text, &path.display().to_string())?;
        file.dir = Some(folder_of(path));
        file.verify_artifacts()
            .with_context(|| format!("cannot use plan {}", path.display()))?;
        Ok(file)
    }

    /// Parses a plan file's text (any version this build reads, held as the
    /// current one); `origin` names it in errors. Touches no other file:
    /// artifacts are checked by `load` / `verify_artifacts`.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).with_context(|| format!("{origin} is not valid JSON"))?;
        let format = value.get("format").and_then(|v| v.as_str()).unwrap_or("");
        if format != PLAN_FORMAT {
            bail!("{origin} is not a scalpel plan (no \"format\": \"{PLAN_FORMAT}\")");
        }
        let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version > u64::from(PLAN_VERSION) {
            bail!(
                "{origin} is plan format version {version}; this scalpel reads versions \
                 {PLAN_MIN_VERSION} to {PLAN_VERSION}: it was written by a newer scalpel, update scalpel"
            );
        }
        if version < u64::from(PLAN_MIN_VERSION) {
            bail!(
                "{origin} has no valid plan format version (\"version\": {}); this scalpel reads \
                 versions {PLAN_MIN_VERSION} to {PLAN_VERSION}",
                value.get("version").unwrap_or(&serde_json::Value::Null)
            );
        }
        sections::check_known(value.get("sections"), origin)?;
        let mut file: Self = serde_json::from_value(value)
            .with_context(|| format!("{origin} is a malformed scalpel plan"))?;
        artifacts::check_entries(&file.artifacts, origin)?;
        file.version = PLAN_VERSION;
        file.notes = file.plan.neutralise_output_scales();
        Ok(file)
    }

    /// Refuses the plan unless it can run on `model` (same architecture,
    /// layer count and shapes), then validates it. Returns a warning when
    /// the weights differ (another quantization of the model, say): the
    /// plan still applies, but was measured on other weights.
    pub fn check_model(&self, model: &ModelIdentity) -> Result<Option<String>> {
        if let Some(why) = self.model.incompatibility(model) {
            bail!(
                "this plan belongs to {}, not to the loaded model {} ({why}); \
                 load that model with --model, or make a new plan for this one",
                self.model,
                model
            );
        }
        self.plan.validate(model.n_layers)?;
        Ok((self.model.content_hash != model.content_hash).then(|| {
            format!(
                "this plan was made on {}; the loaded model {} has the same shapes but other \
                 weights (another quantization?), so its measured quality may not carry over",
                self.model, model
            )
        }))
    }

    /// Writes the plan as the current version. Artifacts not already beside
    /// `path` are copied there (verified first), so the saved plan is whole.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.copy_artifacts_to(&folder_of(path))?;
        let mut json = serde_json::to_string_pretty(&Self {
            version: PLAN_VERSION,
            ..self.clone()
        })?;
        json.push('\n');
        write_atomic(path, json.as_bytes())
    }
}

/// The folder a file lives in (`.` for a bare file name).
pub(crate) fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes via a temporary file in the same folder and a rename, so a crash
/// or a full disk never leaves a half-written file behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_names_round_trip() {
        for s in ["attn.0", "mlp.29", "attn.10"] {
            assert_eq!(s.parse::<BlockId>().unwrap().to_string(), s);
        }
        assert_eq!("blocks.3.mlp".parse::<BlockId>().unwrap(), BlockId::mlp(3));
        assert!("attn".parse::<BlockId>().is_err());
        assert!("conv.3".parse::<BlockId>().is_err());
        assert!("attn.x".parse::<BlockId>().is_err());
    }

    #[test]
    fn skip_list_parses_and_validates() {
        let plan = Plan::with_skips(parse_block_list("attn.10, attn.15,mlp.3").unwrap());
        assert_eq!(plan.skipped_attn_layers(), vec![10, 15]);
        assert_eq!(plan.skipped_mlp_layers(), vec![3]);
        assert!(plan.validate(30).is_ok());
        let err = Plan::with_skips([BlockId::attn(99)])
            .validate(30)
            .unwrap_err();
        assert!(err.to_string().contains("only 30 layers"), "{err}");
    }

    #[test]
    fn an_identity_with_a_non_ascii_hash_displays() {
        // Cutting at byte 12 inside `é` panicked when a plan's model did not match.
        let id = ModelIdentity {
            name: "m".into(),
            architecture: "llama".into(),
            n_layers: 4,
            content_hash: "aéééééééé".into(),
            shape: None,
        };
        assert_eq!(id.to_string(), "m (llama, 4 layers, hash aéééééééé)");
    }

    #[test]
    fn toggle_flips() {
        let mut plan = Plan::base();
        assert!(plan.toggle(BlockId::attn(2)));
        assert!(plan.skips_attn(2));
        assert!(!plan.toggle(BlockId::attn(2)));
        assert!(plan.skip.is_empty());
    }

    #[test]
    fn plan_file_round_trips_and_refuses_other_models() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        let id = ModelIdentity {
            name: "m".into(),
            architecture: "llama".into(),
            n_layers: 4,
            shape: None,
            content_hash: "abc".into(),
        };
        let mut plan = Plan::with_skips([BlockId::attn(1), BlockId::mlp(3)]);
        plan.scales = Some(vec![
            LayerScales {
                s_att: 0.5,
                ..Default::default()
            };
            4
        ]);
        PlanFile::new(id.clone(), plan.clone()).save(&path).unwrap();
        let back = PlanFile::load(&path).unwrap();
        assert_eq!(back.plan, plan);
        assert_eq!(back.check_model(&id).unwrap(), None);
        let other_weights = ModelIdentity {
            content_hash: "zzz".into(),
            ..id.clone()
        };
        let warning = back.check_model(&other_weights).unwrap().unwrap();
        assert!(warning.contains("made on m"), "{warning}");
        let other_depth = ModelIdentity { n_layers: 5, ..id };
        let err = back.check_model(&other_depth).unwrap_err().to_string();
        assert!(
            err.contains("belongs to m") && err.contains("4 vs 5 layers"),
            "{err}"
        );
    }
}
