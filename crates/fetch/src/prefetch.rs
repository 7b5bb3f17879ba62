//! Mount-time prefetch and optional background fetch of a layer.
//!
//! Prefetch fetches the layer's prefetch extent (the files a startup profile
//! put first in the blob: zest's TOC field or an eStargz-style
//! `.prefetch.landmark`) right after mount, at on-demand priority (the
//! workload is about to read exactly these files), in requests that start small
//! and double, two in flight. Background fetch (off by default) then fetches
//! everything else, rate limited, at background priority: its own request pool,
//! pausing before each request while on-demand reads wait for the network.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::Fetcher;

/// Settings of the background fetch of a whole layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackgroundFetch {
    /// Average rate limit in compressed bytes per second (0 = unlimited).
    pub bytes_per_sec: u64,
}

/// The prefetch/background task of one mounted layer; stopped on drop.
#[derive(Debug)]
pub struct PrefetchTask {
    handle: tokio::task::JoinHandle<()>,
    done: Arc<AtomicBool>,
}

impl PrefetchTask {
    /// Starts prefetch (when `prefetch` and the layer has an extent) and then the
    /// background fetch (when `background` is set). `None` when there is
    /// nothing to do.
    pub fn start(
        fetcher: &Arc<Fetcher>,
        prefetch: bool,
        background: Option<BackgroundFetch>,
    ) -> Option<PrefetchTask> {
        let extent = fetcher.index().prefetch_extent().filter(|_| prefetch);
        if extent.is_none() && background.is_none() {
            return None;
        }
        let done = Arc::new(AtomicBool::new(false));
        let done_task = Arc::clone(&done);
        let f = Arc::clone(fetcher);
        let handle = fetcher.runtime().spawn(async move {
            if let Some(extent) = extent {
                let t = std::time::Instant::now();
                let bytes = f.fetch_prefetch(extent.clone()).await;
                tracing::info!(
                    blob = %f.describe(),
                    extent = ?extent,
                    bytes,
                    ms = t.elapsed().as_millis() as u64,
                    "prefetch done"
                );
            }
            if let Some(bg) = background {
                let end = f.index().location().data_end();
                let bytes = f.fetch_background(0..end, Some(bg.bytes_per_sec)).await;
                tracing::info!(blob = %f.describe(), bytes, "background fetch done");
            }
            done_task.store(true, Ordering::Release);
        });
        Some(PrefetchTask { handle, done })
    }

    /// Whether the task has finished.
    pub fn is_finished(&self) -> bool {
        self.done.load(Ordering::Acquire) || self.handle.is_finished()
    }

    /// Stops the task. A request it has in flight is abandoned: readers waiting
    /// on those chunks get an error, so stop it only when unmounting.
    pub fn stop(self) {
        self.handle.abort();
    }
}

impl Drop for PrefetchTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}
