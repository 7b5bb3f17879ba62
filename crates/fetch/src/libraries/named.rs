//! Data files a program names: when a program starts (read from its start,
//! or found from the image's start command), the file names written as
//! strings in its read-only data (`postgres.bki`, `pg_hba.conf.sample`,
//! `/etc/ssl/openssl.cnf`) are looked up in the image, and the small files
//! they name are fetched whole, before the program opens them one after
//! another, a blocking round trip each.
//!
//! A program builds most such paths at run time from a directory it computes
//! and a name it holds literally, so a name is looked up anywhere in the
//! image, by its file name: a name more than [`MAX_FILES_PER_NAME`] files
//! carry (`__init__.py`, `index.js`) says too little and is left alone, as is
//! a shared library's (library prefetch finds those the loader's way).
//!
//! Bounded: at most [`MAX_SCAN_BYTES`] of a program are scanned and
//! [`zest_format::elf::MAX_FILE_NAMES`] names taken from it
//! ([`zest_format::elf::file_names`]); at most [`MAX_NAMED_BYTES`] are
//! fetched per stack; only files small enough to fetch whole; none where a
//! start-up profile guides the layer.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use zest_format::elf::{file_names, ElfFile};
use zest_format::{EntryKind, EntryRef, LayerIndex};

use super::{Found, LibraryStack};

/// Compressed bytes of named files one stack fetches at most.
pub(super) const MAX_NAMED_BYTES: u64 = 4 << 20;

/// Bytes of one program's read-only data scanned for names.
const MAX_SCAN_BYTES: u64 = 4 << 20;

/// Files one name may match and still be fetched.
const MAX_FILES_PER_NAME: usize = 2;

/// Files of a stack indexed by name, at most: a bound on memory and on the
/// time the index takes to build (tens of milliseconds at this size, on a
/// blocking-pool thread); an image with more is left unindexed.
const MAX_INDEXED_FILES: usize = 1 << 18;

/// The regular files of a stack by file name (every layer's, visible or
/// not; callers check visibility).
pub(super) type NameIndex = HashMap<Box<[u8]>, Vec<Found>>;

impl LibraryStack {
    /// Fetches the small files the read-only data of program `found` (parsed
    /// as `elf`) names (see the module doc).
    pub(super) async fn fetch_named_files(self: &Arc<Self>, (pos, id): Found, elf: &ElfFile) {
        if self.profile_guided() || self.named_spent.load(Ordering::Relaxed) >= MAX_NAMED_BYTES {
            return;
        }
        let Some(fetcher) = self.fetcher(pos) else {
            return;
        };
        let size = fetcher.index().entry(id).size();
        let mut left = MAX_SCAN_BYTES;
        let ranges: Vec<Range<u64>> = elf
            .segments
            .iter()
            .filter(|s| !s.executable && !s.writable)
            .filter_map(|s| {
                let end = s.file.end.min(size).min(s.file.start.saturating_add(left));
                left = left.saturating_sub(end.saturating_sub(s.file.start));
                (s.file.start < end).then_some(s.file.start..end)
            })
            .collect();
        // The loader's parts are being fetched: these wait for the same
        // chunks, not for a second copy.
        let parts: Vec<(zest_format::EntryId, Range<u64>)> =
            ranges.iter().map(|r| (id, r.clone())).collect();
        self.fetch(&fetcher, &parts, None).await;
        let mut found: Vec<Found> = Vec::new();
        for range in ranges {
            let len = u32::try_from(range.end - range.start).unwrap_or(u32::MAX);
            let Some(data) = fetcher.read_cached(id, range.start, len).await else {
                continue;
            };
            for name in file_names(&data) {
                for file in self.files_named(name).await {
                    if self.small(file) && !found.contains(&file) {
                        found.push(file);
                    }
                }
            }
        }
        let mut fetched = 0usize;
        for (f, parts) in self.whole_files_by_layer(found) {
            if self.named_spent.load(Ordering::Relaxed) >= MAX_NAMED_BYTES {
                break;
            }
            fetched += parts.len();
            let got = self.fetch(&f, &parts, None).await;
            self.named_spent.fetch_add(got, Ordering::Relaxed);
        }
        tracing::debug!(
            file = %fetcher.index().entry(id).path(),
            fetched,
            "files the program names prefetched"
        );
    }

    /// The visible regular files `name` names: an absolute path's file, or
    /// the files of that file name anywhere in the stack (none when more
    /// than [`MAX_FILES_PER_NAME`] are).
    async fn files_named(&self, name: &[u8]) -> Vec<Found> {
        if name.first() == Some(&b'/') {
            let Ok(path) = std::str::from_utf8(name) else {
                return Vec::new();
            };
            return self
                .resolve(path)
                .into_iter()
                .filter(|&(pos, id)| {
                    self.fetcher(pos)
                        .is_some_and(|f| f.index().entry(id).kind() == EntryKind::Reg)
                })
                .collect();
        }
        self.visible_files_named(name, MAX_FILES_PER_NAME, |_| true)
            .await
    }

    /// The regular files of file name `name` in the stack that `keep` keeps
    /// and no upper layer hides: none when more than `max` are.
    pub(super) async fn visible_files_named(
        &self,
        name: &[u8],
        max: usize,
        keep: impl Fn(&EntryRef<'_>) -> bool,
    ) -> Vec<Found> {
        let index = self.name_index().await;
        let Some(files) = index.get(name) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for &(pos, id) in files {
            let Some(fetcher) = self.fetcher(pos) else {
                continue;
            };
            let entry = fetcher.index().entry(id);
            if !keep(&entry) || self.resolve(&format!("/{}", entry.path())) != Some((pos, id)) {
                continue;
            }
            if found.len() == max {
                return Vec::new();
            }
            found.push((pos, id));
        }
        found
    }

    /// The stack's files by file name, built once, off the runtime's
    /// threads (a walk over every file of every layer): callers wait for it
    /// without holding up the reads the runtime serves.
    async fn name_index(&self) -> Arc<NameIndex> {
        let index = self
            .names
            .get_or_init(|| async {
                let layers: Vec<(usize, Arc<LayerIndex>)> = self
                    .layers
                    .iter()
                    .enumerate()
                    .filter_map(|(pos, layer)| {
                        Some((pos, Arc::clone(layer.fetcher.upgrade()?.index())))
                    })
                    .collect();
                tokio::task::spawn_blocking(move || build_name_index(&layers))
                    .await
                    .map(Arc::new)
                    // The build panicked: no index, no lookups by name.
                    .unwrap_or_default()
            })
            .await;
        Arc::clone(index)
    }
}

/// The regular files of `layers` (each with its position in the stack) by
/// file name: empty when they hold more than [`MAX_INDEXED_FILES`].
fn build_name_index(layers: &[(usize, Arc<LayerIndex>)]) -> NameIndex {
    let mut index = NameIndex::new();
    let mut files = 0usize;
    for (pos, layer_index) in layers {
        for id in layer_index.files_in_blob_order() {
            let entry = layer_index.entry(id);
            if entry.kind() != EntryKind::Reg {
                continue;
            }
            files += 1;
            if files > MAX_INDEXED_FILES {
                return NameIndex::new();
            }
            index
                .entry(entry.name().into())
                .or_default()
                .push((*pos, id));
        }
    }
    index
}
