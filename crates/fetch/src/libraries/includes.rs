//! Include prefetch: when a C or C++ file is read from its start, the headers
//! its `#include` directives name are found in the stack the way the
//! compiler's search path would find them, and fetched a level of the include
//! tree ahead of the compiler (each header scanned as soon as it arrives, see
//! [`super::walk`]), so a compile costs about as many round trips as its
//! header tree is deep instead of one per header.
//!
//! The search path is the compiler's built-in one, as laid out in the image:
//! the C++ library's directories (for C++ files), GCC's own `include`
//! directories (`usr/lib/gcc/TRIPLE/VERSION/include`), `usr/local/include`, the
//! multiarch directory and `usr/include`. A quoted name is looked for next to
//! the including file first. Directories given with `-I` are not known; the
//! quoted, relative includes of a project mostly are next to their file.
//!
//! The programs of the toolchain go the same way: a C compiler driver
//! (`gcc`, `cc`, `g++`, `c++`) read from its start runs its compiler proper,
//! the assembler and the linker one after another, each with its libraries a
//! blocking round trip or more away; they are examined as soon as the driver
//! is ([`LibraryStack::compiler_start`]), while the driver and the compiler
//! run. A compile that does not link fetches the linker's few megabytes for
//! nothing; a build links sooner or later.
//!
//! Bounded like Python import prefetch: each header is examined once, at most
//! [`MAX_INCLUDE_DEPTH`] levels ahead of the file read (the last level
//! fetched, not scanned, so the compiler's reads carry the walk on), at most
//! [`MAX_INCLUDE_BYTES`] per stack, only headers small enough to fetch whole;
//! it stands down where a start-up profile guides the layer.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;

use super::{Found, Guess, LibraryStack, MAX_DIR_ENTRIES};
use zest_format::c_include::{self, CFile, Include};
use zest_format::EntryKind;

/// Compressed bytes of headers one stack fetches at most.
const MAX_INCLUDE_BYTES: u64 = 16 << 20;

/// Levels of the include tree fetched ahead of the file read (the last
/// fetched, not scanned). Headers nest deeply (`stdio.h` → `features.h` →
/// `sys/cdefs.h` → `bits/wordsize.h`) and the preprocessor opens nearly all
/// it names, so the walk goes deeper than Python's.
const MAX_INCLUDE_DEPTH: u32 = 6;

/// Bytes of a file scanned for directives.
pub(super) const INCLUDE_SCAN_BYTES: u64 = 256 << 10;

/// Entries of one directory looked at while finding the search path.
const MAX_LISTED: usize = 64;

/// Bytes of the head of GCC's archive fetched for the linker: its symbol
/// index, which the linker reads before choosing members.
const ARCHIVE_HEAD_BYTES: u64 = 128 << 10;

/// The header GCC includes before every translation unit on glibc systems.
const PREDEFINED: &str = "stdc-predef.h";

/// The compiler's search path as the stack lays it out.
#[derive(Debug, Default)]
pub(super) struct SearchPath {
    /// C++ library directories, searched first for C++ files.
    cxx: Vec<String>,
    /// The directories C and C++ both search.
    c: Vec<String>,
}

impl SearchPath {
    fn dirs(&self, cxx: bool) -> impl Iterator<Item = &String> {
        self.cxx.iter().filter(move |_| cxx).chain(self.c.iter())
    }
}

/// A file of the include tree: its path (no leading slash), whether it is a
/// source or a header, and whether it is compiled as C++.
struct Scanned {
    path: String,
    kind: CFile,
    cxx: bool,
}

/// Whether a C or C++ file is compiled as C++ (taken from its name: C++
/// sources and headers, and the C++ library's extension-less headers).
fn is_cxx(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    match name.rsplit_once('.') {
        Some((_, ext)) => matches!(
            ext,
            "cc" | "cpp" | "cxx" | "c++" | "C" | "mm" | "hh" | "hpp" | "hxx" | "h++" | "tcc"
        ),
        None => true,
    }
}

