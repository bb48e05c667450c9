//! One module per subcommand: argument handling and output; the work
//! itself lives in the library modules.

pub mod bench;
pub mod eval;
pub mod export;
pub mod fetch;
pub mod generate;
pub mod info;
pub mod report;
