//! What a cold-start benchmark run measured: one [`Sample`] per start of a
//! workload, the context needed to read them ([`RunInfo`]), and the summary
//! statistics the report shows ([`Summary`]).
//!
//! This module owns the data model only; [`crate::runner`] fills it and
//! [`crate::report`] renders it. A run serialises to JSON so that a report
//! can be rebuilt, or two runs compared, without measuring again.
//!
//! Invariants: durations are wall-clock, measured by the runner around whole
//! user-visible steps (a command started and finished, or a ready line seen);
//! byte and request counts are taken at the link emulator, so every mode is
//! counted the same way.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How an image is pulled and started in a sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Mode {
    /// containerd's own pull of the gzip image into its overlayfs snapshotter, then run.
    Full,
    /// `zest pull` of the zstd:chunked image, then run: files are fetched as read.
    Lazy,
    /// `zest pull` of the image rewritten by `zest optimize` for this workload.
    LazyProfile,
    /// `zest pull` of the zstd:chunked image skopeo wrote from the gzip one: a
    /// third-party image that zest neither converted nor profiled.
    ThirdParty,
    /// The third-party image on a fresh node, with the start-up profile that
    /// another fresh node learned from its own first start and published
    /// beside the image (an OCI referrer).
    Learned,
    /// A second run after `Full`: every byte is on local disk (the floor).
    WarmFull,
    /// A second run after `Lazy`: every chunk the workload reads is in zest's cache.
    WarmLazy,
}

impl Mode {
    /// Every mode, in report order.
    pub const ALL: [Mode; 7] = [
        Mode::Full,
        Mode::Lazy,
        Mode::LazyProfile,
        Mode::ThirdParty,
        Mode::Learned,
        Mode::WarmFull,
        Mode::WarmLazy,
    ];

    /// The label used in tables and on the command line.
    pub fn label(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Lazy => "lazy",
            Mode::LazyProfile => "lazy+profile",
            Mode::ThirdParty => "lazy (skopeo)",
            Mode::Learned => "lazy+learned",
            Mode::WarmFull => "warm (overlayfs)",
            Mode::WarmLazy => "warm (zest)",
        }
    }

    /// Whether the sample starts from a node that has never seen the image.
    pub fn is_cold(self) -> bool {
        matches!(
            self,
            Mode::Full | Mode::Lazy | Mode::LazyProfile | Mode::ThirdParty | Mode::Learned
        )
    }

    /// Whether the sample runs on zest (every mode but the overlayfs ones).
    pub fn is_zest(self) -> bool {
        !matches!(self, Mode::Full | Mode::WarmFull)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The modes a user selects on the command line: `warm` selects both warm rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModeChoice {
    /// [`Mode::Full`].
    Full,
    /// [`Mode::Lazy`].
    Lazy,
    /// [`Mode::LazyProfile`].
    LazyProfile,
    /// [`Mode::ThirdParty`].
    ThirdParty,
    /// [`Mode::Learned`].
    Learned,
    /// [`Mode::WarmFull`] and [`Mode::WarmLazy`], each measured right after the
    /// cold sample of its snapshotter.
    Warm,
}

impl FromStr for ModeChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "full" => Ok(ModeChoice::Full),
            "lazy" => Ok(ModeChoice::Lazy),
            "lazy+profile" | "profile" => Ok(ModeChoice::LazyProfile),
            "skopeo" | "third-party" => Ok(ModeChoice::ThirdParty),
            "lazy+learned" | "learned" => Ok(ModeChoice::Learned),
            "warm" => Ok(ModeChoice::Warm),
            other => Err(format!(
                "unknown mode {other:?}: expected full, lazy, lazy+profile, skopeo, learned or warm"
            )),
        }
    }
}

/// One start of one workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Workload name (e.g. `python-print`).
    pub workload: String,
    /// Link profile name (e.g. `region`).
    pub profile: String,
    /// How the image was pulled and started.
    pub mode: Mode,
    /// 0-based sample number within (workload, profile, mode).
    pub index: u32,
    /// Time of the pull command (zero for warm runs).
    #[serde(with = "secs")]
    pub pull: Duration,
    /// From `ctr run` starting to the workload's ready line.
    #[serde(with = "secs")]
    pub run: Duration,
    /// Response bytes the registry sent through the link (headers included).
    pub fetched_bytes: u64,
    /// HTTP requests that reached the registry through the link.
    pub requests: u64,
    /// FUSE reads that waited for the network (zest modes; 0 otherwise).
    pub blocking_misses: u64,
    /// CPU time (user + system) of the snapshotter during the sample: zest's
    /// daemon in zest modes, containerd (which unpacks into overlayfs) otherwise.
    #[serde(with = "secs")]
    pub snapshotter_cpu: Duration,
}

