//! Speculative batching of misses for layers nobody profiled: when a read
//! misses, the range request that serves it also carries chunks the workload
//! is likely to read next, so a cold start waits on fewer round trips.
//!
//! Two sources of guesses, both bounded in bytes:
//! - **neighbours**: the small files that follow the missed file in blob order
//!   (tar order is directory order, and files of one directory are often read
//!   together). Only whole small files are taken, the walk stops at the first
//!   large file or at a hole wider than [`FetchConfig::max_gap_bytes`] (so the
//!   extra bytes ride in the same request), and it takes at most
//!   [`FetchConfig::speculative_neighbour_bytes`], cut to one bandwidth-delay
//!   product of the registry once that is measured;
//! - **directories read together**: the first miss in a directory of shared
//!   libraries or interpreter modules (`lib`, `lib64`, multiarch lib dirs,
//!   python's `lib-dynload`, `site-packages`, `__pycache__`, a directory where
//!   a `.so` was missed, ...) also fetches that directory's small files, up to
//!   [`FetchConfig::speculative_dir_bytes`]. A later miss of another small
//!   file there shows the batch fell short (python imports the modules of
//!   its `__pycache__` in dependency order, not name order): it fetches more
//!   of the directory with twice the previous budget, up to
//!   [`MAX_DIR_BATCHES`] batches per directory;
//! - **the end of a program**: a miss at offset 0 of an executable or a shared
//!   object also fetches its last [`PROGRAM_TAIL_BYTES`]. An ELF file's
//!   writable segment (relocated data, the dynamic section) is its last
//!   loaded part, and it is touched right after the header: the kernel zeroes
//!   the end of an executable's data when it maps it, the loader relocates a
//!   library's. Fetching it with the header saves one round trip per program
//!   and library, and lets library prefetch read the dynamic section without
//!   a round trip of its own.
//!
//! Guessing pauses while the guessed bytes no read has used exceed the other
//! bytes fetched for reads, which bounds the bytes fetched to about twice the
//! working set whatever the workload.
//!
//! Speculative chunks are fetched, verified and cached exactly like wanted
//! ones (they go through the same claim and `fetch_run`). The ledger here
//! counts the bytes fetched speculatively and those a read later used, so
//! operators can see what the guesses cost ([`FetchStatsSnapshot`]).
//!
//! [`FetchConfig::max_gap_bytes`]: crate::FetchConfig::max_gap_bytes
//! [`FetchConfig::speculative_neighbour_bytes`]: crate::FetchConfig::speculative_neighbour_bytes
//! [`FetchConfig::speculative_dir_bytes`]: crate::FetchConfig::speculative_dir_bytes
//! [`FetchStatsSnapshot`]: crate::FetchStatsSnapshot

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

use super::inflight::Claim;
use super::{Fetcher, Owned, Why};
use zest_format::{Chunk, EntryId, EntryKind};
use zest_oci::digest::Digest;

/// Speculatively fetched chunks remembered until a read uses them; past this
/// many, new ones are fetched but not tracked (bounds memory; the used figure
/// is then a lower bound).
const MAX_TRACKED_CHUNKS: usize = 1 << 16;

/// Directories whose batches are counted; past this many the map is reset.
const MAX_TRACKED_DIRS: usize = 4096;

/// Batches of one directory at most (budgets 1, 2, 4, 8 times
/// `speculative_dir_bytes`).
pub const MAX_DIR_BATCHES: u32 = 4;

/// Files examined per neighbour walk or directory batch (bounds CPU per miss).
const MAX_FILES_EXAMINED: usize = 512;

/// Bytes at the end of a program or library fetched with its first miss at
/// offset 0 (see the module doc): the writable segment and the dynamic
/// section of most binaries fit (measured on Debian's: 16-60 KiB).
pub const PROGRAM_TAIL_BYTES: u64 = 128 << 10;

/// Unused speculative bytes always allowed, however little was read on demand.
const UNUSED_FLOOR: u64 = 1 << 20;

/// Speculative chunks not yet read, and the directories already batched.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// Digest -> compressed length, and whether it was a guess about another
    /// file, of chunks fetched speculatively and not yet read.
    unused: Mutex<HashMap<Digest, (u32, bool)>>,
    /// Compressed bytes of guesses about other files fetched, and of those
    /// not read yet (read-ahead in a file is left out: a sequential reader
    /// uses it).
    guessed: AtomicU64,
    guessed_unused: AtomicU64,
    /// `unused.len()`, readable without the lock (the read path skips the lock
    /// when nothing is pending).
    pending: AtomicUsize,
    /// Batches fetched per directory.
    dirs: Mutex<HashMap<EntryId, u32>>,
}

