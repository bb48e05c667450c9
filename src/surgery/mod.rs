//! What the user changes: block importance, Hopscotch scale fitting, the
//! greedy search, and the comparison against training-free selections.

pub mod compare;
pub mod fit;
pub mod heal;
pub mod hopscotch;
pub mod importance;
pub mod objective;
pub mod recovery;
pub mod replace;
pub mod routing;
pub mod sparsity;
pub mod speculative_search;

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;

/// `Ok(None)` when `result` failed because `cancel` was set (the work was
/// cancelled, not broken); other errors pass through.
pub fn unless_cancelled<T>(result: Result<T>, cancel: &AtomicBool) -> Result<Option<T>> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(_) if cancel.load(Ordering::Relaxed) => Ok(None),
        Err(e) => Err(e),
    }
}
