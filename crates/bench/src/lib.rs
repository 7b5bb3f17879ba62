//! zest's cold-start benchmark tooling: everything `zest bench` needs beside zest
//! itself.
//!
//! - [`link`]: the userspace network link emulator put in front of a registry
//!   (the kernels we run on have no `netem`).
//! - [`workload`]: what is started (image, command, ready line).
//! - [`runner`]: runs the plan: a link per profile, a fresh containerd and
//!   `zest serve` per sample, pull and run to ready, counters.
//! - [`results`]: the data model of a run (samples, context, summaries, the
//!   lower bound).
//! - [`report`]: a run rendered as markdown (context, tables per link profile,
//!   goals checked against the figures) and as a standalone SVG chart.
//!
//! Dependencies point one way: `runner` uses the library's registry, store
//! and fetch modules and drives containerd and zest as separate processes;
//! `report` reads `results`; nothing here is used by the snapshotter.

pub mod link;
pub mod report;
pub mod results;
pub mod runner;
pub mod workload;