/// Whether `name` is a C compiler driver's (`gcc`, `cc`, `g++` or `c++`,
/// after a target prefix such as `x86_64-linux-gnu-`, before a version
/// suffix such as `-12`): whether it compiles C++, and the version it names.
fn compiler_driver(name: &str) -> Option<(bool, Option<&str>)> {
    let words: Vec<&str> = name.split('-').collect();
    let at = words
        .iter()
        .rposition(|w| matches!(*w, "gcc" | "cc" | "g++" | "c++"))?;
    let version = match words.get(at + 1..)? {
        [] => None,
        [v] if v
            .split('.')
            .all(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())) =>
        {
            Some(*v)
        }
        // `gcc-ar-12`, `gcc-nm`: other tools.
        _ => return None,
    };
    Some((matches!(words[at], "g++" | "c++"), version))
}

/// The directory part of `path` (no leading slash), `""` at the root.
fn dir_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

impl LibraryStack {
    /// Examines C or C++ file `found` (its first bytes `data`) and the headers
    /// it includes, each as it arrives (see the module doc).
    pub(super) async fn examine_includes(self: Arc<Self>, found: Found, kind: CFile, data: Bytes) {
        let Some(fetcher) = self.fetcher(found.0) else {
            return;
        };
        let path = fetcher.index().entry(found.1).path();
        let cxx = is_cxx(&path) || path.contains("/c++/");
        let guess = Guess {
            spent: &self.include_spent,
            max: MAX_INCLUDE_BYTES,
            files: &self.shared.headers,
        };
        let root = Scanned { path, kind, cxx };
        let shown = root.path.clone();
        let walked = self
            .walk(
                (root, data),
                MAX_INCLUDE_DEPTH,
                INCLUDE_SCAN_BYTES,
                guess,
                |file, data, last| {
                    self.included_headers(file, data, last)
                        .into_iter()
                        .map(|(found, file)| (found, Some(file)))
                        .collect()
                },
            )
            .await;
        tracing::debug!(
            file = %shown,
            scanned = walked.scanned,
            fetched = walked.fetched,
            "headers prefetched"
        );
    }

    /// The headers C or C++ file `file` (its first bytes `data`) includes
    /// that are small enough to fetch whole and not examined yet (marked
    /// examined unless `last`).
    fn included_headers(&self, file: &Scanned, data: &Bytes, last: bool) -> Vec<(Found, Scanned)> {
        let mut names = c_include::includes(data);
        if file.kind == CFile::Source {
            names.insert(
                0,
                Include {
                    name: PREDEFINED.into(),
                    quoted: false,
                    next: false,
                },
            );
        }
        let mut headers: Vec<(Found, Scanned)> = Vec::new();
        let mut seen: HashSet<Found> = HashSet::new();
        for include in &names {
            let Some((found, path)) = self.find_header(include, &file.path, file.cxx) else {
                continue;
            };
            if !seen.insert(found) || !self.small(found) {
                continue;
            }
            // Each header once (one the compiler read first was examined
            // then); the last level is left unmarked so the compiler's read
            // of it walks on.
            let fresh = if last {
                !self.examined(found)
            } else {
                self.first_time(found)
            };
            if fresh {
                let header = Scanned {
                    path,
                    kind: CFile::Header,
                    cxx: file.cxx,
                };
                headers.push((found, header));
            }
        }
        headers
    }

    /// The header `include` of the file at `from` names: next to `from` when
    /// quoted, then along the search path (after the directory `from` lies
    /// in, for `#include_next`). With the path it was found at.
    fn find_header(&self, include: &Include, from: &str, cxx: bool) -> Option<(Found, String)> {
        let search = self.search_path();
        let here = include
            .quoted
            .then(|| c_include::join(dir_of(from), &include.name));
        let mut dirs: Vec<&String> = search.dirs(cxx).collect();
        if include.next {
            // On past the directory the including file was found in.
            if let Some(i) = dirs.iter().position(|d| {
                from.strip_prefix(d.as_str())
                    .is_some_and(|r| r.starts_with('/'))
            }) {
                dirs.drain(..=i);
            }
        }
        here.into_iter()
            .flatten()
            .chain(
                dirs.into_iter()
                    .filter_map(|d| c_include::join(d, &include.name)),
            )
            .filter(|candidate| *candidate != from)
            .find_map(|candidate| Some((self.resolve(&format!("/{candidate}"))?, candidate)))
    }

