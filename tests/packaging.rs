//! What an operator installs, checked with the real tools.
//!
//! - The Debian package: `scripts/package-deb` builds it from this build's `zest`
//!   binary; its control fields, conffiles and file list are read back with
//!   `dpkg-deb`; the real `dpkg` installs it into a throwaway root (maintainer scripts
//!   run chrootless with `$DPKG_ROOT`); the installed unit passes
//!   `systemd-analyze verify`; the installed binary serves with the installed
//!   configuration until its socket answers a snapshot call; then reinstall, remove
//!   and purge leave what Debian semantics say they leave.
//! - The Kubernetes manifests under `packaging/kubernetes/`, validated against
//!   Kubernetes' schemas by `kubernetes-validate` (offline: the schemas ship with it),
//!   and the installer's edit of containerd's configuration, read back by the real
//!   `containerd config dump`.
//! - `docs/operations.md` documents every configuration key, metric and fallback
//!   reason.
//!
//! Every command is bounded in time.

mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use zest_api::snapshots as pb;

use support::containerd::{connect, TestResult};
use support::{require_tool, unavailable};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// Longest any one command of these tests may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(300);

/// Runs `command` to completion, killing it after [`COMMAND_LIMIT`]. Its output goes
/// through files, so a chatty command never blocks on a full pipe while waited for.
fn bounded(what: &str, command: &mut Command) -> TestResult<Output> {
    let dir = tempfile::tempdir()?;
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > COMMAND_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what} did not finish within {COMMAND_LIMIT:?}").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: std::fs::read(&out_path)?,
        stderr: std::fs::read(&err_path)?,
    })
}

/// Runs `command` (bounded), failing with its output when it does not succeed.
fn run(what: &str, command: &mut Command) -> TestResult<Output> {
    let out = bounded(what, command)?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(out)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tools_present(tools: &[&str]) -> bool {
    tools.iter().all(|t| require_tool(t))
}

/// Builds the package from the test's `zest` binary into `out`; returns its path.
fn build_deb(out: &Path) -> TestResult<PathBuf> {
    let built = run(
        "scripts/package-deb",
        Command::new("bash")
            .current_dir(REPO)
            .arg("scripts/package-deb")
            .arg("--binary")
            .arg(env!("CARGO_BIN_EXE_zest"))
            // The compression is not what is tested; xz of a debug binary takes long.
            .args(["--compression", "gzip", "--out"])
            .arg(out),
    )?;
    let text = stdout(&built);
    let deb = PathBuf::from(text.lines().last().unwrap_or_default());
    if !deb.is_file() {
        return Err(format!("package-deb printed {text:?}, not the path of a package").into());
    }
    Ok(deb)
}

/// One control field of the package.
fn field(deb: &Path, name: &str) -> TestResult<String> {
    let out = run(
        "dpkg-deb --field",
        Command::new("dpkg-deb").arg("--field").arg(deb).arg(name),
    )?;
    Ok(stdout(&out).trim().to_owned())
}

/// A throwaway root that dpkg installs into: an empty database that knows, from this
/// machine's own database, the packages the zest package depends on (so an
/// unsatisfiable Depends fails the install as it would on a real system).
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new(depends: &str) -> TestResult<Self> {
        let dir = tempfile::tempdir()?;
        let admin = dir.path().join("var/lib/dpkg");
        for sub in ["info", "updates", "triggers"] {
            std::fs::create_dir_all(admin.join(sub))?;
        }
        std::fs::create_dir_all(dir.path().join("var/log"))?;
        let mut status = String::new();
        for alternatives in depends.split(',') {
            // "libc6 (>= 2.34)" or "a | b": the first alternative this machine has.
            let names: Vec<&str> = alternatives
                .split('|')
                .filter_map(|a| a.split_whitespace().next())
                .collect();
            let found = names.iter().find_map(|name| {
                let out = bounded(
                    "dpkg-query -s",
                    Command::new("dpkg-query").args(["-s", name]),
                )
                .ok()?;
                out.status
                    .success()
                    .then(|| (name.to_string(), stdout(&out)))
            });
            let Some((name, stanza)) = found else {
                return Err(
                    format!("no package of Depends {alternatives:?} is installed here").into(),
                );
            };
            status.push_str(stanza.trim_end());
            status.push_str("\n\n");
            // An empty file list, so dpkg does not warn that it is missing.
            let full = run(
                "dpkg-query",
                Command::new("dpkg-query").args(["-W", "-f", "${binary:Package}", &name]),
            )?;
            std::fs::write(
                admin.join(format!("info/{}.list", stdout(&full).trim())),
                "",
            )?;
        }
        std::fs::write(admin.join("status"), status)?;
        Ok(Root { dir })
    }

    fn path(&self, inside: &str) -> PathBuf {
        self.dir.path().join(inside.trim_start_matches('/'))
    }

    /// Runs dpkg on this root, maintainer scripts included.
    fn dpkg(&self, args: &[&str], env: &[(&str, &str)]) -> TestResult<Output> {
        let mut command = Command::new("dpkg");
        command
            .arg(format!("--root={}", self.dir.path().display()))
            .args(["--force-script-chrootless", "--force-not-root"])
            .args(args)
            .env_remove("ZEST_PURGE_STATE");
        for (k, v) in env {
            command.env(k, v);
        }
        run(&format!("dpkg {args:?}"), &mut command)
    }

    fn status(&self) -> String {
        let admin = format!("--admindir={}", self.path("var/lib/dpkg").display());
        let mut query = Command::new("dpkg-query");
        query.arg(admin).args(["-W", "-f", "${Status}", "zest"]);
        bounded("dpkg-query -W", &mut query)
            .map(|o| stdout(&o))
            .unwrap_or_default()
    }

    fn enabled(&self) -> bool {
        let link = self.path("etc/systemd/system/multi-user.target.wants/zest.service");
        std::fs::read_link(&link).is_ok_and(|t| t == Path::new("/lib/systemd/system/zest.service"))
    }
}

