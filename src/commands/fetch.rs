//! `scalpel fetch`: put the model in the cache (for offline use later).

use anyhow::{bail, Result};

use crate::cli::{FetchArgs, ModelArgs};
use crate::model::source;

pub fn run(margs: &ModelArgs, args: &FetchArgs) -> Result<()> {
    let spec = match (&args.name, &margs.model) {
        (Some(name), _) if name != source::GEMMA3_NAME => bail!(
            "scalpel knows no model named `{name}`; known: {}. For any other model pass \
             --model PATH or a hub id",
            source::GEMMA3_NAME
        ),
        (Some(name), Some(model)) if model != name => {
            bail!("`scalpel fetch {name}` and --model {model} name different models; give one")
        }
        (Some(name), _) => Some(name.as_str()),
        (None, model) => model.as_deref(),
    };
    let resolved = source::resolve(spec, margs.offline)?;
    eprintln!("scalpel: {}", resolved.origin);
    println!("{}", resolved.local.path().display());
    Ok(())
}
