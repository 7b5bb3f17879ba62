//! The mount system calls and the mount table: the only code of zest that calls
//! `mount(2)` or `umount2(2)` or reads a mount table (`/proc/self/mountinfo`,
//! and a container process's, for the top layer of its root:
//! [`root_overlay_top_layer`]).
//!
//! Every function takes typed arguments (paths, [`MountFlags`], an [`Overlay`]
//! description), converts them to C strings itself and reports failures as
//! [`SysError`], which names the call and the path and keeps the OS error number
//! ([`SysError::raw_os_error`], [`SysError::is_busy`], [`SysError::is_not_mounted`])
//! so callers can decide what a busy or missing mount means to them.
//!
//! All of these need `CAP_SYS_ADMIN` in the caller's mount namespace (zest runs
//! as root); without it the kernel answers `EPERM`.
//!
//! Invariant: [`remove_tree`] deletes nothing while any mount is left at or below
//! the directory, so a removal racing with a live (FUSE or overlay) mount cannot
//! delete a layer's or a container's files through it.

use std::ffi::{CStr, CString, OsStr};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The mount table of the calling process (its mount namespace).
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// The kernel takes mount options (the `data` argument) as one page.
const MAX_OPTIONS: usize = 4095;

/// Why a mount-related call failed.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// A system call (or reading the mount table, or deleting files) failed.
    #[error("{op} {}: {source}{}", path.display(), hint(source))]
    Io {
        /// What was being done (`"mount overlay on"`, `"unmount"`, ...).
        op: &'static str,
        /// The path it was done on.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A path cannot be passed to the kernel as is.
    #[error("{} cannot be used {usage}: {reason}; use a plain path", path.display())]
    UnsupportedPath {
        /// The offending path.
        path: PathBuf,
        /// Where it was to be used (`"as an overlay layer"`, `"as a mount path"`).
        usage: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A mount source, filesystem type or option string holds a NUL byte.
    #[error("mount on {}: the {what} {value:?} contains a NUL byte", target.display())]
    NulInArgument {
        /// The mountpoint.
        target: PathBuf,
        /// Which argument (`"source"`, `"filesystem type"`, `"options"`).
        what: &'static str,
        /// Its value.
        value: String,
    },
    /// The overlay options do not fit in the page the kernel accepts.
    #[error(
        "overlay on {}: {layers} layers need {len} bytes of options, over the kernel's {MAX_OPTIONS}; \
         mount the layers on shorter paths",
        target.display()
    )]
    OptionsTooLong {
        /// The overlay's mountpoint.
        target: PathBuf,
        /// Number of lower layers.
        layers: usize,
        /// Length of the options.
        len: usize,
    },
    /// [`remove_tree`] found a mount it could not detach below the directory.
    #[error("refusing to remove {}: {} is still mounted; unmount it and retry", dir.display(), mount_point.display())]
    StillMounted {
        /// The directory to remove.
        dir: PathBuf,
        /// A mount left at or below it.
        mount_point: PathBuf,
    },
}

/// A remedy for the common mount errors, appended to the message.
fn hint(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EPERM) => " (mounting needs root, CAP_SYS_ADMIN)",
        Some(libc::EBUSY) => " (files under it are still open)",
        _ => "",
    }
}

impl SysError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> SysError {
        SysError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The OS error number, when a system call failed.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            SysError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// `EBUSY`: files under the mount are open (or something is mounted below it).
    pub fn is_busy(&self) -> bool {
        self.raw_os_error() == Some(libc::EBUSY)
    }

    /// `EINVAL` from an unmount: the path is not (or no longer) a mount point.
    pub fn is_not_mounted(&self) -> bool {
        self.raw_os_error() == Some(libc::EINVAL)
    }
}

impl From<SysError> for io::Error {
    /// The OS error itself for a failed call (its number preserved), else an
    /// `InvalidInput` error carrying the message.
    fn from(e: SysError) -> io::Error {
        match e {
            SysError::Io { source, .. } => source,
            other => io::Error::new(io::ErrorKind::InvalidInput, other),
        }
    }
}

