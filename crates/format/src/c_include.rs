//! What a C or C++ file includes, read from its source bytes: the pure half of
//! include prefetch (`zest-fetch`'s library stack resolves and fetches).
//!
//! An unprofiled compile blocks once per header it opens, one after another:
//! the preprocessor reads a file, meets an `#include`, and only then opens the
//! header it names. Those names are in the file already. Taking every
//! `#include`, `#include_next` and `#import` directive of a file as soon as it
//! is read, and fetching the headers they resolve to a level at a time, makes
//! a header tree cost about as many round trips as it is deep.
//!
//! No preprocessing is done: directives inside `#if` branches the compiler
//! will skip are taken too (a small header fetched for nothing), and so are
//! directives in block comments. Macro-computed names (`#include MACRO`) are
//! not followed. The scan is one bounded pass over bytes that may be
//! anything: hostile input yields at worst useless names, and [`join`] never
//! makes a path outside the image of them.

/// Directives taken from one file.
pub const MAX_INCLUDES: usize = 512;

/// Longest header name taken.
pub const MAX_NAME_LEN: usize = 255;

/// Source lines looked at in one file.
const MAX_LINES: usize = 1 << 16;

/// The kind of C or C++ file a name is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CFile {
    /// A translation unit the compiler is given (`.c`, `.cc`, `.cpp`, ...):
    /// besides its own directives, the compiler includes `stdc-predef.h`
    /// before it (GCC on glibc).
    Source,
    /// A header (`.h`, `.hpp`, ...), or an extension-less file in an include
    /// directory (the C++ standard headers: `iostream`, `vector`).
    Header,
}

/// Whether the file named `name` at `path` (slash separated, no leading slash;
/// looked at only for a name without a dot) is C or C++ source.
pub fn c_file(name: &[u8], path: impl FnOnce() -> String) -> Option<CFile> {
    let ext = match name.iter().rposition(|&b| b == b'.') {
        Some(dot) => &name[dot + 1..],
        None => {
            // The C++ standard library's headers have no extension.
            let path = path();
            let in_include_dir = path.split('/').any(|c| c == "include");
            return (in_include_dir && !name.is_empty()).then_some(CFile::Header);
        }
    };
    match ext {
        b"c" | b"cc" | b"cpp" | b"cxx" | b"c++" | b"C" | b"m" | b"mm" => Some(CFile::Source),
        b"h" | b"hh" | b"hpp" | b"hxx" | b"h++" | b"H" | b"inc" | b"tcc" | b"ipp" => {
            Some(CFile::Header)
        }
        _ => None,
    }
}

/// One `#include` directive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Include {
    /// The header name as written (`stdio.h`, `bits/types.h`, `../x.h`).
    pub name: String,
    /// Written `"name"`: looked for next to the including file first.
    pub quoted: bool,
    /// `#include_next`: the search goes on after the directory the including
    /// file was found in.
    pub next: bool,
}

/// The `#include` directives of `src`, in order, each name once; at most
/// [`MAX_INCLUDES`].
pub fn includes(src: &[u8]) -> Vec<Include> {
    let mut out: Vec<Include> = Vec::new();
    for line in src.split(|&b| b == b'\n').take(MAX_LINES) {
        if out.len() >= MAX_INCLUDES {
            break;
        }
        let Some(include) = directive(line) else {
            continue;
        };
        if !out
            .iter()
            .any(|i| i.name == include.name && i.quoted == include.quoted)
        {
            out.push(include);
        }
    }
    out
}

/// The include directive of one source line, if it is one with a literal
/// name.
fn directive(line: &[u8]) -> Option<Include> {
    let rest = skip_blanks(line).strip_prefix(b"#")?;
    let rest = skip_blanks(rest);
    let (rest, next) = if let Some(r) = rest.strip_prefix(b"include_next") {
        (r, true)
    } else if let Some(r) = rest.strip_prefix(b"include") {
        (r, false)
    } else if let Some(r) = rest.strip_prefix(b"import") {
        (r, false)
    } else {
        return None;
    };
    let rest = skip_blanks(rest);
    let (close, quoted) = match rest.first()? {
        b'<' => (b'>', false),
        b'"' => (b'"', true),
        _ => return None, // a macro: not followed
    };
    let body = &rest[1..];
    let end = body.iter().position(|&b| b == close)?;
    let name = std::str::from_utf8(&body[..end]).ok()?;
    valid_name(name).then(|| Include {
        name: name.to_string(),
        quoted,
        next,
    })
}

