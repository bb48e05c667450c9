//! KV budget policies as written on the command line and in plan files:
//! `full`, `window:B`, `streaming:B[:SINKS]`, `h2o:B[:RECENT_SHARE]`,
//! `snapkv:B[:WINDOW[:KERNEL]]`, `quest:B[:PAGE[:DENSE]]`. Budgets are in tokens
//! (keys kept per layer and KV head).

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Result};

/// StreamingLLM's attention sinks: the first four tokens.
pub const DEFAULT_SINKS: usize = 4;
/// H2O: half the budget for recent tokens, half for heavy hitters.
pub const DEFAULT_RECENT_SHARE: f64 = 0.5;
/// SnapKV's defaults (`snapkv_utils.py`): 32 observed queries, pooling 5.
pub const DEFAULT_OBSERVATION: usize = 32;
pub const DEFAULT_KERNEL: usize = 5;
/// Quest's page (chunk) size.
pub const DEFAULT_PAGE: usize = 16;
/// Quest leaves the first two layers dense, as its reference does
/// (`evaluation/quest_attention.py`): their attention is not sparse.
pub const DEFAULT_DENSE_LAYERS: usize = 2;

#[derive(Debug, Clone, PartialEq)]
pub enum KvSpec {
    /// Every key (the model as it is).
    Full,
    /// The most recent `budget` keys.
    Window { budget: usize },
    /// The first `sinks` keys plus the most recent `budget - sinks`.
    Streaming { budget: usize, sinks: usize },
    /// Recent `budget · recent_share` keys plus the heavy hitters (largest
    /// accumulated attention) per KV head; evicts after every pass.
    H2o { budget: usize, recent_share: f64 },
    /// After each prefill pass, per KV head: the last `observation` queries'
    /// attention, average-pooled over `kernel` neighbouring keys, picks
    /// `budget - observation` keys; the observed queries' keys stay.
    /// Decode steps do not compress.
    SnapKv {
        budget: usize,
        observation: usize,
        kernel: usize,
    },
    /// Nothing evicted; per query and KV head, the `budget / page` pages
    /// with the highest upper bound of q·k (from each page's per-channel
    /// key min and max) are attended to; the first `dense_layers` layers
    /// attend to every key.
    Quest {
        budget: usize,
        page: usize,
        dense_layers: usize,
    },
}

pub const POLICY_NAMES: &str = "full, window:B, streaming:B[:SINKS], h2o:B[:RECENT_SHARE], \
                                snapkv:B[:WINDOW[:KERNEL]], quest:B[:PAGE[:DENSE]]";

impl KvSpec {
    /// The token budget; `None` for the full cache.
    pub fn budget(&self) -> Option<usize> {
        match *self {
            Self::Full => None,
            Self::Window { budget }
            | Self::Streaming { budget, .. }
            | Self::H2o { budget, .. }
            | Self::SnapKv { budget, .. }
            | Self::Quest { budget, .. } => Some(budget),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Window { .. } => "window",
            Self::Streaming { .. } => "streaming",
            Self::H2o { .. } => "h2o",
            Self::SnapKv { .. } => "snapkv",
            Self::Quest { .. } => "quest",
        }
    }

    /// Whether the cache itself shrinks (evicting methods), as opposed to
    /// Quest, which keeps every key and selects per query.
    pub fn evicts(&self) -> bool {
        !matches!(self, Self::Full | Self::Quest { .. })
    }

    /// Parses a comma-separated list (`quest:512,h2o:512`).
    pub fn parse_list(s: &str) -> Result<Vec<Self>> {
        s.split(',')
            .map(|p| p.trim().parse())
            .collect::<Result<Vec<_>>>()
    }
}

fn field<T: FromStr>(spec: &str, what: &str, s: Option<&str>, default: T) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    match s {
        None => Ok(default),
        Some(v) => v
            .parse()
            .with_context(|| format!("KV policy `{spec}`: {what} `{v}` is not a number")),
    }
}