/// Flags of `mount(2)`, the subset zest uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MountFlags(libc::c_ulong);

impl MountFlags {
    /// No flag.
    pub const NONE: MountFlags = MountFlags(0);
    /// `MS_RDONLY`: read-only.
    pub const RDONLY: MountFlags = MountFlags(libc::MS_RDONLY);
    /// `MS_NOSUID`: ignore setuid/setgid bits.
    pub const NOSUID: MountFlags = MountFlags(libc::MS_NOSUID);
    /// `MS_NODEV`: ignore device nodes.
    pub const NODEV: MountFlags = MountFlags(libc::MS_NODEV);
    /// `MS_NOEXEC`: refuse to execute programs.
    pub const NOEXEC: MountFlags = MountFlags(libc::MS_NOEXEC);
    /// `MS_NOATIME`: never update access times.
    pub const NOATIME: MountFlags = MountFlags(libc::MS_NOATIME);
}

impl std::ops::BitOr for MountFlags {
    type Output = MountFlags;
    fn bitor(self, other: MountFlags) -> MountFlags {
        MountFlags(self.0 | other.0)
    }
}

impl std::ops::BitOrAssign for MountFlags {
    fn bitor_assign(&mut self, other: MountFlags) {
        self.0 |= other.0;
    }
}

fn path_cstring(p: &Path) -> Result<CString, SysError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| SysError::UnsupportedPath {
        path: p.to_path_buf(),
        usage: "as a mount path",
        reason: "it contains a NUL byte",
    })
}

fn str_cstring(s: &str, what: &'static str, target: &Path) -> Result<CString, SysError> {
    CString::new(s).map_err(|_| SysError::NulInArgument {
        target: target.to_path_buf(),
        what,
        value: s.to_string(),
    })
}

/// The raw call; `None` arguments are passed as null pointers.
fn mount_raw(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is null or a NUL-terminated string borrowed for the
    // duration of the call; the kernel copies them and keeps no reference.
    let rc = unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn umount_raw(target: &Path, flags: libc::c_int, op: &'static str) -> Result<(), SysError> {
    let t = path_cstring(target)?;
    // SAFETY: `t` is a NUL-terminated string that outlives the call.
    let rc = unsafe { libc::umount2(t.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(SysError::io(op, target, io::Error::last_os_error()))
    }
}

/// Mounts a filesystem of type `fstype` from `source` on `target` (an existing
/// directory), with `data` as its comma-separated options (`""` for none).
///
/// Used for filesystems that are not a bind or an overlay: FUSE (`fuse.zest`,
/// where `source` is only the name shown in the mount table), tmpfs, or whatever
/// a containerd mount names. Errors: `EPERM` without `CAP_SYS_ADMIN`, `ENOENT`
/// when `target` is missing, `ENODEV` for an unknown type, `EINVAL` for bad options.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MountFlags,
    data: &str,
) -> Result<(), SysError> {
    let s = str_cstring(source, "source", target)?;
    let t = path_cstring(target)?;
    let f = str_cstring(fstype, "filesystem type", target)?;
    let d = str_cstring(data, "options", target)?;
    let data = (!data.is_empty()).then_some(d.as_c_str());
    mount_raw(Some(&s), &t, Some(&f), flags.0, data).map_err(|e| SysError::io("mount", target, e))
}

/// A writable tmpfs on `target` whose root directory has permissions `mode`:
/// scratch space whose content disappears with the mount.
pub fn tmpfs(target: &Path, mode: u32) -> Result<(), SysError> {
    mount(
        "tmpfs",
        target,
        "tmpfs",
        MountFlags::NONE,
        &format!("mode={mode:o}"),
    )
    .map_err(|e| match e {
        SysError::Io { path, source, .. } => SysError::Io {
            op: "mount tmpfs on",
            path,
            source,
        },
        other => other,
    })
}

/// How [`bind`] binds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindOptions {
    /// Also bind the mounts below `source` (`MS_REC`, containerd's `rbind`).
    pub recursive: bool,
    /// Make the new mount read-only.
    pub readonly: bool,
}