    /// When `path` is a C compiler driver's, examines the programs it runs
    /// after itself like a read from their start would (their loader parts
    /// and libraries fetched): the compiler proper (`cc1`, `cc1plus` for
    /// C++) first, then the assembler, `collect2`, the linker, its LTO plugin
    /// and `libgcc_s`; then the small files the linker reads (start files,
    /// linker scripts) and the head of `libgcc.a`. They are looked for in the
    /// GCC directory of the driver's version (the newest without one), and
    /// the assembler and linker where the driver finds them next, in
    /// `usr/bin`. In the background; advice only.
    pub(super) fn compiler_start(self: &Arc<Self>, path: &str) {
        let name = path.rsplit('/').next().unwrap_or(path);
        let Some((cxx, version)) = compiler_driver(name) else {
            return;
        };
        let compiler = if cxx { "cc1plus" } else { "cc1" };
        let mut dirs: Vec<(String, String)> = Vec::new();
        for gcc in ["usr/lib/gcc", "usr/libexec/gcc", "usr/lib64/gcc"] {
            for triple in self.list(gcc, |_| true) {
                let mut versions = self.list(&format!("{gcc}/{triple}"), |v| {
                    version.is_none_or(|want| {
                        v == want || v.strip_prefix(want).is_some_and(|r| r.starts_with('.'))
                    })
                });
                versions.sort_by_key(|v| std::cmp::Reverse(version_key(v)));
                dirs.extend(
                    versions
                        .into_iter()
                        .map(|v| (format!("/{gcc}/{triple}/{v}"), triple.clone())),
                );
            }
        }
        let Some((dir, triple)) = dirs
            .into_iter()
            .find(|(dir, _)| self.resolve(&format!("{dir}/{compiler}")).is_some())
        else {
            return;
        };
        // Checked before the programs are marked examined below.
        let Some(fetcher) = self.fetcher(0) else {
            return;
        };
        let in_path = |tool: &str| {
            vec![
                format!("{dir}/{tool}"),
                format!("/usr/bin/{triple}-{tool}"),
                format!("/usr/bin/{tool}"),
            ]
        };
        let programs: Vec<Found> = [
            vec![format!("{dir}/{compiler}")],
            in_path("as"),
            vec![format!("{dir}/collect2")],
            in_path("ld"),
            vec![format!("{dir}/liblto_plugin.so")],
            vec![
                format!("/usr/lib/{triple}/libgcc_s.so.1"),
                format!("/lib/{triple}/libgcc_s.so.1"),
            ],
        ]
        .iter()
        .filter_map(|group| group.iter().find_map(|p| self.resolve(p)))
        .filter(|found| self.first_time(*found))
        .collect();
        // What the linker reads besides programs: the start files (GCC's and
        // the C library's) and linker scripts, whole, and the symbol index at
        // the head of GCC's archive.
        let lib = format!("/usr/lib/{triple}");
        let link_files: Vec<Found> = [
            format!("{dir}/crtbeginS.o"),
            format!("{dir}/crtendS.o"),
            format!("{dir}/crtbegin.o"),
            format!("{dir}/crtend.o"),
            format!("{dir}/libgcc_s.so"),
            format!("{lib}/Scrt1.o"),
            format!("{lib}/crt1.o"),
            format!("{lib}/crti.o"),
            format!("{lib}/crtn.o"),
            format!("{lib}/libc.so"),
            format!("{lib}/libc_nonshared.a"),
        ]
        .iter()
        .filter_map(|p| self.resolve(p))
        .filter(|found| self.small(*found))
        .collect();
        let archive = self.resolve(&format!("{dir}/libgcc.a"));
        tracing::debug!(
            driver = path,
            programs = programs.len(),
            link_files = link_files.len(),
            "compiler's programs prefetched"
        );
        let this = Arc::clone(self);
        fetcher.spawn(async move {
            let mut programs = programs.into_iter();
            // The compiler runs first: its parts and libraries are asked for
            // first.
            if let Some(compiler) = programs.next() {
                Arc::clone(&this).examine(compiler, None, 0).await;
            }
            let others = programs.map(|found| Arc::clone(&this).examine(found, None, 0));
            futures::future::join_all(others).await;
            let mut batches = this.whole_files_by_layer(link_files);
            if let Some(((_, id), f)) = archive.and_then(|a| Some((a, this.fetcher(a.0)?))) {
                let size = f.index().entry(id).size();
                batches.push((f, vec![(id, 0..size.min(ARCHIVE_HEAD_BYTES))]));
            }
            let fetches = batches.iter().map(|(f, parts)| this.fetch(f, parts, None));
            futures::future::join_all(fetches).await;
        });
    }

