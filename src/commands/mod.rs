//! One module per subcommand: argument handling and output; the work
//! itself lives in the library modules.

pub mod bench;
pub mod compare;
pub mod compare_replace;
pub mod eval;
pub mod export;
pub mod fetch;
pub mod fit;
pub mod generate;
pub mod heal;
pub mod importance;
pub mod info;
pub mod needle;
pub mod replace;
pub mod report;
pub mod route;
pub mod search;
pub mod sparsify;
pub mod speculate;
pub mod surgery_common;