/// Makes the tree at `source` visible at `target` too (`MS_BIND`).
///
/// A bind mount ignores `MS_RDONLY` on creation, so a read-only bind is made in
/// two calls: the bind, then a read-only remount of it; if the remount fails the
/// bind is detached again, so `target` is never left writable. Errors: `EPERM`
/// without `CAP_SYS_ADMIN`, `ENOENT` when either path is missing.
pub fn bind(source: &Path, target: &Path, options: BindOptions) -> Result<(), SysError> {
    let s = path_cstring(source)?;
    let t = path_cstring(target)?;
    let mut flags = libc::MS_BIND;
    if options.recursive {
        flags |= libc::MS_REC;
    }
    mount_raw(Some(&s), &t, None, flags, None)
        .map_err(|e| SysError::io("bind-mount onto", target, e))?;
    if options.readonly {
        let remount = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
        if let Err(e) = mount_raw(None, &t, None, remount, None) {
            let _ = detach(target);
            return Err(SysError::io("make read-only the bind mount", target, e));
        }
    }
    Ok(())
}

/// The layers of an [`overlay`] mount.
#[derive(Clone, Debug)]
pub struct Overlay<'a> {
    /// The read-only lower directories, top layer first (overlayfs's `lowerdir`
    /// order). Without `upper`, at least two are needed.
    pub lower: Vec<&'a Path>,
    /// The writable upper directory and its work directory (same filesystem, work
    /// empty). `None` makes the overlay read-only.
    pub upper: Option<(&'a Path, &'a Path)>,
}

/// Mounts overlayfs on `target`, stacking `layers`.
///
/// overlayfs splits `lowerdir` at `:` and its options at `,`, so paths holding
/// those (or `\`, a newline, or non-UTF-8 bytes) are refused rather than risk a
/// mis-parse ([`SysError::UnsupportedPath`]), and the options must fit in one
/// page ([`SysError::OptionsTooLong`]). A read-only overlay gets `MS_RDONLY`.
/// Errors from the call: `EPERM` without `CAP_SYS_ADMIN`, `EINVAL` for a single
/// lower layer without upper or an upper on an unsuitable filesystem.
pub fn overlay(target: &Path, layers: &Overlay<'_>) -> Result<(), SysError> {
    let mut options = String::from("lowerdir=");
    for (i, p) in layers.lower.iter().enumerate() {
        if i > 0 {
            options.push(':');
        }
        options.push_str(overlay_path(p)?);
    }
    if let Some((upper, work)) = layers.upper {
        options.push_str(",upperdir=");
        options.push_str(overlay_path(upper)?);
        options.push_str(",workdir=");
        options.push_str(overlay_path(work)?);
    }
    if options.len() > MAX_OPTIONS {
        return Err(SysError::OptionsTooLong {
            target: target.to_path_buf(),
            layers: layers.lower.len(),
            len: options.len(),
        });
    }
    let flags = if layers.upper.is_none() {
        MountFlags::RDONLY
    } else {
        MountFlags::NONE
    };
    mount("overlay", target, "overlay", flags, &options).map_err(|e| match e {
        SysError::Io { path, source, .. } => SysError::Io {
            op: "mount overlay on",
            path,
            source,
        },
        other => other,
    })
}

/// `p` as an overlay option value, or why it cannot be one.
fn overlay_path(p: &Path) -> Result<&str, SysError> {
    let bad = |reason| SysError::UnsupportedPath {
        path: p.to_path_buf(),
        usage: "as an overlay layer",
        reason,
    };
    let s = p.to_str().ok_or_else(|| bad("it is not UTF-8"))?;
    if s.contains([':', ',', '\\', '\n']) {
        return Err(bad("it contains ':', ',', '\\' or a newline"));
    }
    Ok(s)
}

