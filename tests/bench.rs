//! `zest bench` end to end, as a user runs it: a busybox image with a data layer
//! is pushed (gzip) to a real registry; `zest bench prepare` converts it, has
//! skopeo (the current one `scripts/newer-debian` extracts) write it as
//! zstd:chunked, and optimizes it for a workload that reads one small file; `zest bench run`
//! measures every mode through the link emulator with a real containerd, runc
//! and `zest serve`, and writes its results.
//!
//! The checks are on what the benchmark must get right, not on speed: every
//! mode has its samples, the lazy modes fetch less than the full pull (the
//! 1 MiB random file is never read), the profiled image fetches its start-up
//! set at mount time so the workload's reads do not block, the warm zest run
//! fetches nothing, and the report files are written.
//!
//! Needs root, /dev/fuse, docker-registry, containerd, runc, ctr and busybox;
//! without them it skips loudly (and fails under `CI=true`).

mod support;

use std::process::Command;

use zest_bench::results::{BenchRun, Mode};
use zest_oci::Reference;

use support::containerd::require_tools;
use support::{image, require_root_and_fuse, require_tool, Auth, Registry, REGISTRY_BIN};

const ZEST: &str = env!("CARGO_BIN_EXE_zest");

/// The current skopeo `scripts/newer-debian` extracts (Debian 12's cannot force
/// a recompression).
fn newer_skopeo() -> std::path::PathBuf {
    std::env::var_os("ZEST_NEWER_DEBIAN_DIR")
        .map_or_else(
            || std::path::PathBuf::from("/var/cache/zest/newer-debian"),
            std::path::PathBuf::from,
        )
        .join("skopeo/bin/skopeo")
}

fn can_run() -> bool {
    require_root_and_fuse()
        && require_tool(REGISTRY_BIN)
        && require_tools(&["containerd", "runc", "ctr", "busybox"])
        && (newer_skopeo().is_file()
            || support::unavailable(
                &format!("the newer skopeo is missing ({})", newer_skopeo().display()),
                "run scripts/install-deps (scripts/newer-debian extracts it)",
            ))
}