fn mode(path: &Path) -> TestResult<u32> {
    Ok(std::fs::symlink_metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .permissions()
        .mode()
        & 0o7777)
}

/// Unmounts a test mount, also when the test fails.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("--lazy")
            .arg(&self.0)
            .stdin(Stdio::null())
            .status();
    }
}

/// Kills the served process if the test fails before it is stopped.
struct Served(Option<Child>);

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts the installed binary with the installed configuration, its socket and state
/// moved into the root; waits for systemd's READY=1 and a snapshot call; stops it
/// with SIGTERM as systemd does.
async fn serve_installed(root: &Root) -> TestResult {
    let socket = root.path("run/zest/zest.sock");
    let state = root.path("var/lib/zest");
    let notify_path = root.path("run/notify.sock");
    std::fs::create_dir_all(root.path("run"))?;
    let notify = UnixDatagram::bind(&notify_path)
        .map_err(|e| format!("binding {}: {e}", notify_path.display()))?;
    notify.set_read_timeout(Some(Duration::from_secs(1)))?;
    let log = std::fs::File::create(root.path("var/log/zest.log"))?;
    let child = Command::new(root.path("usr/bin/zest"))
        .arg("serve")
        .arg("--config")
        .arg(root.path("etc/zest/config.toml"))
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state)
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("ZEST_CONFIG")
        .env_remove("ZEST_LOG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let mut served = Served(Some(child));
    let log_text = || std::fs::read_to_string(root.path("var/log/zest.log")).unwrap_or_default();

    // Type=notify: the unit is started once zest says READY=1.
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(Some(status)) = served.0.as_mut().map(|c| c.try_wait()).transpose()? {
            return Err(
                format!("zest serve exited before READY=1: {status}\n{}", log_text()).into(),
            );
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(format!("no READY=1 from zest serve in 60 s\n{}", log_text()).into());
        }
        match notify.recv(&mut buf) {
            Ok(n)
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1") =>
            {
                break
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    assert_eq!(
        mode(&socket)? & 0o777,
        0o660,
        "socket mode from the installed config"
    );
    let mut client = connect(&socket).await?;
    let mut listed = client
        .list(pb::ListSnapshotsRequest {
            snapshotter: "zest".into(),
            filters: Vec::new(),
        })
        .await?
        .into_inner();
    let mut names = Vec::new();
    while let Some(batch) = listed.message().await? {
        names.extend(batch.info.into_iter().map(|i| i.name));
    }
    assert!(names.is_empty(), "a fresh state lists {names:?}");
    drop(client);
    assert!(
        state.join("metadata.redb").is_file(),
        "state written under the moved state dir"
    );

    let mut child = served.0.take().ok_or("zest serve already stopped")?;
    let pid = i32::try_from(child.id())?;
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "zest serve did not stop within 30 s of SIGTERM\n{}",
                log_text()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "zest serve exited with {status}\n{}",
        log_text()
    );
    assert!(!socket.exists(), "the socket is removed on a clean stop");
    Ok(())
}

/// Build, inspect, install, verify, serve, reinstall, remove, purge.
#[tokio::test(flavor = "multi_thread")]
async fn debian_package_installs_serves_and_purges() -> TestResult {
    if !tools_present(&[
        "bash",
        "dpkg",
        "dpkg-deb",
        "dpkg-query",
        "dpkg-shlibdeps",
        "strip",
        "systemctl",
        "systemd-analyze",
    ]) {
        return Ok(());
    }
    let out = tempfile::tempdir()?;
    let deb = build_deb(out.path())?;

    // Control fields.
    let arch = stdout(&run(
        "dpkg --print-architecture",
        Command::new("dpkg").arg("--print-architecture"),
    )?);
    assert_eq!(field(&deb, "Package")?, "zest");
    assert_eq!(
        field(&deb, "Version")?,
        format!("{}-1", env!("CARGO_PKG_VERSION").replacen('-', "~", 1))
    );
    assert_eq!(field(&deb, "Architecture")?, arch.trim());
    let depends = field(&deb, "Depends")?;
    assert!(depends.contains("libc6 (>= "), "Depends: {depends}");
    assert!(!field(&deb, "Maintainer")?.is_empty());
    assert!(!field(&deb, "Description")?.is_empty());

    // Control archive: conffiles and maintainer scripts.
    let control = out.path().join("control");
    run(
        "dpkg-deb --control",
        Command::new("dpkg-deb")
            .arg("--control")
            .arg(&deb)
            .arg(&control),
    )?;
    assert_eq!(
        std::fs::read_to_string(control.join("conffiles"))?,
        "/etc/zest/config.toml\n"
    );
    for script in ["postinst", "prerm", "postrm"] {
        assert_eq!(mode(&control.join(script))?, 0o755, "{script}");
        run(
            &format!("sh -n {script}"),
            Command::new("sh").arg("-n").arg(control.join(script)),
        )?;
    }

    // The file list: exactly these files, owned by root, with these modes.
    let listing = stdout(&run(
        "dpkg-deb --contents",
        Command::new("dpkg-deb").arg("--contents").arg(&deb),
    )?);
    let mut files = BTreeSet::new();
    for line in listing.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let [perms, owner, _size, _date, _time, path] = cols[..] else {
            return Err(format!("unexpected dpkg-deb --contents line {line:?}").into());
        };
        assert_eq!(owner, "root/root", "{line}");
        if !perms.starts_with('d') {
            files.insert((path.trim_start_matches('.').to_owned(), perms.to_owned()));
        }
    }
    let expected: BTreeSet<(String, String)> = [
        ("/usr/bin/zest", "-rwxr-xr-x"),
        ("/lib/systemd/system/zest.service", "-rw-r--r--"),
        ("/etc/zest/config.toml", "-rw-r--r--"),
        ("/usr/share/zest/containerd-config.toml", "-rw-r--r--"),
        ("/usr/share/doc/zest/copyright", "-rw-r--r--"),
        ("/usr/share/doc/zest/README.md", "-rw-r--r--"),
        ("/usr/share/doc/zest/operations.md", "-rw-r--r--"),
        ("/usr/share/doc/zest/kubernetes.md", "-rw-r--r--"),
    ]
    .into_iter()
    .map(|(p, m)| (p.to_owned(), m.to_owned()))
    .collect();
    assert_eq!(files, expected);

    // Install into a throwaway root with the real dpkg and maintainer scripts.
    let root = Root::new(&depends)?;
    root.dpkg(&["--install", deb.to_str().ok_or("path")?], &[])?;
    assert_eq!(root.status(), "install ok installed");
    assert_eq!(mode(&root.path("usr/bin/zest"))?, 0o755);
    for file in [
        "lib/systemd/system/zest.service",
        "etc/zest/config.toml",
        "usr/share/zest/containerd-config.toml",
    ] {
        assert_eq!(mode(&root.path(file))?, 0o644, "{file}");
    }
    assert_eq!(
        std::fs::read_to_string(root.path("etc/zest/config.toml"))?,
        std::fs::read_to_string(Path::new(REPO).join("packaging/config.toml"))?
    );
    let unit = std::fs::read_to_string(root.path("lib/systemd/system/zest.service"))?;
    let exec: Vec<&str> = unit
        .lines()
        .filter(|l| l.starts_with("ExecStart="))
        .collect();
    assert!(
        !exec.is_empty()
            && exec
                .iter()
                .all(|l| l.starts_with("ExecStart=/usr/bin/zest ")),
        "the unit must start the packaged binary: {exec:?}"
    );
    assert!(root.enabled(), "the first install enables zest.service");

    // systemd's own check of the installed unit, resolved inside the root; the root
    // gets this machine's systemd units (targets) as a real system has them.
    // /lib/systemd/system on systems without merged /usr.
    let host_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .map(Path::new)
        .into_iter()
        .find(|d| d.join("multi-user.target").exists());
    if let Some(host_units) = host_units {
        let units = root.path("usr/lib/systemd");
        std::fs::create_dir_all(&units)?;
        run(
            "cp systemd units",
            Command::new("cp").arg("-a").arg(host_units).arg(&units),
        )?;
        let verified = run(
            "systemd-analyze verify",
            Command::new("systemd-analyze")
                .arg(format!("--root={}", root.dir.path().display()))
                .arg("verify")
                .arg(root.path("lib/systemd/system/zest.service")),
        )?;
        let stderr = String::from_utf8_lossy(&verified.stderr);
        // Keys newer than this machine's systemd are ignored by it, as intended: the
        // unit documents which ones and what older systemd does without them.
        let newer_keys = ["FileDescriptorStorePreserve"];
        let about_zest: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("zest"))
            .filter(|l| {
                !newer_keys
                    .iter()
                    .any(|k| l.contains(&format!("Unknown key '{k}'")))
            })
            .collect();
        assert!(
            about_zest.is_empty(),
            "systemd-analyze verify warns about the unit: {about_zest:?}"
        );
    } else {
        unavailable(
            "this machine has no systemd unit directory to verify against",
            "install systemd",
        );
    }

    serve_installed(&root).await?;

    // Reinstall = upgrade path: the administrator disabled the unit; it stays so.
    std::fs::remove_file(root.path("etc/systemd/system/multi-user.target.wants/zest.service"))?;
    root.dpkg(&["--install", deb.to_str().ok_or("path")?], &[])?;
    assert!(
        !root.enabled(),
        "an upgrade must not enable a disabled unit"
    );
    std::fs::write(
        root.path("etc/zest/config.toml"),
        "[lazy]\nenabled = false\n",
    )?;
    // Local changes to a conffile survive an upgrade.
    root.dpkg(
        &["--force-confold", "--install", deb.to_str().ok_or("path")?],
        &[],
    )?;
    assert_eq!(
        std::fs::read_to_string(root.path("etc/zest/config.toml"))?,
        "[lazy]\nenabled = false\n"
    );

    // Remove: the program goes, configuration and state stay.
    root.dpkg(&["--remove", "zest"], &[])?;
    assert!(!root.path("usr/bin/zest").exists());
    assert!(!root.path("lib/systemd/system/zest.service").exists());
    assert!(root.path("etc/zest/config.toml").exists());
    assert!(root.path("var/lib/zest/metadata.redb").exists());

    // Purge: /etc/zest (with what the administrator added there, which dpkg alone
    // would leave) and enablement go; the state stays unless asked.
    let hosts = root.path("etc/zest/certs.d/registry.example.com");
    std::fs::create_dir_all(&hosts)?;
    std::fs::write(
        hosts.join("hosts.toml"),
        "server = \"https://registry.example.com\"\n",
    )?;
    root.dpkg(&["--purge", "zest"], &[])?;
    assert_eq!(root.status(), "");
    assert!(!root.path("etc/zest").exists(), "purge removes /etc/zest");
    assert!(
        root.path("var/lib/zest/metadata.redb").exists(),
        "state kept"
    );

    // A fresh install after a purge enables again. Purge with ZEST_PURGE_STATE=1
    // never removes across a mount (a container's layer still mounted there)...
    root.dpkg(&["--install", deb.to_str().ok_or("path")?], &[])?;
    assert!(root.enabled());
    if support::require_root_and_fuse() {
        let target = root.path("var/lib/zest/snapshots/1/fs");
        std::fs::create_dir_all(&target)?;
        run(
            "mount tmpfs",
            Command::new("mount")
                .args(["-t", "tmpfs", "zest-test"])
                .arg(&target),
        )?;
        let mounted = Unmount(target.clone());
        std::fs::write(target.join("data"), "a container's file")?;
        let purged = root.dpkg(&["--purge", "zest"], &[("ZEST_PURGE_STATE", "1")])?;
        assert!(
            String::from_utf8_lossy(&purged.stderr).contains("still mounted"),
            "{purged:?}"
        );
        assert_eq!(
            std::fs::read_to_string(target.join("data"))?,
            "a container's file"
        );
        drop(mounted);
        root.dpkg(&["--install", deb.to_str().ok_or("path")?], &[])?;
    }
    // ... and otherwise removes the state too.
    root.dpkg(&["--purge", "zest"], &[("ZEST_PURGE_STATE", "1")])?;
    assert!(
        !root.path("var/lib/zest").exists(),
        "state removed when asked"
    );
    assert!(!root.enabled(), "purge removes the enablement link");
    Ok(())
}