impl Sample {
    /// Pull plus run-to-ready: what a user waits for (saturating, so a run read
    /// from a hand-edited file cannot make it panic).
    pub fn total(&self) -> Duration {
        self.pull.saturating_add(self.run)
    }
}

/// Everything about a run that is not a sample.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The exact command line that produced the run (to rerun it).
    pub command: String,
    /// The machine: CPU model and count, memory, kernel, OS.
    pub machine: String,
    /// zest's version.
    pub zest_version: String,
    /// The build that ran: git commit (with `-dirty` when the work tree had
    /// uncommitted changes when it was built) and cargo profile.
    #[serde(default)]
    pub build: String,
    /// `/proc/loadavg` when the run started: load averages over 1, 5 and 15
    /// minutes, runnable/total tasks. A busy machine shows here.
    #[serde(default)]
    pub load_start: String,
    /// `/proc/loadavg` when the run ended (or failed).
    #[serde(default)]
    pub load_end: String,
    /// The filesystem holding the nodes' state (containerd's and zest's roots),
    /// e.g. `ext4 with a journal`: file creation costs differ between
    /// filesystems, and every mode creates files.
    #[serde(default)]
    pub node_filesystem: String,
    /// When the run started (RFC 3339).
    pub started: String,
    /// The link profiles used, by name, in the order they ran.
    pub profiles: Vec<ProfileInfo>,
    /// The workloads, in the order they ran.
    pub workloads: Vec<WorkloadInfo>,
}

/// A link profile as it was emulated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProfileInfo {
    /// Name, e.g. `region`.
    pub name: String,
    /// Added round-trip time.
    #[serde(with = "secs")]
    pub rtt: Duration,
    /// Shared bandwidth limit in bits per second, if any.
    pub bandwidth_bps: Option<u64>,
}

/// A workload and the sizes of its images.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    /// Workload name.
    pub name: String,
    /// The command run in the container.
    pub command: Vec<String>,
    /// The line (substring) that means "ready".
    pub ready: String,
    /// Compressed size of the gzip image's layers.
    pub gzip_bytes: u64,
    /// Compressed size of the zstd:chunked image's layers.
    pub chunked_bytes: u64,
    /// Compressed size of the third-party (skopeo-written) image's layers; 0 when
    /// that mode was not measured.
    #[serde(default)]
    pub third_party_bytes: u64,
    /// How the third-party image's layers are written, read from their
    /// annotations (e.g. "zstd:chunked, new generation"); `None` when not measured.
    #[serde(default)]
    pub third_party_format: Option<String>,
    /// The start-up working set, compressed: the prefetch extents of the image
    /// optimized for this workload (the chunks its start reads). `None` when no
    /// optimized image was measured.
    pub working_set_bytes: Option<u64>,
    /// Round trips the lower bound charges before data flows: connection,
    /// manifest, config, tables of contents (layers in parallel).
    pub setup_round_trips: u32,
}

/// A whole run: its context and every sample.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BenchRun {
    /// Context.
    pub info: RunInfo,
    /// Samples in the order they were measured.
    pub samples: Vec<Sample>,
}

/// Median and 95th percentile of a set of figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stat<T> {
    /// The median (mean of the two middle values for an even count).
    pub median: T,
    /// The 95th percentile, nearest-rank.
    pub p95: T,
}

/// The summary of one (workload, profile, mode) row.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Workload name.
    pub workload: String,
    /// Profile name.
    pub profile: String,
    /// Mode.
    pub mode: Mode,
    /// Number of samples.
    pub samples: usize,
    /// Pull time.
    pub pull: Stat<Duration>,
    /// Run-to-ready time.
    pub run: Stat<Duration>,
    /// Pull + run.
    pub total: Stat<Duration>,
    /// Median bytes fetched.
    pub fetched_bytes: u64,
    /// Median registry requests.
    pub requests: u64,
    /// Median blocking misses.
    pub blocking_misses: u64,
    /// Median snapshotter CPU time.
    pub snapshotter_cpu: Duration,
}

