//! The walk the name-following guesses share (Python imports, C includes):
//! from a file read, fetch the files it names, scan each as soon as its bytes
//! are in, fetch what that one names, and so on, a bounded number of levels
//! ahead.
//!
//! Why as soon as each arrives, not a level at a time: an interpreter or a
//! preprocessor goes depth first. It reads the first module a script imports,
//! then that module's first import, long before the script's last import.
//! Waiting for a whole level (a script's 37 imports, the largest decides)
//! before scanning any of it let the reader overtake the walk one level down.
//! Files named together are still fetched together, so neighbours in the blob
//! share requests.
//!
//! Guesses do not crowd out reads: a walk has at most [`MAX_WALK_FETCHES`]
//! batches in flight, and takes the newest batch first (the first file of the
//! newest scan: where the reader goes next), so the on-demand request slots
//! stay free for the reads the walk did not foresee.
//!
//! Bounded: a file is scanned at most once per walk (the caller marks files
//! examined), the walk stops after [`MAX_WALK_STEPS`] wake-ups, at its byte
//! budget, or where a start-up profile takes over; every fetch has the
//! fetcher's deadlines.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::Notify;

use super::{Found, LibraryStack};

/// Wake-ups of one walk at most (each a request completing or a batch of
/// files scanned): far more than a real tree needs, a bound on a hostile one.
const MAX_WALK_STEPS: usize = 16 << 10;

/// Batches of one walk fetched at once, at most: guesses share the
/// on-demand request slots with the reads they anticipate, and a walk that
/// named hundreds of modules must not hold every slot while a real read
/// waits for one.
const MAX_WALK_FETCHES: usize = 2;

/// A walk's byte budget and counters: compressed bytes `spent` of at most
/// `max`, and files guessed (`files`).
pub(super) struct Guess<'a> {
    pub spent: &'a AtomicU64,
    pub max: u64,
    pub files: &'a AtomicU64,
}

/// What one walk did.
#[derive(Debug, Default)]
pub(super) struct Walked {
    /// Files scanned for names (the root included).
    pub scanned: usize,
    /// Files fetched (or found cached) ahead of their reader.
    pub fetched: usize,
}

impl LibraryStack {
    /// Walks from `root` (a file read, its kind `T` and first bytes) up to
    /// `max_depth` levels ahead: `names(item, bytes, last)` returns the files
    /// a scanned file names, each with its own item (`None`: fetch it, do not
    /// scan it), and marks them examined (`last`: they are the deepest level,
    /// fetched and not scanned, and should be left unmarked so their reader
    /// walks on). At most `scan_bytes` of a file are scanned.
    pub(super) async fn walk<T, N>(
        self: &Arc<Self>,
        root: (T, Bytes),
        max_depth: u32,
        scan_bytes: u64,
        guess: Guess<'_>,
        mut names: N,
    ) -> Walked
    where
        N: FnMut(&T, &Bytes, bool) -> Vec<(Found, Option<T>)>,
    {
        let progress = Notify::new();
        let mut fetching = FuturesUnordered::new();
        let mut walked = Walked::default();
        let mut ready: Vec<(T, Bytes, u32)> = vec![(root.0, root.1, 0)];
        // Named and not fetched yet: the newest first, the way the reader
        // goes (depth first).
        let mut queued: Vec<(Arc<crate::Fetcher>, Vec<super::FilePart>)> = Vec::new();
        // Fetched or being fetched, to be scanned once in.
        let mut waiting: Vec<(Found, T, u32)> = Vec::new();
        for _ in 0..MAX_WALK_STEPS {
            if guess.spent.load(Ordering::Relaxed) >= guess.max || self.profile_guided() {
                break;
            }
            let mut named_now = Vec::new();
            for (item, data, depth) in std::mem::take(&mut ready) {
                let last = depth + 1 >= max_depth;
                let named = names(&item, &data, last);
                walked.scanned += 1;
                walked.fetched += named.len();
                named_now.push(self.whole_files_by_layer(named.iter().map(|(f, _)| *f)));
                if !last {
                    waiting.extend(
                        named
                            .into_iter()
                            .filter_map(|(f, item)| Some((f, item?, depth + 1))),
                    );
                }
            }
            // Reversed: what the first file scanned named is popped first.
            queued.extend(
                named_now
                    .into_iter()
                    .rev()
                    .flat_map(|b| b.into_iter().rev()),
            );
            while fetching.len() < MAX_WALK_FETCHES {
                let Some((fetcher, parts)) = queued.pop() else {
                    break;
                };
                let (guess, progress) = (&guess, &progress);
                fetching.push(async move {
                    self.fetch_guessed(&fetcher, &parts, guess, Some(progress))
                        .await
                });
            }
            // In the order they were named: the reader's order.
            for ((pos, id), item, depth) in std::mem::take(&mut waiting) {
                let Some(f) = self.fetcher(pos) else {
                    continue;
                };
                let len = f.index().entry(id).size().min(scan_bytes) as u32;
                if !f.has_cached(id, 0, len) {
                    waiting.push(((pos, id), item, depth));
                } else if let Some(data) = f.read_cached(id, 0, len).await {
                    ready.push((item, data, depth));
                }
            }
            if !ready.is_empty() {
                continue;
            }
            if fetching.is_empty() {
                // Nothing more will arrive (what is still waiting was over
                // budget or failed).
                break;
            }
            tokio::select! {
                _ = fetching.next() => {}
                _ = progress.notified() => {}
            }
        }
        // Fetches started are left to finish (dropping them would cancel
        // requests under way for nothing).
        while fetching.next().await.is_some() {}
        walked
    }

    /// Fetches the files `parts` a walk guessed within the stack's byte
    /// budget and the walk's own, notifying `progress` as requests complete.
    pub(super) async fn fetch_guessed(
        &self,
        fetcher: &Arc<crate::Fetcher>,
        parts: &[super::FilePart],
        guess: &Guess<'_>,
        progress: Option<&Notify>,
    ) {
        if guess.spent.load(Ordering::Relaxed) >= guess.max {
            return;
        }
        // Its own bytes: library fetches of the same stack run meanwhile.
        let got = self.fetch(fetcher, parts, progress).await;
        guess.spent.fetch_add(got, Ordering::Relaxed);
        guess.files.fetch_add(parts.len() as u64, Ordering::Relaxed);
    }
}
