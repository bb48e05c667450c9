//! Optional per-mode sections of a v2 plan file, under `"sections"`, keyed by
//! the mode's name. A mode that needs one adds a `SectionSpec` to `SECTIONS`
//! and reads / writes its typed form with `Sections::get` / `Sections::set`.
//! A section this build does not know is refused when the file is read: it
//! changes what the plan computes, so running without it would be wrong.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// One kind of section this build understands.
pub struct SectionSpec {
    pub name: &'static str,
    /// One line for error messages and the README.
    pub what: &'static str,
    /// Checks a section's JSON when the file is read (shape, ranges).
    pub check: fn(&serde_json::Value) -> Result<()>,
}

/// Every section this build knows; the modes that need one (drafting,
/// sparsity, routing, attention replacement) add theirs.
pub const SECTIONS: &[SectionSpec] = &[
    SectionSpec {
        name: KV_SECTION,
        what: "a KV-cache budget policy for long context, in `eval --kv` syntax",
        check: check_kv,
    },
    SectionSpec {
        name: crate::surgery::replace::REPLACE_SECTION,
        what: "attention layers replaced by distilled gated linear mixers, and their artifact",
        check: crate::surgery::replace::check_section,
    },
    SectionSpec {
        name: crate::surgery::sparsity::SPARSITY_SECTION,
        what: "contextual sparsity: a head/neuron mask or channel thresholds, as `scalpel sparsify` writes them",
        check: crate::surgery::sparsity::check_section,
    },
    SectionSpec {
        name: crate::model::routing::ROUTING_SECTION,
        what: "token routing: trained per-block routers (an artifact) decide per token which blocks run",
        check: crate::model::routing::check_section,
    },
    SectionSpec {
        name: crate::surgery::heal::HEAL_SECTION,
        what:
            "low-rank corrections of the kept projections (`scalpel heal`), factors in an artifact",
        check: crate::surgery::heal::check_section,
    },
];

/// The name of the KV budget section.
pub const KV_SECTION: &str = "kv";

/// The `kv` section: `{"policy": "quest:512"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvSection {
    pub policy: String,
}

impl KvSection {
    pub fn spec(&self) -> Result<crate::model::kv::KvSpec> {
        self.policy.parse()
    }
}

fn check_kv(value: &serde_json::Value) -> Result<()> {
    let section: KvSection = serde_json::from_value(value.clone())
        .context("expected {\"policy\": \"<policy>\"}, e.g. {\"policy\": \"quest:512\"}")?;
    section.spec().map(|_| ())
}

/// A plan's sections, by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sections(BTreeMap<String, serde_json::Value>);

fn spec(name: &str) -> Option<&'static SectionSpec> {
    SECTIONS.iter().find(|s| s.name == name)
}

fn known_list() -> String {
    if SECTIONS.is_empty() {
        "it knows none".to_string()
    } else {
        let names: Vec<&str> = SECTIONS.iter().map(|s| s.name).collect();
        format!("it knows {}", names.join(", "))
    }
}

fn unknown(name: &str, origin: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{origin}: plan section `{name}` is not known by this scalpel ({}); it was written by a \
         newer scalpel or another tool: update scalpel, or remove the section to run the plan without it",
        known_list()
    )
}

/// Refuses a `"sections"` value that is not an object or names a section
/// this build does not know; checks the known ones.
pub(crate) fn check_known(value: Option<&serde_json::Value>, origin: &str) -> Result<()> {
    let Some(value) = value else {
        return Ok(());
    };
    let Some(map) = value.as_object() else {
        bail!("{origin}: \"sections\" must be an object of named sections");
    };
    for (name, body) in map {
        let spec = spec(name).ok_or_else(|| unknown(name, origin))?;
        (spec.check)(body).with_context(|| format!("{origin}: plan section `{name}`"))?;
    }
    Ok(())
}

impl Sections {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The names of the sections present, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// A section in its typed form; `None` when the plan has none.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        self.0
            .get(name)
            .map(|v| {
                serde_json::from_value(v.clone())
                    .with_context(|| format!("plan section `{name}` is malformed"))
            })
            .transpose()
    }

    /// Stores a section; refuses a name not in `SECTIONS`, so no plan is
    /// written that this build could not read back.
    pub fn set<T: Serialize>(&mut self, name: &str, section: &T) -> Result<()> {
        let spec = spec(name).ok_or_else(|| unknown(name, "this plan"))?;
        let value = serde_json::to_value(section)?;
        (spec.check)(&value).with_context(|| format!("plan section `{name}`"))?;
        self.0.insert(name.to_string(), value);
        Ok(())
    }

    pub fn remove(&mut self, name: &str) -> Option<serde_json::Value> {
        self.0.remove(name)
    }
}
