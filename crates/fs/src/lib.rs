//! The lazy layer filesystem: one read-only FUSE filesystem per image layer.
//!
//! Each mounted layer presents exactly what an overlayfs lower directory holding
//! that layer would contain, so containerd can stack the layers with overlayfs:
//! every entry type, mode bits (setuid/setgid/sticky included), owners, times,
//! sizes, link counts, hard links sharing one inode, and xattrs; whiteouts
//! (`.wh.NAME`) appear as character devices 0:0 named `NAME`, and opaque
//! directories carry the overlay opaque xattr.
//!
//! Layout:
//! - [`layer`]: the filesystem logic ([`LayerFs`]) in plain Rust, independent of
//!   any FUSE library: attributes, lookup, readdir, xattrs, read planning.
//! - `fuse_adapter`: the only file that names the FUSE library; it translates
//!   kernel requests to [`LayerFs`] calls and back, and serves a connection handed
//!   over by another process without a new FUSE_INIT ([`Negotiated`] is what the
//!   first one agreed); optionally served over io_uring ([`IoUring`]).
//! - [`mount`]: mounting a layer ([`LayerMount`]) and stacking layers with
//!   overlayfs ([`ImageMount`]); every mount is undone on drop unless it is left
//!   in place for the next process ([`LayerMount::leave_mounted`], taken over
//!   with [`LayerMount::resume`]).
//! - [`passthrough`]: FUSE passthrough of fully cached files (Linux 6.9+),
//!   optional.
//!
//! Mount system calls go through `zest-mount`, the only code of zest that makes them.
//!
//! Invariants:
//! - Metadata is answered from the in-memory [`LayerIndex`](zest_format::LayerIndex)
//!   only; it never touches the network or the disk.
//! - A FUSE worker thread never waits for the network or the disk cache: a read
//!   whose chunks are all in the memory cache is answered at once, any other read
//!   is handed to the fetcher's async runtime, which answers when the data arrive.
//! - Inode numbers are deterministic (`entry index + 1`, root = 1), so the same
//!   layer always shows the same inode numbers, also to a process taking a
//!   connection over.
//! - No byte is served that was not verified against its chunk digest.

mod fuse_adapter;
pub mod layer;
pub mod mount;
pub mod passthrough;

use std::time::SystemTime;

pub use fuse_adapter::{io_uring_totals, IoUring, IoUringStats, Negotiated};
pub use layer::{
    AccessRecorder, LayerFs, LayerFsOptions, LayerFsStats, OpaqueXattr, RecordedAccess,
    RequestCounts, RequestKind,
};
pub use mount::{ImageMount, LayerMount, MountError, MountOptions};
pub use passthrough::PassthroughStore;

/// An error number answered to the kernel (a positive `errno` value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// No such file or directory.
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    /// I/O error: data could not be fetched or verified.
    pub const EIO: Errno = Errno(libc::EIO);
    /// Not a directory.
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    /// Is a directory.
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    /// Invalid argument (e.g. readlink on a non-symlink).
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    /// No such extended attribute.
    pub const ENODATA: Errno = Errno(libc::ENODATA);
    /// The caller's buffer is too small.
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    /// Read-only filesystem.
    pub const EROFS: Errno = Errno(libc::EROFS);
    /// Operation not implemented (for xattrs: the kernel stops asking).
    pub const ENOSYS: Errno = Errno(libc::ENOSYS);
    /// Value too large (e.g. a read offset beyond what the kernel can address).
    pub const EOVERFLOW: Errno = Errno(libc::EOVERFLOW);
}

/// The type of a node, as `stat` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory.
    Directory,
    /// A regular file.
    RegularFile,
    /// A symbolic link.
    Symlink,
    /// A character device (also every whiteout, as 0:0).
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A named pipe.
    NamedPipe,
}

/// The attributes of a node (what `stat` shows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeAttr {
    /// Inode number (`entry index + 1`, root = 1).
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Allocated 512-byte blocks.
    pub blocks: u64,
    /// Last access time.
    pub atime: SystemTime,
    /// Last modification time.
    pub mtime: SystemTime,
    /// Last status change time.
    pub ctime: SystemTime,
    /// Node type.
    pub kind: NodeKind,
    /// Permission bits including setuid, setgid and sticky (`0o7777` mask).
    pub perm: u16,
    /// Number of hard links.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number of a device node, in the kernel's `new_encode_dev` form.
    pub rdev: u32,
    /// Preferred I/O size.
    pub blksize: u32,
}

/// One directory entry produced by [`LayerFs::readdir`].
#[derive(Clone, Copy, Debug)]
pub struct DirEntry<'a> {
    /// Inode number of the entry.
    pub ino: u64,
    /// Offset to pass back to continue after this entry.
    pub next_offset: u64,
    /// Entry type.
    pub kind: NodeKind,
    /// Entry name (raw bytes; Linux names are not necessarily UTF-8).
    pub name: &'a [u8],
}

/// Answer to a `getxattr`/`listxattr` call, following the size-probe protocol:
/// a request with size 0 asks for the length only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XattrAnswer {
    /// The length of the value (the caller asked with size 0).
    Size(u32),
    /// The value itself.
    Data(Vec<u8>),
}

/// How an opened file is to be served.
#[derive(Debug)]
pub struct OpenAnswer {
    /// File handle to hand to the kernel.
    pub fh: u64,
    /// Keep the page cache across opens: the layer never changes.
    pub keep_cache: bool,
    /// A whole, verified copy of the file is stored for FUSE passthrough
    /// ([`LayerFs::backing_file`]; only when passthrough was negotiated).
    pub stored: bool,
}

/// Receives the outcome of a read, possibly on another thread and later.
///
/// The FUSE adapter implements this for the kernel reply; tests and benches may
/// implement it to call [`LayerFs::read`] directly. Dropping it unanswered must
/// answer an error (the FUSE reply does: EIO), so a lost task never hangs a reader.
pub trait ReadReply: Send + 'static {
    /// Answers with the bytes read (shorter than asked only at end of file).
    fn data(self, data: &[u8]);
    /// Answers with an error.
    fn error(self, err: Errno);
}

/// Filesystem statistics reported by `statfs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatFs {
    /// Total blocks (of `bsize`).
    pub blocks: u64,
    /// Number of inodes.
    pub files: u64,
    /// Block size.
    pub bsize: u32,
    /// Longest name.
    pub namelen: u32,
}

#[cfg(test)]
mod tests;