/// Every Kubernetes manifest validates against Kubernetes' schemas, and the kustomize
/// base lists exactly the manifests beside it and generates its ConfigMaps from files
/// that exist (config.toml identical to the packaged one).
#[test]
fn kubernetes_manifests_validate() -> TestResult {
    if !require_tool("kubernetes-validate") {
        return Ok(());
    }
    let base = Path::new(REPO).join("packaging/kubernetes/base");
    let kustomization = std::fs::read_to_string(base.join("kustomization.yaml"))?;
    // The items of the top-level `resources:` list, and every file a generator names.
    let (mut resources, mut generated) = (BTreeSet::new(), BTreeSet::new());
    let (mut section, mut in_files) = (String::new(), false);
    for line in kustomization
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
    {
        if !line.starts_with(' ') && !line.starts_with('-') && !line.is_empty() {
            section = line.trim_end().to_owned();
            continue;
        }
        let trimmed = line.trim();
        if section == "configMapGenerator:" && trimmed.ends_with(':') {
            in_files = trimmed == "files:";
        }
        if let Some(item) = trimmed.strip_prefix("- ") {
            if item.contains(':') {
                // `- name: ...` starts another generator.
                in_files = false;
                continue;
            }
            match section.as_str() {
                "resources:" => {
                    resources.insert(item.to_owned());
                }
                "configMapGenerator:" if in_files => {
                    generated.insert(item.to_owned());
                }
                _ => {}
            }
        }
    }
    let mut manifests = BTreeSet::new();
    for entry in std::fs::read_dir(&base)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            manifests.insert(name);
        }
    }
    assert!(manifests.contains("daemonset.yaml"), "{manifests:?}");
    assert_eq!(
        resources, manifests,
        "kustomization.yaml resources vs files"
    );
    assert_eq!(
        generated,
        ["config.toml", "install.sh"].map(String::from).into(),
        "configMapGenerator files"
    );
    assert_eq!(
        std::fs::read_to_string(base.join("config.toml"))?,
        std::fs::read_to_string(Path::new(REPO).join("packaging/config.toml"))?,
        "packaging/kubernetes/base/config.toml must stay a copy of packaging/config.toml"
    );

    let mut command = Command::new("kubernetes-validate");
    command.arg("--strict");
    for m in &manifests {
        command.arg(base.join(m));
    }
    let out = bounded("kubernetes-validate", &mut command)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubernetes-validate failed:\n{text}");
    let passed = text
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert!(passed >= manifests.len(), "kubernetes-validate:\n{text}");
    assert!(
        !text.contains("WARN") && !text.contains("ERROR"),
        "kubernetes-validate:\n{text}"
    );
    Ok(())
}

