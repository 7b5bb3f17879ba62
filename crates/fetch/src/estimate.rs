//! Round-trip time and throughput of one registry, estimated from the range
//! requests that completed, and the bandwidth-delay product derived from them.
//!
//! Each request is modelled as `elapsed = rtt + bytes / throughput`. The RTT
//! estimate is the smallest elapsed time of the recent small requests (they
//! are all round trip), the throughput an average over the large ones with
//! the RTT taken out; there is no estimate until both kinds were seen. With
//! several requests in flight that average is a request's share of the link;
//! the highest average seen stands for the link's own rate. The fetcher sizes guesses and background work from the
//! product: fetching one BDP more costs about one round trip, the price of the
//! miss it may save, and background requests of a few BDPs keep the link busy
//! without holding an on-demand request behind a long transfer.

use std::time::Duration;

use parking_lot::Mutex;

/// Requests remembered for the RTT minimum.
const WINDOW: usize = 32;

/// Requests at least this large are used for the throughput estimate.
const LARGE: u64 = 128 << 10;

/// Requests at most this large are used for the RTT estimate.
const SMALL: u64 = 32 << 10;

/// Weight of a new throughput sample (exponential moving average).
const ALPHA: f64 = 0.25;

/// A snapshot of the estimate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkEstimate {
    /// Round-trip time (time to first byte of a request).
    pub rtt: Duration,
    /// Transfer rate of one request, bytes per second (recent average: with
    /// several requests in flight each gets a share of the link).
    pub bytes_per_sec: f64,
    /// Highest average transfer rate seen: about the link's rate, measured
    /// while a request had the link to itself.
    pub peak_bytes_per_sec: f64,
}

impl LinkEstimate {
    /// The bandwidth-delay product in bytes, at one request's rate.
    pub fn bdp(&self) -> u64 {
        (self.rtt.as_secs_f64() * self.bytes_per_sec) as u64
    }

    /// The bandwidth-delay product of the link (at its peak rate): what a
    /// transfer costs the link, whatever else is in flight.
    pub fn link_bdp(&self) -> u64 {
        (self.rtt.as_secs_f64() * self.peak_bytes_per_sec) as u64
    }
}

#[derive(Debug, Default)]
struct State {
    recent: [Duration; WINDOW],
    len: usize,
    next: usize,
    bytes_per_sec: Option<f64>,
    peak_bytes_per_sec: f64,
}

/// The live estimator, shared by the fetchers of one registry.
#[derive(Debug, Default)]
pub(crate) struct Estimator {
    state: Mutex<State>,
}

impl Estimator {
    /// Records one completed request of `bytes` that took `elapsed`.
    pub(crate) fn record(&self, bytes: u64, elapsed: Duration) {
        let mut s = self.state.lock();
        if bytes <= SMALL {
            let i = s.next;
            if let Some(slot) = s.recent.get_mut(i) {
                *slot = elapsed;
            }
            s.next = (i + 1) % WINDOW;
            s.len = (s.len + 1).min(WINDOW);
        } else if bytes >= LARGE && s.len > 0 {
            let rtt = Self::rtt_of(&s);
            // At least a millisecond of transfer: a request as fast as the
            // fastest one says nothing about the rate.
            let transfer = elapsed.saturating_sub(rtt).max(Duration::from_millis(1));
            let rate = bytes as f64 / transfer.as_secs_f64();
            let average = match s.bytes_per_sec {
                Some(old) => old + ALPHA * (rate - old),
                None => rate,
            };
            s.bytes_per_sec = Some(average);
            s.peak_bytes_per_sec = s.peak_bytes_per_sec.max(average);
        }
    }

    fn rtt_of(s: &State) -> Duration {
        s.recent
            .get(..s.len)
            .and_then(|r| r.iter().min().copied())
            .unwrap_or_default()
    }

    /// The estimate, once a small and then a large request have completed.
    pub(crate) fn get(&self) -> Option<LinkEstimate> {
        let s = self.state.lock();
        Some(LinkEstimate {
            rtt: Self::rtt_of(&s),
            bytes_per_sec: s.bytes_per_sec?,
            peak_bytes_per_sec: s.peak_bytes_per_sec,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separates_round_trip_from_transfer() {
        let e = Estimator::default();
        assert!(e.get().is_none());
        // 20 ms RTT, 25 MB/s (200 Mbit/s): 1 MiB takes 20 ms + 41.9 ms.
        let rtt = Duration::from_millis(20);
        let rate = 25e6;
        for _ in 0..4 {
            e.record(4096, rtt + Duration::from_secs_f64(4096.0 / rate));
        }
        assert!(e.get().is_none(), "no large request yet");
        for _ in 0..8 {
            e.record(
                1 << 20,
                rtt + Duration::from_secs_f64((1 << 20) as f64 / rate),
            );
        }
        let est = e.get().expect("estimate");
        assert!((est.rtt.as_secs_f64() - 0.020).abs() < 0.001, "{est:?}");
        assert!((est.bytes_per_sec / rate - 1.0).abs() < 0.05, "{est:?}");
        // ~500 KB: one round trip's worth of bytes.
        assert!((450_000..550_000).contains(&est.bdp()), "{}", est.bdp());
    }

    #[test]
    fn old_samples_leave_the_window() {
        let e = Estimator::default();
        e.record(1 << 20, Duration::from_millis(50));
        assert!(e.get().is_none(), "no round trip measured yet");
        e.record(100, Duration::from_millis(5));
        for _ in 0..WINDOW {
            e.record(100, Duration::from_millis(100));
        }
        e.record(1 << 20, Duration::from_millis(150));
        let est = e.get().expect("estimate");
        assert_eq!(est.rtt, Duration::from_millis(100));
        assert!((est.bytes_per_sec / 20e6 - 1.0).abs() < 0.05, "{est:?}");
    }

    #[test]
    fn the_peak_rate_survives_sharing_the_link() {
        let e = Estimator::default();
        let rtt = Duration::from_millis(20);
        e.record(4096, rtt);
        // Alone on a 25 MB/s link, then one of five requests sharing it.
        e.record(
            1 << 20,
            rtt + Duration::from_secs_f64((1 << 20) as f64 / 25e6),
        );
        for _ in 0..16 {
            e.record(
                1 << 20,
                rtt + Duration::from_secs_f64((1 << 20) as f64 / 5e6),
            );
        }
        let est = e.get().expect("estimate");
        assert!((est.bytes_per_sec / 5e6 - 1.0).abs() < 0.05, "{est:?}");
        assert!(
            (est.peak_bytes_per_sec / 25e6 - 1.0).abs() < 0.05,
            "{est:?}"
        );
        assert!((450_000..550_000).contains(&est.link_bdp()), "{est:?}");
    }
}
