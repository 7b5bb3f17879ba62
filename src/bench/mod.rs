//! zest's cold-start benchmark tooling: everything `zest bench` needs beside zest
//! itself.
//!
//! - [`link`]: the userspace network link emulator put in front of a registry
//!   (the kernels we run on have no `netem`).
//! - [`results`]: the data model of a run (samples, context, summaries, the
//!   lower bound).
//!
//! Nothing here is used by the snapshotter.

pub mod link;
pub mod results;
