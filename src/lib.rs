//! scalpel: a workbench for LLM block surgery. Data flows one way:
//! model files → a model run under a plan → measurements → better plans.

pub mod cli;
pub mod commands;
pub mod eval;
pub mod export;
pub mod model;
pub mod plan;
pub mod progress;
pub mod report;
pub mod surgery;
pub mod tui;
