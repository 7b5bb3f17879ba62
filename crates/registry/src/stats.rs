//! Request and byte counters of a client, per kind of request.
//!
//! Counters are relaxed atomics: cheap on the hot range-read path, and a snapshot is
//! a consistent-enough view for benchmarks and metrics (each field is exact; fields
//! are not read at one instant).

use std::sync::atomic::{AtomicU64, Ordering};

/// What a request is for, for accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Manifest GET/HEAD/PUT.
    Manifest,
    /// Whole-blob GET/HEAD.
    Blob,
    /// Range GET of part of a blob.
    Range,
    /// Upload requests (POST/PATCH/PUT of blobs).
    Upload,
    /// Token service requests.
    Auth,
}

/// A snapshot of a client's counters. Requests count every HTTP request sent,
/// retries included; bytes count payload: bodies of successful responses received
/// (uploads: bodies sent), not error bodies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryStats {
    /// Manifest requests.
    pub manifest_requests: u64,
    /// Manifest bytes received.
    pub manifest_bytes: u64,
    /// Whole-blob requests (GET and HEAD).
    pub blob_requests: u64,
    /// Whole-blob bytes received.
    pub blob_bytes: u64,
    /// Range requests.
    pub range_requests: u64,
    /// Bytes received in answer to range requests (a 200 answer counts what was read).
    pub range_bytes: u64,
    /// Upload requests.
    pub upload_requests: u64,
    /// Bytes uploaded.
    pub upload_bytes: u64,
    /// Token service requests.
    pub auth_requests: u64,
    /// Requests repeated after a transient failure.
    pub retries: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    manifest_requests: AtomicU64,
    manifest_bytes: AtomicU64,
    blob_requests: AtomicU64,
    blob_bytes: AtomicU64,
    range_requests: AtomicU64,
    range_bytes: AtomicU64,
    upload_requests: AtomicU64,
    upload_bytes: AtomicU64,
    auth_requests: AtomicU64,
    retries: AtomicU64,
}

impl Counters {
    fn pair(&self, kind: RequestKind) -> (&AtomicU64, &AtomicU64) {
        match kind {
            RequestKind::Manifest => (&self.manifest_requests, &self.manifest_bytes),
            RequestKind::Blob => (&self.blob_requests, &self.blob_bytes),
            RequestKind::Range => (&self.range_requests, &self.range_bytes),
            RequestKind::Upload => (&self.upload_requests, &self.upload_bytes),
            // Token bodies are not interesting data volume.
            RequestKind::Auth => (&self.auth_requests, &self.auth_requests),
        }
    }

    pub fn request(&self, kind: RequestKind) {
        self.pair(kind).0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn bytes(&self, kind: RequestKind, n: u64) {
        if kind != RequestKind::Auth {
            self.pair(kind).1.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> RegistryStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RegistryStats {
            manifest_requests: g(&self.manifest_requests),
            manifest_bytes: g(&self.manifest_bytes),
            blob_requests: g(&self.blob_requests),
            blob_bytes: g(&self.blob_bytes),
            range_requests: g(&self.range_requests),
            range_bytes: g(&self.range_bytes),
            upload_requests: g(&self.upload_requests),
            upload_bytes: g(&self.upload_bytes),
            auth_requests: g(&self.auth_requests),
            retries: g(&self.retries),
        }
    }
}
