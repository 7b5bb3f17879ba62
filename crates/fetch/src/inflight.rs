//! Single flight per chunk: however many readers want a chunk at once, it is
//! fetched once. The first reader claims the chunk and becomes its owner; the
//! others subscribe to the owner's result.
//!
//! Invariants:
//! - an owner always publishes an outcome: [`ClaimGuard::complete`], or on drop
//!   (task cancelled, panic) a "cancelled" error, so a waiter never hangs;
//! - the entry leaves the map when the outcome is published, so a later reader
//!   finds the chunk in the cache (the owner caches before completing) or
//!   starts a fresh fetch after a failure.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use super::FetchError;
use zest_oci::digest::Digest;

/// Outcome of one chunk fetch as seen by waiters; `None` while in flight.
type Slot = Option<Result<Bytes, FetchError>>;

/// The set of chunks being fetched, keyed by chunk digest.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    map: Mutex<HashMap<Digest, watch::Receiver<Slot>>>,
}

/// What [`InFlight::claim`] gave the caller.
pub(crate) enum Claim {
    /// The caller must fetch the chunk and complete the guard.
    Owner(ClaimGuard),
    /// Someone else is fetching it; wait on this.
    Waiter(Waiter),
}

/// The duty to publish one chunk's outcome.
#[derive(Debug)]
pub(crate) struct ClaimGuard {
    inflight: Arc<InFlight>,
    digest: Digest,
    tx: Option<watch::Sender<Slot>>,
}

/// A subscription to a chunk someone else is fetching.
#[derive(Debug)]
pub(crate) struct Waiter {
    rx: watch::Receiver<Slot>,
}

impl InFlight {
    /// Claims `digest`, or subscribes to the fetch already claimed.
    pub(crate) fn claim(self: &Arc<Self>, digest: Digest) -> Claim {
        let mut map = self.map.lock();
        if let Some(rx) = map.get(&digest) {
            return Claim::Waiter(Waiter { rx: rx.clone() });
        }
        let (tx, rx) = watch::channel(None);
        map.insert(digest, rx);
        Claim::Owner(ClaimGuard {
            inflight: Arc::clone(self),
            digest,
            tx: Some(tx),
        })
    }

    /// Whether `digest` is being fetched right now.
    pub(crate) fn contains(&self, digest: &Digest) -> bool {
        self.map.lock().contains_key(digest)
    }

    /// Number of chunks in flight.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.lock().len()
    }
}

impl ClaimGuard {
    /// The claimed chunk.
    pub(crate) fn digest(&self) -> Digest {
        self.digest
    }

    /// A waiter on this claim's outcome (for the owner's own reader).
    pub(crate) fn subscribe(&self) -> Waiter {
        match &self.tx {
            Some(tx) => Waiter { rx: tx.subscribe() },
            None => Waiter::failed(FetchError::Cancelled),
        }
    }

    /// Publishes the outcome to every waiter and releases the claim.
    pub(crate) fn complete(mut self, outcome: Result<Bytes, FetchError>) {
        self.publish(outcome);
    }

    fn publish(&mut self, outcome: Result<Bytes, FetchError>) {
        let Some(tx) = self.tx.take() else { return };
        // Leave the map first: from now on a new reader either finds the chunk in
        // the cache or starts its own fetch; it never subscribes to a finished one.
        self.inflight.map.lock().remove(&self.digest);
        // Waiters that already hold a receiver see the value even though the
        // sender is dropped right after.
        let _ = tx.send(Some(outcome));
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if self.tx.is_some() {
            self.publish(Err(FetchError::Cancelled));
        }
    }
}

impl Waiter {
    /// A waiter that is already done, with an error.
    pub(crate) fn failed(err: FetchError) -> Waiter {
        let (_tx, rx) = watch::channel(Some(Err(err)));
        Waiter { rx }
    }

    /// Waits for the owner's outcome.
    pub(crate) async fn wait(mut self) -> Result<Bytes, FetchError> {
        match self.rx.wait_for(Option::is_some).await {
            Ok(slot) => slot.clone().unwrap_or(Err(FetchError::Cancelled)),
            // The owner vanished without publishing: cannot happen with the drop
            // guard, but a waiter must never hang.
            Err(_) => Err(FetchError::Cancelled),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn second_claim_waits_for_first() {
        let f = Arc::new(InFlight::default());
        let d = Digest::of(b"x");
        let Claim::Owner(g) = f.claim(d) else {
            panic!("first claim must own")
        };
        let Claim::Waiter(w) = f.claim(d) else {
            panic!("second claim must wait")
        };
        assert!(f.contains(&d));
        g.complete(Ok(Bytes::from_static(b"data")));
        assert_eq!(w.wait().await.unwrap(), Bytes::from_static(b"data"));
        assert!(!f.contains(&d));
        assert!(matches!(f.claim(d), Claim::Owner(_)));
    }

    #[tokio::test]
    async fn dropped_owner_releases_waiters_with_error() {
        let f = Arc::new(InFlight::default());
        let d = Digest::of(b"y");
        let g = f.claim(d);
        let Claim::Waiter(w) = f.claim(d) else {
            panic!("second claim must wait")
        };
        drop(g);
        assert!(matches!(w.wait().await, Err(FetchError::Cancelled)));
        assert_eq!(f.len(), 0);
    }
}