impl Ledger {
    /// Records a chunk fetched speculatively.
    pub(crate) fn fetched(&self, digest: Digest, compressed_len: u32, guess: bool) {
        let len = u64::from(compressed_len);
        if guess {
            self.guessed.fetch_add(len, Ordering::Relaxed);
        }
        let mut m = self.unused.lock();
        if m.len() < MAX_TRACKED_CHUNKS {
            // Keep `guessed_unused` the sum of the guesses in the map, also
            // when an entry is replaced.
            if let Some((old_len, true)) = m.insert(digest, (compressed_len, guess)) {
                self.forget_guess(u64::from(old_len));
            }
            if guess {
                self.guessed_unused.fetch_add(len, Ordering::Relaxed);
            }
            self.pending.store(m.len(), Ordering::Relaxed);
        }
    }

    fn forget_guess(&self, len: u64) {
        let _ = self
            .guessed_unused
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(len))
            });
    }

    /// A read used `digest`: its compressed length if it was fetched
    /// speculatively and this is its first use.
    pub(crate) fn used(&self, digest: &Digest) -> Option<u32> {
        if self.pending.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut m = self.unused.lock();
        let found = m.remove(digest);
        self.pending.store(m.len(), Ordering::Relaxed);
        drop(m);
        let (len, guess) = found?;
        if guess {
            self.forget_guess(u64::from(len));
        }
        Some(len)
    }

    /// Counts a batch of `dir`: the number of batches before it, or `None`
    /// when it may not have one (it had one and `again` is false, or it had
    /// [`MAX_DIR_BATCHES`]).
    fn next_batch_of(&self, dir: EntryId, again: bool) -> Option<u32> {
        let mut d = self.dirs.lock();
        if d.len() >= MAX_TRACKED_DIRS && !d.contains_key(&dir) {
            d.clear();
        }
        let n = d.entry(dir).or_insert(0);
        if *n >= MAX_DIR_BATCHES || (*n > 0 && !again) {
            return None;
        }
        *n += 1;
        Some(*n - 1)
    }
}

/// Whether a file is likely an ELF program or library: executable by
/// someone, or named like a shared object.
pub(crate) fn may_be_program(mode: u32, name: &[u8]) -> bool {
    mode & 0o111 != 0 || is_shared_object(name)
}

/// Whether a file name is a shared object (`libfoo.so`, `libfoo.so.6`,
/// `_ssl.cpython-311-x86_64-linux-gnu.so`).
fn is_shared_object(name: &[u8]) -> bool {
    name.ends_with(b".so") || name.windows(4).any(|w| w == b".so.")
}

/// Whether the files of directory `path` (slash separated, no leading slash)
/// are typically read together at start: the dynamic loader's and
/// interpreters' module directories.
pub(crate) fn read_together(path: &str) -> bool {
    let mut comps = path.split('/').filter(|c| !c.is_empty());
    let last = path.rsplit('/').find(|c| !c.is_empty()).unwrap_or("");
    let lib_dir = matches!(last, "lib" | "lib64" | "lib32" | "libx32")
        || last.ends_with("-linux-gnu")
        || last.ends_with("-linux-musl")
        || last.ends_with("-linux-gnueabihf");
    lib_dir
        || comps.any(|c| {
            matches!(
                c,
                "lib-dynload" | "site-packages" | "dist-packages" | "__pycache__" | "node_modules"
            )
        })
}

impl Fetcher {
    /// Whether misses may still guess about other files: not while the
    /// guessed bytes no read has used exceed the other bytes fetched for
    /// reads (and [`UNUSED_FLOOR`]). That keeps the bytes fetched under about
    /// twice what reads fetch however badly the guesses fit a workload;
    /// guessing resumes as reads use them.
    pub(crate) fn may_speculate(&self) -> bool {
        let s = self.stats.snapshot();
        let unused = self.ledger.guessed_unused.load(Ordering::Relaxed);
        let guessed = self.ledger.guessed.load(Ordering::Relaxed);
        let reads = s
            .bytes_fetched
            .saturating_sub(guessed)
            .saturating_sub(s.prefetch_bytes);
        unused <= reads.max(UNUSED_FLOOR)
    }

    /// The compressed bytes still to fetch of file `id`, or `None` when it is
    /// not a small regular file (larger than `speculative_file_bytes`).
    fn small_file_chunks(&self, id: EntryId) -> Option<(&[Chunk], u64)> {
        let e = self.index.entry(id);
        if e.kind() != EntryKind::Reg {
            return None;
        }
        let chunks = e.chunks();
        let total: u64 = chunks.iter().map(|c| u64::from(c.compressed_len)).sum();
        (total <= self.config.speculative_file_bytes).then_some((chunks, total))
    }

