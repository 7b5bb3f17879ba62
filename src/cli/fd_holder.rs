//! `zest fd-holder` (hidden): the process that keeps the FUSE connections of lazily
//! mounted layers while `zest serve` restarts. `zest serve` starts it (see
//! [`start`]) when none answers on its socket in the state directory; it is not
//! meant to be run by hand.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use zest_fdstore::{run_holder, HolderOptions};

/// Arguments of `zest fd-holder`.
#[derive(Debug, Args)]
pub struct FdHolderArgs {
    /// Unix socket to serve
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Exit after holding nothing, with no client connected, for this many seconds
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub idle_exit_secs: u64,
}

/// Runs the holder until it is idle (blocking; no async runtime needed).
pub fn run(args: FdHolderArgs) -> anyhow::Result<()> {
    let options = HolderOptions {
        socket: args.socket,
        idle_exit: Duration::from_secs(args.idle_exit_secs),
    };
    run_holder(&options).context("running the fd holder")
}

/// Starts `zest fd-holder` for `socket`, detached from the caller: its own
/// session and process group (a signal to `zest serve`'s group does not reach
/// it), standard streams on /dev/null, reaped by a thread while the caller lives.
pub fn start(socket: &Path) -> io::Result<()> {
    let exe = std::env::current_exe()?;
    // The holder runs in `/`.
    let socket = std::path::absolute(socket)?;
    let mut command = Command::new(exe);
    command
        .arg("fd-holder")
        .arg("--socket")
        .arg(&socket)
        // Pin no mount by its working directory.
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    std::thread::Builder::new()
        .name("zest-fd-holder-reaper".into())
        .spawn(move || {
            let _ = child.wait();
        })?;
    Ok(())
}