/// Runs the installer's containerd step on `file`, checked by the real containerd.
fn merge(file: &Path) -> TestResult<Output> {
    bounded(
        "install.sh merge-containerd-config",
        Command::new("bash")
            .arg(Path::new(REPO).join("packaging/kubernetes/base/install.sh"))
            .arg("merge-containerd-config")
            .arg(file)
            .env("ZEST_SOCKET", "/run/zest/zest.sock"),
    )
}

/// What containerd itself makes of a configuration file.
fn dump(file: &Path) -> TestResult<String> {
    let out = run(
        "containerd config dump",
        Command::new("containerd")
            .arg("--config")
            .arg(file)
            .args(["config", "dump"]),
    )?;
    Ok(stdout(&out))
}

/// The installer's containerd step: a stock configuration is switched to zest (as
/// containerd reads it), an absent one is created, one that has zest already is left
/// byte for byte, and ones it cannot edit safely are refused unchanged.
#[test]
fn installer_points_containerd_at_zest() -> TestResult {
    if !tools_present(&["bash", "containerd"]) {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let stock = dir.path().join("stock.toml");
    let default = run(
        "containerd config default",
        Command::new("containerd").args(["config", "default"]),
    )?;
    std::fs::write(&stock, &default.stdout)?;
    assert!(dump(&stock)?.contains("snapshotter = \"overlayfs\""));

    let selected = |text: &str| {
        text.contains("snapshotter = \"zest\"")
            && text.contains("disable_snapshot_annotations = false")
            && text.contains("[proxy_plugins.zest]")
            && text.contains("address = \"/run/zest/zest.sock\"")
            && !text.contains("snapshotter = \"overlayfs\"")
    };
    let out = merge(&stock)?;
    assert!(out.status.success(), "{out:?}");
    let merged = std::fs::read_to_string(&stock)?;
    assert!(selected(&dump(&stock)?), "containerd reads:\n{merged}");
    assert_eq!(
        std::fs::read(dir.path().join("stock.toml.zest-backup"))?,
        default.stdout,
        "the previous file is kept"
    );
    // Only if absent: a second run leaves the file as it is.
    assert!(merge(&stock)?.status.success());
    assert_eq!(std::fs::read_to_string(&stock)?, merged);

    let absent = dir.path().join("absent.toml");
    assert!(merge(&absent)?.status.success());
    assert!(selected(&dump(&absent)?));

    // Version 1 (no version key) and a file containerd rejects once edited.
    for (name, text) in [
        ("v1.toml", "[grpc]\n  address = \"/run/containerd/containerd.sock\"\n"),
        (
            "dotted.toml",
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  containerd.snapshotter = \"overlayfs\"\n",
        ),
    ] {
        let file = dir.path().join(name);
        std::fs::write(&file, text)?;
        let out = merge(&file)?;
        assert!(!out.status.success(), "{name} must be refused");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("by hand"),
            "{name}: the error says what to do: {out:?}"
        );
        assert_eq!(std::fs::read_to_string(&file)?, text, "{name} left unchanged");
        assert!(!dir.path().join(format!("{name}.zest-new")).exists());
    }
    Ok(())
}

