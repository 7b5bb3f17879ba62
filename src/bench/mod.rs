//! zest's benchmark tooling: the pieces a cold-start benchmark needs beside zest
//! itself, such as [`link`], the userspace network link emulator put in front of a
//! registry (the kernels we run on have no `netem`).

pub mod link;
