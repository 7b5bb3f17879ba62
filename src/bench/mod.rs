//! zest's cold-start benchmark tooling: everything `zest bench` needs beside zest
//! itself.
//!
//! - [`link`]: the userspace network link emulator put in front of a registry
//!   (the kernels we run on have no `netem`).
//! - [`results`]: the data model of a run (samples, context, summaries, the
//!   lower bound).
//! - [`report`]: a run rendered as markdown (context, tables per link profile,
//!   goals checked against the figures) and as a standalone SVG chart.
//!
//! Nothing here is used by the snapshotter.

pub mod link;
pub mod report;
pub mod results;