    /// Claims the uncached chunks of `chunks` for a speculative fetch; returns
    /// the bytes claimed.
    fn claim_speculative(&self, chunks: &[Chunk], owned: &mut Vec<Owned>) -> u64 {
        let mut taken = 0;
        for c in chunks {
            if !self.needs_fetch(c) {
                continue;
            }
            let Some(idx) = self.chunk_index(c) else {
                continue;
            };
            if let Claim::Owner(guard) = self.inflight.claim(c.digest) {
                // Re-check after claiming; complete rather than drop (dropping
                // reports a failure to waiters).
                match self.cache.memory().get(&c.digest) {
                    Some(b) => guard.complete(Ok(b)),
                    None => {
                        taken += u64::from(c.compressed_len);
                        owned.push(Owned {
                            idx,
                            guard,
                            why: Why::Guess,
                        });
                    }
                }
            }
        }
        taken
    }

    /// Claims the small files after file `id` in blob order (see the module
    /// doc), starting the gap check at blob offset `end` (the end of what the
    /// read already fetches).
    pub(crate) fn claim_neighbours(&self, id: EntryId, mut end: u64, owned: &mut Vec<Owned>) {
        let budget = self.neighbour_budget();
        if budget == 0 {
            return;
        }
        let Some(&pos) = self.file_pos.get(id.index()) else {
            return;
        };
        let Some(after) = self.files.get(pos as usize + 1..) else {
            return;
        };
        let mut taken = 0u64;
        for &f in after.iter().take(MAX_FILES_EXAMINED) {
            let Some((chunks, size)) = self.small_file_chunks(f) else {
                break; // a large file ends the run of small ones
            };
            let Some(first) = chunks.iter().find(|c| !c.zeros && c.compressed_len > 0) else {
                continue;
            };
            if first.compressed_offset.saturating_sub(end) > self.config.max_gap_bytes
                || taken + size > budget
            {
                break;
            }
            taken += self.claim_speculative(chunks, owned);
            end = chunks
                .iter()
                .map(|c| c.compressed_range().end)
                .max()
                .unwrap_or(end)
                .max(end);
        }
    }

    /// On a miss in a directory whose files are read together, claims its
    /// other small files (see the module doc).
    pub(crate) fn claim_directory(&self, id: EntryId, owned: &mut Vec<Owned>) {
        let base = self.config.speculative_dir_bytes;
        if base == 0 {
            return;
        }
        let e = self.index.entry(id);
        let dir = e.parent();
        if !(is_shared_object(e.name()) || read_together(&self.index.entry(dir).path())) {
            return;
        }
        // A small file missed after a batch is one the batch could have
        // taken: the directory is read more widely than guessed.
        let again = self.small_file_chunks(id).is_some();
        let Some(batch) = self.ledger.next_batch_of(dir, again) else {
            return;
        };
        let budget = base.saturating_mul(1 << batch);
        let mut taken = 0u64;
        for child in self.index.children(dir).take(MAX_FILES_EXAMINED) {
            let child = child.id;
            if child == id {
                continue;
            }
            let Some((chunks, size)) = self.small_file_chunks(child) else {
                continue;
            };
            if taken + size > budget {
                continue; // a smaller one may still fit
            }
            taken += self.claim_speculative(chunks, owned);
        }
    }
}

impl Fetcher {
    /// On a miss at offset 0 of a program or library larger than
    /// [`PROGRAM_TAIL_BYTES`], claims the chunks of its last
    /// [`PROGRAM_TAIL_BYTES`] (see the module doc).
    pub(crate) fn claim_program_tail(&self, id: EntryId, owned: &mut Vec<Owned>) {
        let e = self.index.entry(id);
        if e.kind() != EntryKind::Reg || !may_be_program(e.mode(), e.name()) {
            return;
        }
        let size = e.size();
        if size <= PROGRAM_TAIL_BYTES {
            return;
        }
        let tail = self
            .index
            .chunk_range_for(id, size - PROGRAM_TAIL_BYTES, PROGRAM_TAIL_BYTES);
        self.claim_speculative(tail, owned);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_and_module_directories_are_read_together() {
        for p in [
            "usr/lib",
            "lib64",
            "usr/lib/x86_64-linux-gnu",
            "lib/aarch64-linux-musl",
            "usr/local/lib/python3.12/lib-dynload",
            "usr/lib/python3/dist-packages/yaml",
            "app/.venv/lib/python3.11/site-packages/numpy/core",
            "app/pkg/__pycache__",
            "srv/node_modules/express/lib",
        ] {
            assert!(read_together(p), "{p}");
        }
        for p in [
            "",
            "etc",
            "usr/share/doc/bash",
            "var/lib/dpkg/info",
            "usr/bin",
        ] {
            assert!(!read_together(p), "{p}");
        }
        assert!(is_shared_object(b"libc.so.6"));
        assert!(is_shared_object(b"_ssl.cpython-311-x86_64-linux-gnu.so"));
        assert!(!is_shared_object(b"libc.sort"));
        assert!(!is_shared_object(b"README"));
        assert!(may_be_program(0o755, b"cc1"));
        assert!(may_be_program(0o644, b"libm.so.6"));
        assert!(!may_be_program(0o644, b"stdio.h"));
    }
}
