//! `scalpel fetch`: put the model in the cache (for offline use later).

use anyhow::Result;

use crate::cli::ModelArgs;
use crate::model::source;

pub fn run(margs: &ModelArgs) -> Result<()> {
    let resolved = source::resolve(margs.model.as_deref(), margs.offline)?;
    eprintln!("scalpel: {}", resolved.origin);
    println!("{}", resolved.local.path().display());
    Ok(())
}