/// Unmounts `target` (`umount2(2)` without flags).
///
/// Fails with `EBUSY` ([`SysError::is_busy`]) while files under it are open or
/// something is mounted below it, and with `EINVAL` ([`SysError::is_not_mounted`])
/// when it is not a mount point; the mount is unchanged in both cases.
pub fn umount(target: &Path) -> Result<(), SysError> {
    umount_raw(target, 0, "unmount")
}

/// [`umount`], retried while the mount is busy, for at most `limit`.
///
/// For mounts whose users are about to go away: a process forked elsewhere in
/// this program briefly holds copies of our open files until it execs, and a
/// killed workload's files close a moment after it is reaped.
pub fn umount_patiently(target: &Path, limit: Duration) -> Result<(), SysError> {
    let deadline = Instant::now() + limit;
    loop {
        match umount(target) {
            Err(e) if e.is_busy() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Detaches `target` from the namespace at once (`MNT_DETACH`): the kernel ends
/// the mount when its last open file closes, so this never waits and works on a
/// busy mount. `EINVAL` ([`SysError::is_not_mounted`]) when it is not a mount point.
pub fn detach(target: &Path) -> Result<(), SysError> {
    umount_raw(target, libc::MNT_DETACH, "detach")
}

/// Mount points at or below `root`, deepest first, from `/proc/self/mountinfo`
/// (so nested mounts come before the mounts they sit on).
pub fn mount_points_under(root: &Path) -> Result<Vec<PathBuf>, SysError> {
    let mut found: Vec<PathBuf> = mount_points()?
        .into_iter()
        .filter(|mount_point| mount_point.starts_with(root))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// Whether `path` is a mount point (exactly; not whether it is below one).
pub fn is_mount_point(path: &Path) -> Result<bool, SysError> {
    Ok(mount_points()?.iter().any(|p| p == path))
}

/// The filesystem type (`fuse.zest`, `overlay`, ...) of the topmost mount on
/// `path` exactly, or `None` when `path` is not a mount point.
pub fn mount_type(path: &Path) -> Result<Option<String>, SysError> {
    // Later lines are mounted on top of earlier ones.
    Ok(mount_table()?
        .into_iter()
        .rfind(|m| m.mount_point == path)
        .map(|m| m.fstype))
}

/// One line of the mount table: where, what type, from which source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Filesystem type (`ext4`, `overlay`, `fuse.zest`, ...).
    pub fstype: String,
    /// Mount source (a device such as `/dev/vda`, or a name such as `overlay`).
    pub source: String,
}

/// The mount a path lives on: the topmost mount whose mount point is the
/// longest prefix of `path` (which need not exist; it should be absolute and
/// free of symlinks and `..`).
pub fn mount_of(path: &Path) -> Result<Option<MountEntry>, SysError> {
    let mut best: Option<MountEntry> = None;
    for entry in mount_table()? {
        if !path.starts_with(&entry.mount_point) {
            continue;
        }
        // `>=`: of equal mount points the later line is the one on top.
        let deeper = best.as_ref().is_none_or(|b| {
            entry.mount_point.components().count() >= b.mount_point.components().count()
        });
        if deeper {
            best = Some(entry);
        }
    }
    Ok(best)
}

/// Every line of this process's mount table, in table order.
fn mount_table() -> Result<Vec<MountEntry>, SysError> {
    let table = fs::read(MOUNTINFO)
        .map_err(|e| SysError::io("read mount table", Path::new(MOUNTINFO), e))?;
    Ok(table
        .split(|&b| b == b'\n')
        .filter_map(parse_mountinfo_line)
        .collect())
}

/// The fields of a mountinfo line (proc(5)) zest reads, still escaped.
struct MountinfoFields<'a> {
    /// Field 5.
    mount_point: &'a [u8],
    /// The first field after the `-` separator.
    fstype: &'a [u8],
    /// The second; absent in some kernels' lines for some types.
    source: Option<&'a [u8]>,
    /// The third: the file system's own options.
    super_options: Option<&'a [u8]>,
}

fn mountinfo_fields(line: &[u8]) -> Option<MountinfoFields<'_>> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let separator = fields.iter().position(|f| *f == b"-")?;
    Some(MountinfoFields {
        mount_point: fields.get(4)?,
        fstype: fields.get(separator + 1)?,
        source: fields.get(separator + 2).copied(),
        super_options: fields.get(separator + 3).copied(),
    })
}

/// A mountinfo line: where, what type, from which source.
fn parse_mountinfo_line(line: &[u8]) -> Option<MountEntry> {
    let f = mountinfo_fields(line)?;
    Some(MountEntry {
        mount_point: unescape_mountinfo(f.mount_point),
        fstype: String::from_utf8_lossy(f.fstype).into_owned(),
        source: f
            .source
            .map(|s| unescape_mountinfo(s).to_string_lossy().into_owned())
            .unwrap_or_default(),
    })
}

/// Bytes of another process's mount table read (a container has a few
/// dozen mounts).
const MAX_PROCESS_MOUNTINFO: u64 = 256 << 10;

/// The first lower directory of the overlay that is process `pid`'s root,
/// from its mount table (`/proc/PID/mountinfo`): the top image layer of a
/// container's root file system, as the overlay was given it (absolute, or
/// relative where containerd shortened long options). `None` when the
/// process is gone or its root is not an overlay. Blocking (the read can
/// wait for the process's mount namespace); bounded.
pub fn root_overlay_top_layer(pid: u32) -> Option<PathBuf> {
    use std::io::Read;
    let mut table = Vec::new();
    fs::File::open(format!("/proc/{pid}/mountinfo"))
        .ok()?
        .take(MAX_PROCESS_MOUNTINFO)
        .read_to_end(&mut table)
        .ok()?;
    overlay_top_layer(&table)
}

/// [`root_overlay_top_layer`] of mount table `table`: the last mount on `/`
/// (the one on top), when it is an overlay, its `lowerdir` (or the new mount
/// API's first `lowerdir+`) up to the first colon overlayfs did not escape.
fn overlay_top_layer(table: &[u8]) -> Option<PathBuf> {
    let root = table
        .split(|&b| b == b'\n')
        .filter_map(mountinfo_fields)
        .rfind(|f| f.mount_point == b"/")?;
    if root.fstype != b"overlay" {
        return None;
    }
    let lower = root.super_options?.split(|&b| b == b',').find_map(|o| {
        o.strip_prefix(b"lowerdir=")
            .or_else(|| o.strip_prefix(b"lowerdir+="))
    })?;
    // Up to the first colon not escaped by a backslash (`\:` is overlayfs's
    // escape of a colon in a path).
    let mut first = Vec::new();
    let mut bytes = lower.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => {
                let &next = bytes.next()?;
                if next != b':' {
                    first.push(b);
                }
                first.push(next);
            }
            b':' => break,
            b => first.push(b),
        }
    }
    let dir = unescape_mountinfo(&first);
    (!dir.as_os_str().is_empty()).then_some(dir)
}

