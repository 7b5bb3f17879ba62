//! Records which build a benchmark ran on: the git commit (with `-dirty` when
//! tracked files had uncommitted changes at build time) and the cargo profile,
//! as `ZEST_BUILD_COMMIT` and `ZEST_BUILD_PROFILE` for `runner::build_description`.
//! A build outside a git checkout (a source tarball) records "unknown" unless
//! the packager sets `ZEST_BUILD_COMMIT` in the environment.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    // `--no-optional-locks`: `git status` would otherwise refresh and rewrite
    // the index, which this script watches, so every build would trigger the next.
    let out = Command::new("git")
        .arg("--no-optional-locks")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=ZEST_BUILD_COMMIT");
    let profile = std::env::var("PROFILE").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=ZEST_BUILD_PROFILE={profile}");

    let commit = match std::env::var("ZEST_BUILD_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c,
        _ => commit_of_checkout().unwrap_or_else(|| "unknown".into()),
    };
    println!("cargo:rustc-env=ZEST_BUILD_COMMIT={commit}");
}

/// The checkout's commit, and the files whose change means it may have moved.
fn commit_of_checkout() -> Option<String> {
    let here = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let commit = git(&here, &["rev-parse", "HEAD"])?;
    // Rebuild when HEAD moves (checkout, commit) or the index changes (staging).
    let abs = |p: String| {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            here.join(p)
        }
    };
    if let Some(git_dir) = git(&here, &["rev-parse", "--git-dir"]).map(abs) {
        for f in ["HEAD", "index"] {
            println!("cargo:rerun-if-changed={}", git_dir.join(f).display());
        }
    }
    if let (Some(common), Some(head_ref)) = (
        git(&here, &["rev-parse", "--git-common-dir"]).map(abs),
        git(&here, &["symbolic-ref", "-q", "HEAD"]),
    ) {
        // Only files that exist: cargo treats a missing one as always changed,
        // and a fresh clone has no packed-refs.
        for f in [common.join(&head_ref), common.join("packed-refs")] {
            if f.exists() {
                println!("cargo:rerun-if-changed={}", f.display());
            }
        }
    }
    let dirty = git(&here, &["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| !s.is_empty());
    Some(if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    })
}
