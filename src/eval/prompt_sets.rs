//! The prompt sets for measuring speculative decoding (`assets/prompts/`,
//! written for scalpel): six kinds of ten prompts, after Spec-Bench's
//! categories. Files are JSON lines, `{"kind": …, "prompt": …}`; a plain
//! text file is one prompt per line.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The built-in sets, in table order.
pub const KINDS: [(&str, &str); 6] = [
    (
        "conversation",
        include_str!("../../assets/prompts/conversation.jsonl"),
    ),
    (
        "instructions",
        include_str!("../../assets/prompts/instructions.jsonl"),
    ),
    (
        "summarisation",
        include_str!("../../assets/prompts/summarisation.jsonl"),
    ),
    ("qa", include_str!("../../assets/prompts/qa.jsonl")),
    (
        "reasoning",
        include_str!("../../assets/prompts/reasoning.jsonl"),
    ),
    ("code", include_str!("../../assets/prompts/code.jsonl")),
];

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Prompt {
    pub kind: String,
    pub prompt: String,
}

/// A built-in set by name (`all`: every kind, in order), at most
/// `per_kind` prompts of each kind.
pub fn builtin(name: &str, per_kind: Option<usize>) -> Result<Vec<Prompt>> {
    let chosen: Vec<_> = KINDS
        .iter()
        .filter(|(kind, _)| name == "all" || name == *kind)
        .collect();
    if chosen.is_empty() {
        let names: Vec<_> = KINDS.iter().map(|(k, _)| *k).collect();
        bail!(
            "no built-in prompt set `{name}`; choose one of: all, {}",
            names.join(", ")
        );
    }
    let mut out = Vec::new();
    for (kind, text) in chosen {
        let set = parse_jsonl(text, kind)?;
        out.extend(set.into_iter().take(per_kind.unwrap_or(usize::MAX)));
    }
    Ok(out)
}

/// Prompts from a file: JSON lines (`.jsonl`; `kind` defaults to the file
/// name) or one prompt per line.
pub fn from_file(path: &Path) -> Result<Vec<Prompt>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let stem = path
        .file_stem()
        .map_or("prompts".into(), |s| s.to_string_lossy().into_owned());
    let prompts = if path.extension().is_some_and(|e| e == "jsonl") {
        parse_jsonl(&text, &stem).with_context(|| format!("in {}", path.display()))?
    } else {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| Prompt {
                kind: stem.clone(),
                prompt: l.to_string(),
            })
            .collect()
    };
    if prompts.is_empty() {
        bail!("{} has no prompts", path.display());
    }
    Ok(prompts)
}

fn parse_jsonl(text: &str, default_kind: &str) -> Result<Vec<Prompt>> {
    #[derive(Deserialize)]
    struct Line {
        kind: Option<String>,
        prompt: String,
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(line).with_context(|| {
            format!(
                "line {}: expected a JSON object with a \"prompt\" string",
                i + 1
            )
        })?;
        out.push(Prompt {
            kind: l.kind.unwrap_or_else(|| default_kind.to_string()),
            prompt: l.prompt,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_kind_has_ten_distinct_prompts() {
        let all = builtin("all", None).unwrap();
        assert_eq!(all.len(), 60);
        for (kind, _) in KINDS {
            let set = builtin(kind, None).unwrap();
            assert_eq!(set.len(), 10, "{kind}");
            assert!(set.iter().all(|p| p.kind == kind && !p.prompt.is_empty()));
        }
        let mut texts: Vec<_> = all.iter().map(|p| &p.prompt).collect();
        texts.sort();
        texts.dedup();
        assert_eq!(texts.len(), 60);
        assert_eq!(builtin("code", Some(3)).unwrap().len(), 3);
        let err = builtin("poetry", None).unwrap_err().to_string();
        assert!(err.contains("choose one of: all, conversation"), "{err}");
    }

    #[test]
    fn a_bad_jsonl_line_is_named() {
        let err = parse_jsonl("{\"prompt\": \"a\"}\nnot json\n", "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        assert_eq!(
            parse_jsonl("{\"prompt\": \"a\"}", "x").unwrap()[0].kind,
            "x"
        );
    }
}
