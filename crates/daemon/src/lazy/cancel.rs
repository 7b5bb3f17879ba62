//! A cancellation flag that async waits can select on, for the provider's
//! background tasks.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// A cancellation flag that async waits can select on.
#[derive(Default)]
pub(super) struct Cancel {
    flag: AtomicBool,
    notify: Notify,
}

impl Cancel {
    pub(super) fn cancel(&self) {
        self.flag.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub(super) fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Resolves once cancelled.
    pub(super) async fn cancelled(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Register before checking the flag, so a cancel in between is not lost.
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn cancel_wakes_waiters() {
        let cancel = Arc::new(Cancel::default());
        let waiter = {
            let cancel = Arc::clone(&cancel);
            tokio::spawn(async move { cancel.cancelled().await })
        };
        tokio::task::yield_now().await;
        cancel.cancel();
        assert!(tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .is_ok());
        // Already cancelled: returns at once.
        assert!(
            tokio::time::timeout(Duration::from_secs(5), cancel.cancelled())
                .await
                .is_ok()
        );
    }
}