/// docs/operations.md covers every configuration key of packaging/config.toml, every
/// metric zest exports and every fallback reason, so a new one cannot ship without
/// its operator documentation.
#[test]
fn operations_doc_covers_keys_metrics_and_reasons() -> TestResult {
    let read = |p: &str| std::fs::read_to_string(Path::new(REPO).join(p));
    let doc = read("docs/operations.md")?;
    let mut missing = Vec::new();

    let key = regex::Regex::new(r"^(?:# )?([a-z_]+) = ")?;
    let mut section = String::new();
    let mut keys = 0;
    for line in read("packaging/config.toml")?.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some(k) = key.captures(line).and_then(|c| c.get(1)) {
            keys += 1;
            let name = format!("`{section}.{}`", k.as_str());
            if !doc.contains(&name) {
                missing.push(name);
            }
        }
    }
    assert!(keys > 40, "only {keys} keys found in packaging/config.toml");

    let metric = regex::Regex::new(r#""(zest_[a-z_]+)""#)?;
    let metrics_rs = read("crates/daemon/src/metrics.rs")?;
    let production = metrics_rs.split("#[cfg(test)]").next().unwrap_or_default();
    let names: BTreeSet<&str> = metric
        .captures_iter(production)
        .filter_map(|c| c.get(1).map(|m| m.as_str()))
        .collect();
    assert!(names.len() > 30, "only {} metrics found", names.len());
    for name in names {
        if !doc.contains(&format!("| `{name}` |")) {
            missing.push(name.to_owned());
        }
    }

    let reason = regex::Regex::new(r#"FallbackReason::\w+ => "([a-z-]+)""#)?;
    let remote_rs = read("crates/snapshotter/src/remote.rs")?;
    let codes: Vec<&str> = reason
        .captures_iter(&remote_rs)
        .filter_map(|c| c.get(1).map(|m| m.as_str()))
        .collect();
    assert!(codes.len() >= 10, "fallback codes found: {codes:?}");
    for code in codes {
        if !doc.contains(&format!("| `{code}` |")) {
            missing.push(code.to_owned());
        }
    }
    assert!(
        missing.is_empty(),
        "docs/operations.md does not document: {missing:?}"
    );
    Ok(())
}