/// Every mount point of this process's mount namespace, in table order.
fn mount_points() -> Result<Vec<PathBuf>, SysError> {
    Ok(mount_table()?.into_iter().map(|m| m.mount_point).collect())
}

/// Decodes the octal escapes (`\040` for a space, ...) of a mountinfo path field.
fn unescape_mountinfo(field: &[u8]) -> PathBuf {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let byte = field[i];
        if let (b'\\', Some(digits)) = (byte, field.get(i + 1..i + 4)) {
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(value) = u8::try_from(value) {
                    out.push(value);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(byte);
        i += 1;
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// Detaches every mount at or below `root`, deepest first. A mount that is gone
/// by the time it is detached (someone else unmounted it) is not an error.
pub fn detach_all_under(root: &Path) -> Result<(), SysError> {
    for mount_point in mount_points_under(root)? {
        tracing::info!(path = %mount_point.display(), "detaching leftover mount");
        match detach(&mount_point) {
            Err(e) if !e.is_not_mounted() => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Removes a directory tree that may have mounts below it: detaches them, checks
/// that none remains ([`SysError::StillMounted`] otherwise: nothing is deleted),
/// then deletes. A missing directory is not an error.
pub fn remove_tree(dir: &Path) -> Result<(), SysError> {
    if fs::symlink_metadata(dir).is_err() {
        return Ok(());
    }
    detach_all_under(dir)?;
    if let Some(still) = mount_points_under(dir)?.into_iter().next() {
        return Err(SysError::StillMounted {
            dir: dir.to_path_buf(),
            mount_point: still,
        });
    }
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SysError::io("remove", dir, e)),
    }
}

/// A `mount(2)` call prepared in advance for a child process, to be made between
/// `fork` and `exec` (in `Command::pre_exec`): every string is allocated here, so
/// [`ChildMount::apply`] makes only the system call, which is async-signal-safe.
#[derive(Debug)]
pub struct ChildMount {
    source: Option<CString>,
    target: CString,
    fstype: Option<CString>,
    flags: libc::c_ulong,
}

impl ChildMount {
    /// Makes every mount of the (freshly unshared) namespace private, recursively,
    /// so that the child's mounts do not propagate back to the host's namespace.
    pub fn make_private() -> ChildMount {
        ChildMount {
            source: None,
            target: c"/".to_owned(),
            fstype: None,
            flags: libc::MS_REC | libc::MS_PRIVATE,
        }
    }

    /// A fresh procfs on `target`, `nosuid,nodev,noexec`.
    pub fn proc(target: &Path) -> Result<ChildMount, SysError> {
        Ok(ChildMount {
            source: Some(c"proc".to_owned()),
            target: path_cstring(target)?,
            fstype: Some(c"proc".to_owned()),
            flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        })
    }

    /// A recursive bind of `source` on `target` (the host's `/dev`, say).
    pub fn rbind(source: &Path, target: &Path) -> Result<ChildMount, SysError> {
        Ok(ChildMount {
            source: Some(path_cstring(source)?),
            target: path_cstring(target)?,
            fstype: None,
            flags: libc::MS_BIND | libc::MS_REC,
        })
    }

    /// Makes the call. Allocates nothing, so it may run in a forked child.
    pub fn apply(&self) -> io::Result<()> {
        mount_raw(
            self.source.as_deref(),
            &self.target,
            self.fstype.as_deref(),
            self.flags,
            None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(
            unescape_mountinfo(br"/a\040b\011c\134d"),
            PathBuf::from("/a b\tc\\d")
        );
        assert_eq!(
            unescape_mountinfo(br"/trailing\04"),
            PathBuf::from(r"/trailing\04")
        );
        assert_eq!(unescape_mountinfo(br"\"), PathBuf::from("\\"));
    }

    #[test]
    fn mountinfo_lines_parse() {
        let line =
            br"36 35 98:0 /mnt1 /mnt\040two rw,noatime master:1 - ext4 /dev/vda rw,errors=continue";
        assert_eq!(
            parse_mountinfo_line(line),
            Some(MountEntry {
                mount_point: PathBuf::from("/mnt two"),
                fstype: "ext4".into(),
                source: "/dev/vda".into(),
            })
        );
        assert_eq!(parse_mountinfo_line(b"36 35 98:0 / /x rw"), None);
        assert_eq!(parse_mountinfo_line(b""), None);
    }

    #[test]
    fn the_root_overlays_first_lower_directory_is_found() {
        let table = b"\
1 0 0:5 / / rw - ext4 /dev/vda1 rw
600 550 0:77 / / rw,relatime - overlay overlay rw,lowerdir=/var/lib/zest/snapshots/9/fs:/var/lib/zest/snapshots/8/fs,upperdir=/u,workdir=/w
601 600 0:78 / /proc rw - proc proc rw
";
        assert_eq!(
            overlay_top_layer(table),
            Some(PathBuf::from("/var/lib/zest/snapshots/9/fs"))
        );
        // Escapes in the path (octal, an escaped colon), a relative
        // directory, the new mount API's form.
        let escaped = br"7 1 0:9 / / rw - overlay overlay rw,lowerdir=/a\040b\:c:/d,upperdir=/u";
        assert_eq!(overlay_top_layer(escaped), Some(PathBuf::from("/a b:c")));
        let relative = b"7 1 0:9 / / rw - overlay overlay rw,lowerdir=12/fs:11/fs\n";
        assert_eq!(overlay_top_layer(relative), Some(PathBuf::from("12/fs")));
        let plus = b"7 1 0:9 / / rw - overlay overlay rw,lowerdir+=/x,lowerdir+=/y\n";
        assert_eq!(overlay_top_layer(plus), Some(PathBuf::from("/x")));
        // Not an overlay, not on the root, garbage: nothing.
        assert_eq!(
            overlay_top_layer(b"1 0 0:5 / / rw - ext4 /dev/vda1 rw\n"),
            None
        );
        assert_eq!(
            overlay_top_layer(b"1 0 0:5 / /mnt rw - overlay o lowerdir=/x\n"),
            None
        );
        assert_eq!(overlay_top_layer(b"/ / / / / /"), None);
        assert_eq!(overlay_top_layer(b""), None);
        assert_eq!(
            overlay_top_layer(b"1 0 0:5 / / rw - overlay o lowerdir=\n"),
            None
        );
        assert_eq!(
            overlay_top_layer(br"1 0 0:5 / / rw - overlay o lowerdir=\"),
            None
        );
        assert_eq!(overlay_top_layer(b"1 0 0:5 / / rw - overlay o\n"), None);
    }

    #[test]
    fn a_process_whose_root_is_no_overlay_has_no_top_layer() {
        // This test's root is not an overlay of layers, and no process has
        // the largest ID.
        if mount_type(Path::new("/")).ok().flatten().as_deref() != Some("overlay") {
            assert_eq!(root_overlay_top_layer(std::process::id()), None);
        }
        assert_eq!(root_overlay_top_layer(u32::MAX), None);
    }

    #[test]
    fn the_mount_of_a_path_is_its_deepest_mount_point() -> Result<(), Box<dyn std::error::Error>> {
        let root = mount_of(Path::new("/"))?.ok_or("no mount for /")?;
        assert_eq!(root.mount_point, PathBuf::from("/"));
        // /proc is mounted in every namespace this runs in.
        let proc = mount_of(Path::new("/proc/self/not-a-file"))?.ok_or("no mount for /proc")?;
        assert_eq!(proc.mount_point, PathBuf::from("/proc"));
        assert_eq!(proc.fstype, "proc");
        Ok(())
    }

    #[test]
    fn mount_type_reads_the_table() -> Result<(), Box<dyn std::error::Error>> {
        // The root is always mounted, and with some type; a fresh directory is not a
        // mount point.
        assert!(mount_type(Path::new("/"))?.is_some_and(|t| !t.is_empty()));
        let dir = tempfile::tempdir()?;
        assert_eq!(mount_type(dir.path())?, None);
        Ok(())
    }

    #[test]
    fn remove_tree_tolerates_missing() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        remove_tree(&dir.path().join("absent"))?;
        let tree = dir.path().join("t");
        fs::create_dir_all(tree.join("a/b"))?;
        fs::write(tree.join("a/b/c"), b"x")?;
        remove_tree(&tree)?;
        assert!(!tree.exists());
        Ok(())
    }

    #[test]
    fn overlay_refuses_paths_it_cannot_quote() {
        let target = Path::new("/nonexistent");
        let layers = Overlay {
            lower: vec![Path::new("/a:b"), Path::new("/c")],
            upper: None,
        };
        assert!(matches!(
            overlay(target, &layers),
            Err(SysError::UnsupportedPath { .. })
        ));
        let long = "/x".repeat(100);
        let layers = Overlay {
            lower: vec![Path::new(&long); 30],
            upper: None,
        };
        assert!(matches!(
            overlay(target, &layers),
            Err(SysError::OptionsTooLong { .. })
        ));
    }
}
