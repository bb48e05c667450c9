//! One module per subcommand: argument handling and output; the work
//! itself lives in the library modules.

pub mod bench;
pub mod compare;
pub mod eval;
pub mod export;
pub mod fetch;
pub mod fit;
pub mod generate;
pub mod heal;
pub mod importance;
pub mod info;
pub mod report;
pub mod search;
pub mod speculate;
pub mod surgery_common;
