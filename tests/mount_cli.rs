//! `zest mount` as a user runs it: mount a converted image from a real registry,
//! read through the overlay, and unmount cleanly on SIGINT or an external umount.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use zest_image::convert::PlatformChoice;
use zest_oci::digest::Digest;
use zest_oci::Platform;

use support::{Auth, Registry, REGISTRY_BIN};

fn mounted(path: &Path) -> bool {
    zest_mount::is_mount_point(path).unwrap_or(false)
}

fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills the mount process if a test fails before it ends it.
struct Guard(Option<Child>);
impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_mount(
    registry: &Registry,
    image: &str,
    target: &Path,
    cache: &Path,
    extra: &[&str],
) -> Guard {
    let child = Command::new(env!("CARGO_BIN_EXE_zest"))
        .args([
            "mount",
            "--plain-http-host",
            &registry.host(),
            "--hosts-dir",
            "/nonexistent",
        ])
        .arg("--cache-dir")
        .arg(cache)
        .args(extra)
        .arg(image)
        .arg(target)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start zest mount");
    Guard(Some(child))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_reads_lazily_and_cleans_up() {
    if !support::require_root_and_fuse() || !support::require_tool(REGISTRY_BIN) {
        return;
    }
    let registry = Registry::start(Auth::None);
    let dir = tempfile::tempdir().unwrap();
    let Some(_source) = support::image::busybox_image(&dir.path().join("oci"), "src") else {
        return;
    };
    let image = format!("{}/mount/busybox:chunked", registry.host());
    let report = support::convert_image(
        &registry.client(),
        &format!("oci:{}:src", dir.path().join("oci").display()),
        &image,
        dir.path(),
        PlatformChoice::One(Platform::host()),
    )
    .await
    .unwrap();
    let data_layer = report.layers[1].output.digest.to_string();

    let target = dir.path().join("mnt");
    std::fs::create_dir(&target).unwrap();
    let cache = dir.path().join("cache");
    let target_c = target.canonicalize().unwrap();
    let mut guard = spawn_mount(&registry, &image, &target, &cache, &[]);
    wait_until("the overlay mount", Duration::from_secs(20), || {
        mounted(&target_c)
    });

    // Both layers are visible through the overlay; mounting fetched no file data.
    assert!(target.join("bin/busybox").exists());
    assert_eq!(
        registry.range_gets(&data_layer),
        1,
        "only the TOC before any read:\n{}",
        registry.access_log()
    );
    let hello = std::fs::read(target.join("data/hello.txt")).unwrap();
    assert_eq!(hello, b"hello from zest\n");
    let random = std::fs::read(target.join("data/random.bin")).unwrap();
    assert_eq!(
        Digest::of(&random),
        Digest::of(&support::pseudo_random(1 << 20, 1))
    );
    assert_eq!(
        std::fs::read_link(target.join("data/link")).unwrap(),
        Path::new("hello.txt")
    );

    // SIGINT: the command unmounts everything and exits 0 with a summary.
    let child = guard.0.take().unwrap();
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("unmounted; fetched"), "{stdout}");
    assert!(!mounted(&target_c), "overlay left mounted");
    let leftovers = zest_mount::mount_points_under(Path::new("/"))
        .unwrap()
        .iter()
        .filter(|p| p.to_string_lossy().contains("zest-mount."))
        .count();
    assert_eq!(leftovers, 0, "per-layer FUSE mounts left behind");

    // A second mount reads everything from the warm disk cache: no data requests.
    let before = registry.range_gets(&data_layer);
    let mut guard = spawn_mount(&registry, &image, &target, &cache, &["--layer", "1"]);
    wait_until("the layer mount", Duration::from_secs(20), || {
        mounted(&target_c)
    });
    let random2 = std::fs::read(target.join("data/random.bin")).unwrap();
    assert!(random2 == random);
    assert_eq!(
        registry.range_gets(&data_layer) - before,
        1,
        "warm cache: only the TOC is fetched"
    );

    // An external umount ends the command too.
    let status = Command::new("umount").arg(&target_c).status().unwrap();
    assert!(status.success());
    let mut child = guard.0.take().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "zest mount did not notice the unmount"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success());
}