/// Median and nearest-rank p95 of `values` (`None` when empty).
pub fn stat<T: Copy + Ord + Midpoint>(values: &[T]) -> Option<Stat<T>> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort();
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        T::midpoint(v[n / 2 - 1], v[n / 2])
    };
    // Nearest rank: the smallest value with at least 95 % of samples at or below it.
    let rank = (n * 95).div_ceil(100).max(1);
    Some(Stat {
        median,
        p95: v[rank - 1],
    })
}

/// The mean of two values, for medians of an even count.
pub trait Midpoint {
    /// The value halfway between `a` and `b`.
    fn midpoint(a: Self, b: Self) -> Self;
}

impl Midpoint for Duration {
    fn midpoint(a: Self, b: Self) -> Self {
        // Without forming a + b, which can overflow.
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        lo + (hi - lo) / 2
    }
}

impl Midpoint for u64 {
    fn midpoint(a: Self, b: Self) -> Self {
        a / 2 + b / 2 + (a % 2 + b % 2) / 2
    }
}

impl BenchRun {
    /// One summary per (workload, profile, mode) that has samples, in run order
    /// of workloads and profiles and [`Mode::ALL`] order of modes.
    pub fn summaries(&self) -> Vec<Summary> {
        let mut keys: Vec<(&str, &str)> = Vec::new();
        for s in &self.samples {
            if !keys.contains(&(s.workload.as_str(), s.profile.as_str())) {
                keys.push((&s.workload, &s.profile));
            }
        }
        let mut out = Vec::new();
        for (workload, profile) in keys {
            for mode in Mode::ALL {
                let rows: Vec<&Sample> = self
                    .samples
                    .iter()
                    .filter(|s| s.workload == workload && s.profile == profile && s.mode == mode)
                    .collect();
                let durations = |f: fn(&Sample) -> Duration| -> Option<Stat<Duration>> {
                    stat(&rows.iter().map(|s| f(s)).collect::<Vec<_>>())
                };
                let counts = |f: fn(&Sample) -> u64| -> u64 {
                    stat(&rows.iter().map(|s| f(s)).collect::<Vec<_>>()).map_or(0, |s| s.median)
                };
                let (Some(pull), Some(run), Some(total), Some(cpu)) = (
                    durations(|s| s.pull),
                    durations(|s| s.run),
                    durations(Sample::total),
                    durations(|s| s.snapshotter_cpu),
                ) else {
                    continue;
                };
                out.push(Summary {
                    workload: workload.to_string(),
                    profile: profile.to_string(),
                    mode,
                    samples: rows.len(),
                    pull,
                    run,
                    total,
                    fetched_bytes: counts(|s| s.fetched_bytes),
                    requests: counts(|s| s.requests),
                    blocking_misses: counts(|s| s.blocking_misses),
                    snapshotter_cpu: cpu.median,
                });
            }
        }
        out
    }

    /// The lower bound of benchmark-method: set-up round trips × RTT + working
    /// set ÷ bandwidth + the workload's run time from a warm local disk (the
    /// median `warm (overlayfs)` run). `None` when a part is unknown.
    pub fn lower_bound(&self, workload: &str, profile: &str) -> Option<Duration> {
        let w = self.info.workloads.iter().find(|w| w.name == workload)?;
        let p = self.info.profiles.iter().find(|p| p.name == profile)?;
        let ws = w.working_set_bytes?;
        let warm: Vec<Duration> = self
            .samples
            .iter()
            .filter(|s| s.workload == workload && s.mode == Mode::WarmFull)
            .map(|s| s.run)
            .collect();
        let warm = stat(&warm)?.median;
        let transfer = match p.bandwidth_bps {
            Some(bps) if bps > 0 => {
                Duration::try_from_secs_f64(ws as f64 * 8.0 / bps as f64).ok()?
            }
            _ => Duration::ZERO,
        };
        // Checked: figures read from a file may be absurd; no bound beats a panic.
        p.rtt
            .checked_mul(w.setup_round_trips)?
            .checked_add(transfer)?
            .checked_add(warm)
    }
}

