//! Image tools: programs that read an image from one [`ImageStore`] and write a new
//! one to another.
//!
//! - [`convert`]: every layer of an image (or of every platform of an index) to
//!   zstd:chunked, with the same diff_ids;
//! - [`optimize`]: startup profiles: run the image's command on a lazy mount in a
//!   sandbox, record what it reads, and republish its layers with those files first
//!   and prefetched;
//! - [`sandbox`]: the Linux sandbox `optimize` runs the workload in (private mount
//!   namespace, throw-away overlay, chroot, process group, timeout, ready line).
//!
//! Both publish nothing unverified and leave the source image untouched.
//!
//! [`ImageStore`]: zest_store::ImageStore

pub mod convert;
pub mod optimize;
pub mod sandbox;