fn zest(args: &[&str]) -> String {
    let out = Command::new(ZEST)
        .args(args)
        .env("PATH", support::containerd::child_path())
        .output()
        .expect("run zest");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "zest {args:?} failed:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_prepares_images_and_measures_every_mode() {
    if !can_run() {
        return;
    }
    let registry = Registry::start(Auth::None);
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image::busybox_image(&dir.path().join("oci"), "latest").expect("busybox image");
    let host = registry.host();
    let reference: Reference = format!("{host}/bench/busybox:gzip").parse().unwrap();
    image::push_image(&registry.client(), &img, &reference).await;

    let workloads = dir.path().join("workloads.toml");
    std::fs::write(
        &workloads,
        "[[workload]]\nname = \"cat\"\nimage = \"busybox\"\n\
         command = [\"/bin/sh\", \"-c\", \"cat /data/hello.txt\"]\n\
         ready = \"hello from zest\"\nprofile_timeout_secs = 30\n",
    )
    .unwrap();
    let workloads = workloads.display().to_string();
    let skopeo = newer_skopeo().display().to_string();
    let prepare = ["bench", "prepare", "--skopeo", skopeo.as_str()];
    let common = [
        "--registry",
        host.as_str(),
        "--prefix",
        "bench",
        "--workloads",
        workloads.as_str(),
    ];

    let prepared = zest(&[&prepare[..], &common].concat());
    assert!(
        prepared.contains("bench/busybox:chunked: converted"),
        "{prepared}"
    );
    assert!(
        prepared.contains("bench/busybox:skopeo: written by"),
        "{prepared}"
    );
    assert!(prepared.contains("profile-cat"), "{prepared}");
    // Prepared images are kept: a second prepare does nothing.
    let again = zest(&[&prepare[..], &common].concat());
    assert!(again.contains("bench/busybox:chunked: exists"), "{again}");
    assert!(again.contains("bench/busybox:skopeo: exists"), "{again}");

    let out = dir.path().join("out");
    let work = dir.path().join("work");
    let (out_s, work_s) = (out.display().to_string(), work.display().to_string());
    let printed = zest(
        &[
            &["bench", "run"][..],
            &common,
            &[
                "--rtt",
                "2ms",
                "--bandwidth",
                "1gbit",
                "--samples",
                "2",
                "--out",
                &out_s,
                "--work-dir",
                &work_s,
                "--run-timeout",
                "60",
            ],
        ]
        .concat(),
    );
    assert!(printed.contains("rerun: zest bench run"), "{printed}");

    let run: BenchRun =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    // Provenance: the build (commit and profile) and the machine's load.
    assert!(
        run.info.build.starts_with("commit ") && run.info.build.ends_with(" build"),
        "build: {:?}",
        run.info.build
    );
    assert_eq!(run.info.load_start.split_whitespace().count(), 5);
    assert_eq!(run.info.load_end.split_whitespace().count(), 5);
    for mode in Mode::ALL {
        let n = run.samples.iter().filter(|s| s.mode == mode).count();
        assert_eq!(n, 2, "samples of {mode}: {:#?}", run.samples);
    }
    let median = |mode: Mode, f: fn(&zest_bench::results::Sample) -> u64| {
        let mut v: Vec<u64> = run
            .samples
            .iter()
            .filter(|s| s.mode == mode)
            .map(f)
            .collect();
        v.sort_unstable();
        // The median; for an even count, the mean of the two middle values.
        let mid = v.len() / 2;
        if v.len().is_multiple_of(2) {
            (v[mid - 1] + v[mid]) / 2
        } else {
            v[mid]
        }
    };
    let full = median(Mode::Full, |s| s.fetched_bytes);
    let lazy = median(Mode::Lazy, |s| s.fetched_bytes);
    let profiled = median(Mode::LazyProfile, |s| s.fetched_bytes);
    let third_party = median(Mode::ThirdParty, |s| s.fetched_bytes);
    assert!(
        full > 1 << 20,
        "the full pull fetches the whole image: {full}"
    );
    assert!(lazy < full, "lazy {lazy} vs full {full}");
    assert!(profiled < full, "lazy+profile {profiled} vs full {full}");
    assert!(
        third_party < full,
        "lazy (skopeo) {third_party} vs full {full}"
    );
    // Warm zest runs read from the cache only.
    for s in run.samples.iter().filter(|s| s.mode == Mode::WarmLazy) {
        assert_eq!(s.fetched_bytes, 0, "{s:?}");
        assert_eq!(s.blocking_misses, 0, "{s:?}");
    }
    // Lazy starts wait for the network; profiled ones wait less: their start-up
    // set is fetched at mount time.
    let lazy_misses = median(Mode::Lazy, |s| s.blocking_misses);
    // The learned profile (published by a teaching node's start) is prefetched
    // at mount time on the measured node, so its start waits no more than the
    // unprofiled start of the same image.
    let learned_misses = median(Mode::Learned, |s| s.blocking_misses);
    let third_party_misses = median(Mode::ThirdParty, |s| s.blocking_misses);
    assert!(learned_misses <= third_party_misses, "{:#?}", run.samples);
    let profiled_misses = median(Mode::LazyProfile, |s| s.blocking_misses);
    assert!(lazy_misses > 0, "{:#?}", run.samples);
    assert!(profiled_misses < lazy_misses, "{:#?}", run.samples);
    // The daemons' CPU is counted (clock ticks are coarse: summed over samples).
    for mode in [Mode::Full, Mode::Lazy] {
        let cpu: std::time::Duration = run
            .samples
            .iter()
            .filter(|s| s.mode == mode)
            .map(|s| s.snapshotter_cpu)
            .sum();
        assert!(!cpu.is_zero(), "{mode}: {:#?}", run.samples);
    }
    let w = &run.info.workloads[0];
    assert!(w.gzip_bytes > 1 << 20 && w.chunked_bytes > 1 << 20, "{w:?}");
    assert!(w.third_party_bytes > 1 << 20, "{w:?}");
    assert_eq!(
        w.third_party_format.as_deref(),
        Some("zstd:chunked, new generation (tar-split)"),
        "{w:?}"
    );
    assert!(w
        .working_set_bytes
        .is_some_and(|ws| ws > 0 && ws < w.chunked_bytes));
    assert!(run.lower_bound("cat", "custom").is_some());

    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("lazy+profile") && md.contains("zest bench run"),
        "{md}"
    );
    let svg = std::fs::read_to_string(out.join("results.svg")).unwrap();
    assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{svg}");
    // The nodes were removed.
    assert!(!work.join("node").exists());
}