    /// The compiler's search path in this stack, found once.
    fn search_path(&self) -> &SearchPath {
        self.search_path.get_or_init(|| {
            let mut path = SearchPath::default();
            let triples = self.list("usr/include", |n| n.contains("-linux-"));
            // The newest version first: an image with two keeps using the
            // default, mostly the newest.
            let versions = |dir: &str| {
                let mut v = self.list(dir, |_| true);
                v.sort_by_key(|s| std::cmp::Reverse(version_key(s)));
                v
            };
            for version in versions("usr/include/c++") {
                path.cxx.push(format!("usr/include/c++/{version}"));
                for triple in &triples {
                    path.cxx.push(format!("usr/include/{triple}/c++/{version}"));
                }
                path.cxx.push(format!("usr/include/c++/{version}/backward"));
            }
            for gcc in ["usr/lib/gcc", "usr/lib64/gcc"] {
                for triple in self.list(gcc, |_| true) {
                    for version in versions(&format!("{gcc}/{triple}")) {
                        path.c.push(format!("{gcc}/{triple}/{version}/include"));
                    }
                }
            }
            path.c.push("usr/local/include".into());
            for triple in &triples {
                path.c.push(format!("usr/include/{triple}"));
            }
            path.c.push("usr/include".into());
            tracing::debug!(cxx = ?path.cxx, c = ?path.c, "include search path");
            path
        })
    }

    /// The names of the subdirectories of directory `dir` in any layer of the
    /// stack that `keep` keeps (at most [`MAX_LISTED`], of the first
    /// [`MAX_DIR_ENTRIES`] entries: `usr/include` has hundreds).
    fn list(&self, dir: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for layer in &self.layers {
            let Some(fetcher) = layer.fetcher.upgrade() else {
                continue;
            };
            let index = fetcher.index();
            let Some(id) = index.resolve_path(dir) else {
                continue;
            };
            for child in index.children(id).take(MAX_DIR_ENTRIES) {
                let kind = index.entry(child.id).kind();
                if !matches!(kind, EntryKind::Dir | EntryKind::Symlink) {
                    continue;
                }
                let name = String::from_utf8_lossy(child.name).into_owned();
                if names.len() < MAX_LISTED && keep(&name) && !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        names
    }
}

/// Sorts version directory names (`12`, `4.9.2`, `14-win32`) numerically.
fn version_key(name: &str) -> Vec<u64> {
    name.split(['.', '-'])
        .map_while(|p| p.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiler_drivers_by_name() {
        assert_eq!(compiler_driver("gcc"), Some((false, None)));
        assert_eq!(compiler_driver("cc"), Some((false, None)));
        assert_eq!(compiler_driver("gcc-12"), Some((false, Some("12"))));
        assert_eq!(
            compiler_driver("x86_64-linux-gnu-gcc-12"),
            Some((false, Some("12")))
        );
        assert_eq!(compiler_driver("g++-4.9"), Some((true, Some("4.9"))));
        assert_eq!(compiler_driver("c++"), Some((true, None)));
        for other in [
            "gcc-ar-12",
            "gcc-nm",
            "c++filt",
            "clang",
            "gccgo",
            "gcc-",
            "cpp-12",
        ] {
            assert_eq!(compiler_driver(other), None, "{other}");
        }
    }

    #[test]
    fn languages_and_versions() {
        assert!(is_cxx("src/a.cpp"));
        assert!(is_cxx("usr/include/c++/12/vector"));
        assert!(!is_cxx("src/a.c"));
        assert!(!is_cxx("usr/include/stdio.h"));
        assert_eq!(dir_of("usr/include/stdio.h"), "usr/include");
        assert_eq!(dir_of("a.c"), "");
        let mut v = vec!["9", "12", "4.9.2", "10"];
        v.sort_by_key(|s| std::cmp::Reverse(version_key(s)));
        assert_eq!(v, ["12", "10", "9", "4.9.2"]);
    }
}
