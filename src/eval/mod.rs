//! What the user measures: perplexity and agreement with the base model,
//! generation, and speed.

pub mod bench;
pub mod data;
pub mod generate;
pub mod kv;
pub mod needle;
pub mod perplexity;
pub mod prompt_sets;
pub mod score;
pub mod speculative;
