//! What the user changes: block importance, Hopscotch scale fitting, the
//! greedy search, and the comparison against training-free selections.

pub mod compare;
pub mod fit;
pub mod hopscotch;
pub mod importance;
pub mod objective;