impl FromStr for KvSpec {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> Result<Self> {
        let mut parts = spec.split(':');
        let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let args: Vec<&str> = parts.collect();
        if name == "full" {
            if !args.is_empty() {
                bail!("KV policy `{spec}`: `full` takes no budget");
            }
            return Ok(Self::Full);
        }
        let max_args = match name.as_str() {
            "window" => 1,
            "streaming" | "h2o" => 2,
            "snapkv" | "quest" => 3,
            _ => bail!("unknown KV policy `{spec}`: use one of {POLICY_NAMES}"),
        };
        if args.len() > max_args {
            bail!("KV policy `{spec}`: too many fields (the forms are {POLICY_NAMES})");
        }
        let Some(budget) = args.first() else {
            bail!("KV policy `{spec}` needs a budget in tokens, e.g. `{name}:512`");
        };
        let budget: usize = field(spec, "the budget", Some(budget), 0)?;
        if budget == 0 {
            bail!("KV policy `{spec}`: the budget must be at least 1 token");
        }
        let arg = |i: usize| args.get(i).copied();
        let parsed = match name.as_str() {
            "window" => Self::Window { budget },
            "streaming" => {
                let sinks = field(spec, "the sink count", arg(1), DEFAULT_SINKS)?;
                if sinks >= budget {
                    bail!("KV policy `{spec}`: {sinks} sinks leave no room for recent tokens in a budget of {budget}");
                }
                Self::Streaming { budget, sinks }
            }
            "h2o" => {
                let recent_share = field(spec, "the recent share", arg(1), DEFAULT_RECENT_SHARE)?;
                if !(0.0..=1.0).contains(&recent_share) {
                    bail!("KV policy `{spec}`: the recent share must be between 0 and 1");
                }
                Self::H2o {
                    budget,
                    recent_share,
                }
            }
            "snapkv" => {
                let observation =
                    field(spec, "the observation window", arg(1), DEFAULT_OBSERVATION)?;
                let kernel = field(spec, "the pooling kernel", arg(2), DEFAULT_KERNEL)?;
                if observation == 0 || observation >= budget {
                    bail!("KV policy `{spec}`: the observation window must be between 1 and the budget ({budget}) minus one");
                }
                if kernel == 0 || kernel % 2 == 0 {
                    bail!("KV policy `{spec}`: the pooling kernel must be odd (1, 3, 5, …)");
                }
                Self::SnapKv {
                    budget,
                    observation,
                    kernel,
                }
            }
            "quest" => {
                let page = field(spec, "the page size", arg(1), DEFAULT_PAGE)?;
                if page == 0 {
                    bail!("KV policy `{spec}`: the page size must be at least 1 token");
                }
                if budget < 2 * page {
                    bail!("KV policy `{spec}`: a budget of {budget} holds fewer than 2 pages of {page} (the first page and the query's own are always kept); raise the budget or lower the page size");
                }
                let dense_layers =
                    field(spec, "the dense layer count", arg(2), DEFAULT_DENSE_LAYERS)?;
                Self::Quest {
                    budget,
                    page,
                    dense_layers,
                }
            }
            _ => unreachable!("names checked above"),
        };
        Ok(parsed)
    }
}

impl fmt::Display for KvSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Full => write!(f, "full"),
            Self::Window { budget } => write!(f, "window:{budget}"),
            Self::Streaming { budget, sinks } => write!(f, "streaming:{budget}:{sinks}"),
            Self::H2o {
                budget,
                recent_share,
            } => write!(f, "h2o:{budget}:{recent_share}"),
            Self::SnapKv {
                budget,
                observation,
                kernel,
            } => write!(f, "snapkv:{budget}:{observation}:{kernel}"),
            Self::Quest {
                budget,
                page,
                dense_layers,
            } => write!(f, "quest:{budget}:{page}:{dense_layers}"),
        }
    }
}