fn skip_blanks(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
    &s[n..]
}

/// A relative path of printable characters whose components are names or
/// `..` (normalized against the including file's directory by the caller),
/// never absolute.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('/')
        && !name.ends_with('/')
        && name.chars().all(|c| !c.is_control())
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && !c.trim().is_empty())
}

/// Joins header `name` onto directory `dir` (slash separated, no leading
/// slash) resolving `..` lexically; `None` when it would climb above the
/// root of the image or name the root itself.
pub fn join(dir: &str, name: &str) -> Option<String> {
    let mut parts: Vec<&str> = dir.split('/').filter(|c| !c.is_empty()).collect();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(src: &str) -> Vec<(String, bool, bool)> {
        includes(src.as_bytes())
            .into_iter()
            .map(|i| (i.name, i.quoted, i.next))
            .collect()
    }

    #[test]
    fn directives_are_taken_as_written() {
        let src = "/* hello */\n#include <stdio.h>\n  #  include\t\"local/x.h\" // why\n\
                   #include_next <limits.h>\n#import <Foundation.h>\n#include MACRO_H\n\
                   #define include <no.h>\n#include <stdio.h>\n#include <unterminated.h\n\
                   #if 0\n#include <sys/types.h>\n#endif\n";
        assert_eq!(
            names(src),
            [
                ("stdio.h".to_string(), false, false),
                ("local/x.h".to_string(), true, false),
                ("limits.h".to_string(), false, true),
                ("Foundation.h".to_string(), false, false),
                ("sys/types.h".to_string(), false, false),
            ]
        );
    }

    #[test]
    fn hostile_names_are_refused() {
        for bad in [
            "#include </etc/shadow>",
            "#include <>",
            "#include <a//b.h>",
            "#include <a/./b.h>",
            "#include <dir/>",
            "#include \"a\u{1}b.h\"",
        ] {
            assert!(includes(bad.as_bytes()).is_empty(), "{bad}");
        }
        let long = format!("#include <{}.h>", "a".repeat(MAX_NAME_LEN));
        assert!(includes(long.as_bytes()).is_empty());
        let many: String = (0..2 * MAX_INCLUDES)
            .map(|i| format!("#include <h{i}.h>\n"))
            .collect();
        assert_eq!(includes(many.as_bytes()).len(), MAX_INCLUDES);
    }

    #[test]
    fn names_join_inside_the_image() {
        assert_eq!(
            join("usr/include", "bits/types.h").unwrap(),
            "usr/include/bits/types.h"
        );
        assert_eq!(join("src/lib", "../inc/a.h").unwrap(), "src/inc/a.h");
        assert_eq!(join("", "a.h").unwrap(), "a.h");
        assert_eq!(join("src", "../../a.h"), None);
        assert_eq!(join("usr/include", "../.."), None);
    }

    #[test]
    fn c_files_are_told_by_name_and_place() {
        let no_path = || unreachable!("a name with a dot decides alone");
        assert_eq!(c_file(b"hello.c", no_path), Some(CFile::Source));
        assert_eq!(c_file(b"x.cpp", no_path), Some(CFile::Source));
        assert_eq!(c_file(b"stdio.h", no_path), Some(CFile::Header));
        assert_eq!(c_file(b"vector.tcc", no_path), Some(CFile::Header));
        assert_eq!(c_file(b"libc.so.6", no_path), None);
        assert_eq!(c_file(b"README.md", no_path), None);
        assert_eq!(
            c_file(b"vector", || "usr/include/c++/12/vector".into()),
            Some(CFile::Header)
        );
        assert_eq!(c_file(b"bash", || "usr/bin/bash".into()), None);
    }
}
