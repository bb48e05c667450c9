//! The layers point one way: the engine and the workbench never reach up into
//! the command line (`cli`, `commands`), and clap stays in `cli.rs`,
//! `commands/` and `main.rs`. Scans the source, naming each file and line
//! that breaks the rule.

use std::path::{Path, PathBuf};

/// Folders and files below the front ends: they may not import `cli` or `commands`.
const LOWER_LAYERS: &[&str] = &[
    "surgery/",
    "eval/",
    "model/",
    "export/",
    "report/",
    "tui/",
    "plan.rs",
    "progress.rs",
    "setup.rs",
];

/// Where clap may be used.
const CLAP_ALLOWED: &[&str] = &["cli.rs", "commands/", "main.rs"];

/// clap's derives and field attributes.
const CLAP_DERIVES: &[&str] = &["ValueEnum", "Parser", "Subcommand", "Args"];
const CLAP_ATTRIBUTES: &[&str] = &["#[arg(", "#[command(", "#[clap(", "#[value("];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/`-relative path with `/` separators.
fn relative(src: &Path, file: &Path) -> String {
    file.strip_prefix(src)
        .unwrap()
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

fn in_any(rel: &str, places: &[&str]) -> bool {
    places.iter().any(|p| rel == *p || rel.starts_with(p))
}

/// Code lines with their numbers, `//` comments removed (docs may name anything).
fn code_lines(text: &str) -> Vec<(usize, String)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split("//").next().unwrap_or("").to_string()))
        .collect()
}

/// Paths into `cli` or `commands`: `crate::cli`, `scalpel::commands::…`, and
/// the same inside a grouped import `use crate::{cli, …}`.
fn reaches_front_end(line: &str) -> bool {
    let names = ["cli", "commands"];
    for root in ["crate::", "scalpel::"] {
        let mut rest = line;
        while let Some(at) = rest.find(root) {
            rest = &rest[at + root.len()..];
            let segment: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if names.contains(&segment.as_str()) {
                return true;
            }
            if let Some(group) = rest.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or("");
                if inner
                    .split(',')
                    .any(|item| names.contains(&item.trim().split("::").next().unwrap_or("")))
                {
                    return true;
                }
            }
        }
    }
    false
}

/// A use of clap: its paths, its derives or its attributes.
fn uses_clap(line: &str) -> bool {
    let word = |w: &str| {
        line.match_indices(w).any(|(at, _)| {
            let before = line[..at].chars().next_back();
            let after = line[at + w.len()..].chars().next();
            !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
                && !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
    };
    if word("clap") || CLAP_ATTRIBUTES.iter().any(|a| line.contains(a)) {
        return true;
    }
    let Some(at) = line.find("#[derive(") else {
        return false;
    };
    line[at + "#[derive(".len()..]
        .split(')')
        .next()
        .unwrap_or("")
        .split(',')
        .map(|d| d.trim().rsplit("::").next().unwrap_or(""))
        .any(|d| CLAP_DERIVES.contains(&d))
}

/// Every (file:line: text) in `src/` that `breaks` flags, among the files `checked` selects.
fn violations(checked: impl Fn(&str) -> bool, breaks: impl Fn(&str) -> bool) -> Vec<String> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(
        files.len() > 20,
        "found only {} files under src/",
        files.len()
    );
    let mut found = Vec::new();
    for file in files {
        let rel = relative(&src, &file);
        if !checked(&rel) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in code_lines(&text) {
            if breaks(&line) {
                found.push(format!("src/{rel}:{n}: {}", line.trim()));
            }
        }
    }
    found
}

#[test]
fn lower_layers_never_import_the_command_line() {
    let found = violations(|rel| in_any(rel, LOWER_LAYERS), reaches_front_end);
    assert!(
        found.is_empty(),
        "these files below the front ends reach up into `cli`/`commands` (move what they need \
         into `setup` or the engine, taking plain values):\n{}",
        found.join("\n")
    );
}

#[test]
fn clap_stays_in_the_command_line_layer() {
    let found = violations(|rel| !in_any(rel, CLAP_ALLOWED), uses_clap);
    assert!(
        found.is_empty(),
        "clap is used outside cli.rs, commands/ and main.rs (map a plain type to a clap one in \
         cli.rs):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_scanners_catch_what_they_must() {
    assert!(reaches_front_end("use crate::cli::{self, ModelArgs};"));
    assert!(reaches_front_end(
        "use crate::commands::eval::DEFAULT_EVAL_TEXT;"
    ));
    assert!(reaches_front_end("use crate::{cli, plan::Plan};"));
    assert!(reaches_front_end(
        "use crate::{plan::Plan, commands::eval};"
    ));
    assert!(reaches_front_end("let m = crate::cli::load_model(a)?;"));
    assert!(!reaches_front_end("use crate::eval::data::TokenSet;"));
    assert!(!reaches_front_end("use crate::client::X;"));
    assert!(uses_clap(
        "#[derive(Debug, Clone, Serialize, clap::ValueEnum)]"
    ));
    assert!(uses_clap("#[derive(ValueEnum, Debug)]"));
    assert!(uses_clap("#[arg(long, value_enum)]"));
    assert!(uses_clap("use clap::Parser;"));
    assert!(!uses_clap("#[derive(Debug, Clone, Copy, PartialEq)]"));
    assert!(!uses_clap("let clapped = 1;"));
    assert_eq!(code_lines("x // use crate::cli")[0].1, "x ");
}
