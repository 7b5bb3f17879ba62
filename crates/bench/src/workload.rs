//! The workloads a cold-start benchmark starts: which image, which command, and
//! which output line means "ready".
//!
//! The built-in set is HelloBench's, on images built from Debian packages by
//! `scripts/bench-images` (python, gcc, node, postgres). A TOML file can replace
//! it, so other images can be measured the same way.
//!
//! Images live in one repository per image under a prefix, with fixed tags:
//! `:gzip` (the ordinary image, for the full pull), `:chunked` (converted by
//! `zest convert`), `:skopeo` (zstd:chunked written by skopeo from `:gzip`: a
//! third-party image zest never touched) and `:profile-<workload>` (rewritten by
//! `zest optimize` for that workload's start).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// One thing to start and wait for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Short name, used in tags and reports (`[a-z0-9-]`).
    pub name: String,
    /// Repository name under the prefix, e.g. `python`.
    pub image: String,
    /// The command run in the container (argv).
    pub command: Vec<String>,
    /// A substring of a stdout or stderr line that means the workload is ready.
    pub ready: String,
    /// Seconds `zest optimize` lets the command run while profiling; servers are
    /// profiled until their ready line or this limit.
    #[serde(default = "default_profile_timeout")]
    pub profile_timeout_secs: u64,
}

fn default_profile_timeout() -> u64 {
    60
}

/// Tags of the images a workload is measured with.
impl Workload {
    /// The ordinary gzip image (full pulls).
    pub fn gzip_ref(&self, registry: &str, prefix: &str) -> String {
        format!("{registry}/{prefix}/{}:gzip", self.image)
    }

    /// The zstd:chunked image (lazy pulls).
    pub fn chunked_ref(&self, registry: &str, prefix: &str) -> String {
        format!("{registry}/{prefix}/{}:chunked", self.image)
    }

    /// The zstd:chunked image skopeo wrote from the gzip one (third-party pulls).
    pub fn third_party_ref(&self, registry: &str, prefix: &str) -> String {
        format!("{registry}/{prefix}/{}:skopeo", self.image)
    }

    /// The image optimized for this workload's start (lazy+profile pulls).
    pub fn profile_ref(&self, registry: &str, prefix: &str) -> String {
        format!("{registry}/{prefix}/{}:profile-{}", self.image, self.name)
    }
}

/// An invalid workload list.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The file could not be read.
    #[error("cannot read the workload file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("workload file {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The cause.
        source: toml::de::Error,
    },
    /// A workload's fields are unusable.
    #[error("workload {name:?}: {problem}")]
    Invalid {
        /// The workload.
        name: String,
        /// What is wrong.
        problem: &'static str,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadFile {
    workload: Vec<Workload>,
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_string()).collect()
}

/// The built-in workloads (images from `scripts/bench-images`).
pub fn builtin() -> Vec<Workload> {
    let w = |name: &str, image: &str, command: &[&str], ready: &str, timeout: u64| Workload {
        name: name.into(),
        image: image.into(),
        command: argv(command),
        ready: ready.into(),
        profile_timeout_secs: timeout,
    };
    vec![
        w(
            "python-print",
            "python",
            &["python3", "-c", "print(\"hello\")"],
            "hello",
            60,
        ),
        w(
            "python-imports",
            "python",
            &["python3", "/bench/imports.py"],
            "imports ready",
            60,
        ),
        w(
            "gcc",
            "gcc",
            &["sh", "-c", "gcc -o /tmp/hello /bench/hello.c && /tmp/hello"],
            "hello from gcc",
            60,
        ),
        w(
            "node",
            "node",
            &["node", "-e", "console.log(\"hello\")"],
            "hello",
            60,
        ),
        w(
            "postgres",
            "postgres",
            &["/bench/postgres.sh"],
            "database system is ready to accept connections",
            60,
        ),
    ]
}

/// Reads a workload file: `[[workload]]` tables with the fields of [`Workload`].
pub fn load(path: &Path) -> Result<Vec<Workload>, WorkloadError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Read {
        path: shown.clone(),
        source,
    })?;
    let file: WorkloadFile = toml::from_str(&text).map_err(|source| WorkloadError::Parse {
        path: shown,
        source,
    })?;
    for w in &file.workload {
        validate(w)?;
    }
    Ok(file.workload)
}

/// Checks the fields that end up in image tags, container ids and commands.
pub fn validate(w: &Workload) -> Result<(), WorkloadError> {
    let invalid = |problem| {
        Err(WorkloadError::Invalid {
            name: w.name.clone(),
            problem,
        })
    };
    let tag_safe = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if !tag_safe(&w.name) {
        return invalid("the name must be 1-64 characters of a-z, 0-9 and '-'");
    }
    let repo_safe = |s: &str| {
        !s.is_empty()
            && s.split('/').all(|part| {
                !part.is_empty()
                    && part.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b)
                    })
            })
    };
    if !repo_safe(&w.image) {
        return invalid("the image must be a repository name (a-z, 0-9, '-', '.', '_', '/')");
    }
    if w.command.is_empty() || w.command[0].is_empty() {
        return invalid("the command must not be empty");
    }
    if w.ready.trim().is_empty() {
        return invalid("the ready line must not be empty");
    }
    if w.profile_timeout_secs == 0 {
        return invalid("profile_timeout_secs must be at least 1");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_workloads_are_valid_and_tagged_per_workload() {
        let all = builtin();
        for w in &all {
            validate(w).unwrap();
        }
        let py = &all[0];
        assert_eq!(
            py.profile_ref("127.0.0.1:5000", "zest-bench"),
            "127.0.0.1:5000/zest-bench/python:profile-python-print"
        );
        assert_eq!(
            py.gzip_ref("r:1", "p"),
            "r:1/p/python:gzip",
            "full pulls use the gzip image"
        );
    }

    #[test]
    fn workload_files_are_parsed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(
            &path,
            "[[workload]]\nname = \"hi\"\nimage = \"tools/busybox\"\ncommand = [\"echo\", \"hi\"]\nready = \"hi\"\n",
        )
        .unwrap();
        let w = load(&path).unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].profile_timeout_secs, 60);

        std::fs::write(
            &path,
            "[[workload]]\nname = \"../x\"\nimage = \"a\"\ncommand = [\"x\"]\nready = \"r\"\n",
        )
        .unwrap();
        assert!(matches!(load(&path), Err(WorkloadError::Invalid { .. })));
        std::fs::write(&path, "[[workload]]\nname = \"x\"\n").unwrap();
        assert!(matches!(load(&path), Err(WorkloadError::Parse { .. })));
    }
}
