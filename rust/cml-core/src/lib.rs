//! cml-core: the native core of cml-rs, Collaborative Metric Learning
//! (Hsieh et al., WWW 2017) with a Rust engine.
//!
//! Pure Rust with no Python in it: slices in, owned results out. The PyO3
//! binding (`rust/cml-py`) validates Python input, releases the GIL and calls
//! these functions. Each module states its algorithm, invariants and cost.
//!
//! - [`sampler`]: the WARP negative sampler with background prefetch.
//! - [`rank`]: WARP rank weights and hardest negatives.
//! - [`kernel`], [`topk`]: register-blocked distance kernels and exact top-K.
//! - [`lsh`]: p-stable LSH index with multi-probe and exact re-ranking.
//! - [`vectors`]: the types searches share (borrowed vectors, top-K selection, results).
//! - [`csr`]: validated sparse rows (positives, exclusions).
//! - [`rng`], [`parallel`]: seeded streams and thread pools that keep results
//!   independent of the thread count.
//!
//! The modules form a stack without cycles: `rng`, `parallel`, `error`,
//! `alloc`, `csr` and `vectors` at the bottom, then `kernel`, then `topk` and `rank`, then
//! `lsh` and `sampler`.

pub mod alloc;
pub mod csr;
pub mod error;
pub mod kernel;
pub mod lsh;
pub mod parallel;
pub mod rank;
pub mod rng;
pub mod sampler;
pub mod topk;
pub mod vectors;

pub use csr::Csr;
pub use error::{CoreError, Result};
pub use sampler::{Batch, BatchStream, SamplerConfig, WarpSampler};
pub use topk::topk_l2;
pub use vectors::{Neighbours, Vectors};