/// Durations as seconds (floating point) in JSON, readable by any tool.
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn median_and_p95_follow_nearest_rank() {
        let s = stat(&[ms(5), ms(1), ms(3), ms(2), ms(4)]).unwrap();
        assert_eq!((s.median, s.p95), (ms(3), ms(5)));
        let s = stat(&[ms(4), ms(2)]).unwrap();
        assert_eq!((s.median, s.p95), (ms(3), ms(4)));
        let twenty: Vec<u64> = (1..=20).collect();
        let s = stat(&twenty).unwrap();
        assert_eq!((s.median, s.p95), (10, 19));
        assert_eq!(stat::<u64>(&[]), None);
        assert_eq!(u64::midpoint(u64::MAX, u64::MAX), u64::MAX);
        assert_eq!(
            Duration::midpoint(Duration::MAX, Duration::MAX),
            Duration::MAX
        );
        assert_eq!(
            Duration::midpoint(ms(4), ms(1)),
            Duration::from_micros(2500)
        );
    }

    fn sample(mode: Mode, index: u32, pull: u64, run: u64) -> Sample {
        Sample {
            workload: "w".into(),
            profile: "region".into(),
            mode,
            index,
            pull: ms(pull),
            run: ms(run),
            fetched_bytes: 1000 * u64::from(index + 1),
            requests: 3,
            blocking_misses: 0,
            snapshotter_cpu: ms(10),
        }
    }

    #[test]
    fn summaries_group_by_row_and_lower_bound_adds_its_parts() {
        let run = BenchRun {
            info: RunInfo {
                profiles: vec![ProfileInfo {
                    name: "region".into(),
                    rtt: ms(20),
                    bandwidth_bps: Some(200_000_000),
                }],
                workloads: vec![WorkloadInfo {
                    name: "w".into(),
                    command: vec!["true".into()],
                    ready: "".into(),
                    gzip_bytes: 0,
                    chunked_bytes: 0,
                    third_party_bytes: 0,
                    third_party_format: None,
                    working_set_bytes: Some(25_000_000),
                    setup_round_trips: 4,
                }],
                ..RunInfo::default()
            },
            samples: vec![
                sample(Mode::Full, 0, 1000, 300),
                sample(Mode::Full, 1, 1200, 100),
                sample(Mode::Full, 2, 1100, 200),
                sample(Mode::WarmFull, 0, 0, 50),
            ],
        };
        let rows = run.summaries();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].mode, Mode::Full);
        assert_eq!(rows[0].samples, 3);
        assert_eq!(rows[0].total.median, ms(1300));
        assert_eq!(rows[0].fetched_bytes, 2000);
        // 4 × 20 ms + 25 MB at 200 Mbit/s (1 s) + 50 ms warm run.
        assert_eq!(run.lower_bound("w", "region"), Some(ms(1130)));
        assert_eq!(run.lower_bound("w", "wan"), None);

        // Absurd figures (a hand-edited file) give no bound rather than a panic.
        let mut absurd = run.clone();
        absurd.info.workloads[0].working_set_bytes = Some(u64::MAX);
        absurd.info.profiles[0].bandwidth_bps = Some(1);
        assert_eq!(absurd.lower_bound("w", "region"), None);
        absurd.info.profiles[0].rtt = Duration::MAX;
        absurd.info.profiles[0].bandwidth_bps = None;
        assert_eq!(absurd.lower_bound("w", "region"), None);
        absurd.samples[0].pull = Duration::MAX;
        assert_eq!(absurd.samples[0].total(), Duration::MAX);
        assert_eq!(absurd.summaries()[0].total.p95, Duration::MAX);

        let json = serde_json::to_string(&run).unwrap();
        let back: BenchRun = serde_json::from_str(&json).unwrap();
        assert_eq!(back, run);
    }

    #[test]
    fn results_written_before_provenance_was_recorded_still_load() {
        let json = r#"{"info": {"command": "zest bench", "machine": "m", "zest_version": "0.1.0",
            "started": "2025-01-02T03:04:05Z", "profiles": [], "workloads": []}, "samples": []}"#;
        let run: BenchRun = serde_json::from_str(json).unwrap();
        assert_eq!(run.info.build, "");
        assert_eq!(run.info.load_start, "");
    }
}
