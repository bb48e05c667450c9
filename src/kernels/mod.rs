//! Quantized matrix kernels for the lean decode path, and the f32
//! matrix–vector product that skips zero inputs (`sparse_input`).
//!
//! The weights stay in the file's own blocks (never widened); each call quantizes the activation
//! rows once to 8-bit blocks and takes integer dot products (AVX-512 VNNI or AVX2, detected at
//! run time, with a portable scalar fallback that is always compiled and tested).

mod acts;
mod formats;
pub mod pool;
pub mod quant;
mod scalar;
pub mod sparse_input;
mod tiles;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use pool::{pool, Pool, Shared};
pub use quant::QWeight;

use std::sync::OnceLock;

/// The instruction-set variant a matmul runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `vpdpbusd` (AVX-512 VNNI with VL), for the 256-bit integer dot products.
    Avx512Vnni,
    /// `vpmaddubsw` + `vpmaddwd` (AVX2 with FMA).
    Avx2,
    /// Plain Rust, any CPU.
    Portable,
}

impl Kernel {
    /// Whether this CPU can run the variant.
    pub fn available(self) -> bool {
        match self {
            Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => {
                Kernel::Avx2.available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest variant this CPU runs.
    pub fn best() -> Kernel {
        [Kernel::Avx512Vnni, Kernel::Avx2]
            .into_iter()
            .find(|k| k.available())
            .unwrap_or(Kernel::Portable)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512Vnni => "avx512-vnni",
            Kernel::Avx2 => "avx2",
            Kernel::Portable => "portable",
        }
    }

    /// Every variant this CPU runs, fastest first (for tests and benches).
    pub fn all_available() -> Vec<Kernel> {
        [Kernel::Avx512Vnni, Kernel::Avx2, Kernel::Portable]
            .into_iter()
            .filter(|k| k.available())
            .collect()
    }
}

/// The variant `QWeight::matmul` uses: the best available, unless the environment variable
/// `SCALPEL_KERNELS` (read once) names another (`portable`, `avx2`, `avx512-vnni`); a name this
/// CPU cannot run falls back to the best available with a note on stderr.
pub fn active_kernel() -> Kernel {
    static ACTIVE: OnceLock<Kernel> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let Ok(wanted) = std::env::var("SCALPEL_KERNELS") else {
            return Kernel::best();
        };
        let chosen = [Kernel::Avx512Vnni, Kernel::Avx2, Kernel::Portable]
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(wanted.trim()));
        match chosen {
            Some(k) if k.available() => k,
            _ => {
                let best = Kernel::best();
                eprintln!(
                    "note: SCALPEL_KERNELS={wanted} is not a kernel this CPU runs \
                     (portable, avx2, avx512-vnni); using {}",
                    best.name()
                );
                best
            }
        }
    })
}
