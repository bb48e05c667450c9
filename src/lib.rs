//! scalpel: a workbench for LLM block surgery. Data flows one way:
//! model files → a model run under a plan → measurements → better plans.
//! Modules depend downward only: `model` → `plan` → `eval` / `surgery` /
//! `export` / `report` → `setup` → the front ends (`tui`, and `commands` with
//! `cli`, the only users of clap); `tests/architecture.rs` holds this.

pub mod cli;
pub mod commands;
pub mod eval;
pub mod export;
pub mod kernels;
pub mod model;
pub mod plan;
pub mod progress;
pub mod report;
pub mod setup;
pub mod surgery;
pub mod tui;
