//! What a Python module imports, read from its compiled (`.pyc`) or source
//! (`.py`) bytes, and where the imported modules' files lie in an image: the
//! pure half of Python import prefetch (`zest-fetch`'s library stack does the
//! fetching).
//!
//! An unprofiled Python start blocks once per module it imports, one after
//! another: the interpreter reads a module, runs it, and only then reads what
//! it imports. The names it will import are in the module already: a compiled
//! module's code imports them by name (`bytecode` decodes it), a source
//! module spells them in `import` and `from` statements. Fetching the files
//! those names resolve to as soon as a module is read makes an import tree
//! cost about as many round trips as it is deep.
//!
//! Each scan is a single bounded pass over bytes that may be anything:
//! hostile input yields at worst useless names, and only names that resolve
//! to a module file present in the image are fetched.

mod bytecode;

/// Candidate names taken from one module.
pub const MAX_NAMES: usize = 256;

/// Longest name taken (a dotted module path).
const MAX_NAME_LEN: usize = 128;

/// Source lines looked at in a `.py` file.
const MAX_SOURCE_LINES: usize = 4096;

/// `marshal` type codes of short ASCII strings (`TYPE_SHORT_ASCII`,
/// `TYPE_SHORT_ASCII_INTERNED`), with and without the reference flag.
const SHORT_ASCII: [u8; 4] = [b'z', b'Z', b'z' | 0x80, b'Z' | 0x80];

/// Python versions whose standard library is looked for when a source file
/// lies outside one (a start script): newest first.
pub const VERSIONS: std::ops::RangeInclusive<u32> = 6..=14;

/// The kind of Python file a name is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleFile {
    /// `NAME.TAG.pyc` in a `__pycache__` directory.
    Compiled,
    /// `NAME.py`.
    Source,
}

/// The modules Python 3.`version` imports from files at every start, before
/// a script's own, as the source of a module importing them: the codec
/// package and the UTF-8 codec (the file system and standard stream
/// encoding of a UTF-8 or C locale), and the site hooks (`site` itself and
/// the modules it needs are frozen into the interpreter from 3.11 on, files
/// before).
pub fn startup_imports(version: u32) -> String {
    let mut source = String::from(
        "import encodings, encodings.aliases, encodings.utf_8\n\
         import sitecustomize, usercustomize\n",
    );
    if version < 11 {
        source.push_str(
            "import abc, codecs, io, _collections_abc, _sitebuiltins, genericpath, \
             posixpath, os, site, stat\n",
        );
    }
    source
}

/// Whether the file named `name` is a Python module the interpreter reads.
pub fn module_file(name: &[u8]) -> Option<ModuleFile> {
    if name.ends_with(b".pyc") {
        Some(ModuleFile::Compiled)
    } else if name.ends_with(b".py") {
        Some(ModuleFile::Source)
    } else {
        None
    }
}

/// Where a module's imports are looked for: the directory of the module's own
/// package (relative imports), the import roots (the standard library's
/// directory and its package directories), and the cache tag of compiled
/// files (`cpython-311`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportContext {
    /// The directory of the module's own package (absolute).
    pub package_dir: String,
    /// The import roots: the standard library's directory first.
    pub roots: Vec<String>,
    /// The cache tag of compiled files (`cpython-311`).
    pub tag: String,
}

impl ImportContext {
    /// The context of the module at `path` (absolute, `/`-separated), when it
    /// lies inside a standard library directory (`.../pythonX.Y/...`); the tag
    /// of a compiled module comes from its name, else from the version.
    pub fn of(path: &str) -> Option<ImportContext> {
        let parts: Vec<&str> = path.split('/').collect();
        let (file, dirs) = parts.split_last()?;
        let lib = dirs.iter().rposition(|d| python_version(d).is_some())?;
        let version = python_version(dirs[lib])?;
        let root = dirs[..=lib].join("/");
        let mut package = dirs.to_vec();
        let tag = if package.last() == Some(&"__pycache__") {
            package.pop();
            // NAME.TAG.pyc or NAME.TAG.opt-N.pyc
            file.split('.').nth(1)?.to_owned()
        } else {
            format!("cpython-3{version}")
        };
        Some(ImportContext {
            package_dir: package.join("/"),
            roots: Self::roots_of(&root),
            tag,
        })
    }

    /// The context of a start script outside any standard library: the
    /// library `python3.{version}` under `prefix` (`/usr/lib`, `/usr/local/lib`).
    pub fn for_script(script: &str, prefix: &str, version: u32) -> ImportContext {
        let dir = script.rsplit_once('/').map_or("", |(d, _)| d);
        ImportContext {
            package_dir: dir.to_owned(),
            roots: Self::roots_of(&format!("{prefix}/python3.{version}")),
            tag: format!("cpython-3{version}"),
        }
    }

    fn roots_of(root: &str) -> Vec<String> {
        let mut roots = vec![
            root.to_owned(),
            format!("{root}/site-packages"),
            format!("{root}/dist-packages"),
        ];
        // Debian's packages of every Python 3.
        if let Some((prefix, _)) = root.rsplit_once('/') {
            roots.push(format!("{prefix}/python3/dist-packages"));
        }
        roots
    }

    /// The directories module `name` (dotted) may be under: its own
    /// package's for a plain name (a relative import), then the roots.
    pub fn bases(&self, name: &str) -> impl Iterator<Item = &String> {
        (!name.contains('.'))
            .then_some(&self.package_dir)
            .into_iter()
            .chain(self.roots.iter())
    }

    /// Where module `name` (dotted) may be under directory `base`, as groups
    /// of alternatives: the first file of a group that exists is the one the
    /// interpreter reads (compiled before source, a package before a module).
    /// A group per package along the path (its `__init__`), the last also
    /// taking the module file. Empty when `name` is not a module name.
    pub fn files_under(&self, base: &str, name: &str) -> Vec<Vec<String>> {
        let parts: Vec<&str> = name.split('.').collect();
        if parts.iter().any(|p| !is_identifier(p)) {
            return Vec::new();
        }
        let mut groups = Vec::new();
        let mut dir = base.to_owned();
        for (i, part) in parts.iter().enumerate() {
            let package = format!("{dir}/{part}");
            let mut alternatives = vec![
                format!("{package}/__pycache__/__init__.{}.pyc", self.tag),
                format!("{package}/__init__.py"),
            ];
            if i + 1 == parts.len() {
                alternatives.push(format!("{dir}/__pycache__/{part}.{}.pyc", self.tag));
                alternatives.push(format!("{dir}/{part}.py"));
            }
            groups.push(alternatives);
            dir = package;
        }
        groups
    }
}

/// X.Y's Y of a directory named `pythonX.Y` (Python 3 only).
fn python_version(dir: &str) -> Option<u32> {
    let minor = dir.strip_prefix("python3.")?;
    if minor.is_empty() || minor.len() > 2 || !minor.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    minor.parse().ok()
}

fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether `s` is a dotted name worth looking up: identifiers joined by dots,
/// not too long, and (for a name that is not known to be imported, `strict`)
/// not a dunder (`__name__`, `__init__`).
fn is_module_name(s: &str, strict: bool) -> bool {
    s.len() <= MAX_NAME_LEN
        && !(strict && s.starts_with("__") && s.ends_with("__"))
        && s.split('.').all(is_identifier)
}

/// A module a module imports, as far as its bytes tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Import {
    /// The dotted name (a relative import's without its leading dots).
    pub name: String,
    /// Imported by a function, when it is called (perhaps never), not when
    /// the module itself is imported.
    pub in_function: bool,
}

/// The modules a module whose bytes begin with `data` imports (distinct, in
/// order of appearance, at most [`MAX_NAMES`]).
///
/// A compiled module's code is decoded for its imports (`bytecode`); when
/// that fails (a version this scan does not know, bytes cut short) every
/// short identifier-like string is taken as a candidate instead. A source
/// module's `import` and `from` statements are read, those indented under a
/// `def` taken as a function's.
pub fn imported_names(kind: ModuleFile, data: &[u8]) -> Vec<Import> {
    let mut out: Vec<Import> = Vec::new();
    let mut push = |name: &str, in_function: bool, strict: bool| {
        if !is_module_name(name, strict) {
            return;
        }
        if let Some(seen) = out.iter_mut().find(|i| i.name == name) {
            // Imported at import time somewhere: that is when it is read.
            seen.in_function &= in_function;
        } else if out.len() < MAX_NAMES {
            out.push(Import {
                name: name.to_owned(),
                in_function,
            });
        }
    };
    match kind {
        ModuleFile::Compiled => match bytecode::code_imports(data) {
            Some(imports) => {
                for import in imports {
                    push(&import.name, import.in_function, false);
                }
            }
            None => identifier_scan(data, |name| push(name, false, true)),
        },
        ModuleFile::Source => source_scan(data, push),
    }
    out
}

/// Every short ASCII string of `marshal` data that is identifier-like.
fn identifier_scan(data: &[u8], mut push: impl FnMut(&str)) {
    let mut i = 0;
    while i + 1 < data.len() {
        if SHORT_ASCII.contains(&data[i]) {
            let len = usize::from(data[i + 1]);
            let start = i + 2;
            if len > 0 && start + len <= data.len() {
                if let Ok(s) = std::str::from_utf8(&data[start..start + len]) {
                    if is_module_name(s, true) {
                        push(s);
                        i = start + len;
                        continue;
                    }
                }
            }
        }
        i += 1;
    }
}

/// The `import` and `from` statements of source `data`, each with whether it
/// lies in a function (indented under a `def`, by the indentation of the
/// lines before it).
fn source_scan(data: &[u8], mut push: impl FnMut(&str, bool, bool)) {
    let text = String::from_utf8_lossy(data);
    // Open `def` and `class` blocks: (indentation, is a function).
    let mut blocks: Vec<(usize, bool)> = Vec::new();
    for line in text.lines().take(MAX_SOURCE_LINES) {
        let body = line.trim_start();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let indent = line.len() - body.len();
        while blocks.last().is_some_and(|&(i, _)| i >= indent) {
            blocks.pop();
        }
        let in_function = blocks.iter().any(|&(_, f)| f);
        if body.starts_with("def ") || body.starts_with("async def ") {
            blocks.push((indent, true));
        } else if body.starts_with("class ") {
            blocks.push((indent, false));
        }
        if let Some(rest) = body.strip_prefix("import ") {
            for item in rest.split(',') {
                if let Some(name) = item.split_whitespace().next() {
                    push(name, in_function, true);
                }
            }
        } else if let Some(rest) = body.strip_prefix("from ") {
            let mut words = rest.split_whitespace();
            let (Some(module), Some("import")) = (words.next(), words.next()) else {
                continue;
            };
            let module = module.trim_start_matches('.');
            if !module.is_empty() {
                push(module, in_function, true);
            }
            // `from package import module` imports a module too.
            for item in words.collect::<Vec<_>>().join(" ").split(',') {
                let item = item.trim_matches(|c: char| c == '(' || c == ')' || c.is_whitespace());
                if let Some(name) = item.split_whitespace().next() {
                    if module.is_empty() {
                        push(name, in_function, true);
                    } else {
                        push(&format!("{module}.{name}"), in_function, true);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn short(s: &str) -> Vec<u8> {
        let mut v = vec![b'z' | 0x80, s.len() as u8];
        v.extend_from_slice(s.as_bytes());
        v
    }

    fn names(imports: &[Import]) -> Vec<&str> {
        imports.iter().map(|i| i.name.as_str()).collect()
    }

    #[test]
    fn compiled_modules_of_an_unknown_version_name_their_imports_in_short_strings() {
        let mut pyc = vec![0xa7, 0x0d, 0x0d, 0x0a, 0, 0, 0, 0];
        pyc.extend(short("json"));
        pyc.push(b')');
        pyc.extend(short("email.mime"));
        pyc.extend(short("__name__"));
        pyc.extend(short("not a name"));
        pyc.extend([b'Z', 4]);
        pyc.extend(b"json"); // a repeat
        pyc.extend([b'Z', 200, b'x']); // longer than the data
        let imports = imported_names(ModuleFile::Compiled, &pyc);
        assert_eq!(names(&imports), ["json", "email.mime"]);
        assert!(imports.iter().all(|i| !i.in_function));
        // Anything at all: bounded, never a panic.
        let noise: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        assert!(imported_names(ModuleFile::Compiled, &noise).len() <= MAX_NAMES);
        let many: Vec<u8> = (0..1000).flat_map(|i| short(&format!("m{i}"))).collect();
        assert_eq!(imported_names(ModuleFile::Compiled, &many).len(), MAX_NAMES);
    }

    #[test]
    fn compiled_modules_of_a_known_version_name_only_what_their_code_imports() {
        let mut pyc = bytecode::tests::Pyc::new(3495);
        let (name, from, _) = pyc.ops();
        pyc.code(
            false,
            &[(name, 0), (name, 1), (from, 2), (1, 3)],
            &["__future__", "json", "decoder", "copy"],
            |pyc| {
                pyc.code(
                    true,
                    &[(name, 0), (name, 1)],
                    &["json", "subprocess"],
                    |_| {},
                );
            },
        );
        let imports = imported_names(ModuleFile::Compiled, &pyc.bytes);
        assert_eq!(
            imports,
            [
                Import {
                    name: "__future__".into(),
                    in_function: false
                },
                Import {
                    name: "json".into(),
                    in_function: false
                },
                Import {
                    name: "json.decoder".into(),
                    in_function: false
                },
                Import {
                    name: "subprocess".into(),
                    in_function: true
                },
            ]
        );
    }

    /// A real module compiled by CPython 3.11 (`testdata/imports.py`):
    /// what the decoder finds is what `dis` shows.
    #[test]
    fn a_module_compiled_by_cpython_names_its_imports() {
        let pyc = include_bytes!("../testdata/imports.cpython-311.pyc");
        let imports = imported_names(ModuleFile::Compiled, pyc);
        let at_import: Vec<&str> = imports
            .iter()
            .filter(|i| !i.in_function)
            .map(|i| i.name.as_str())
            .collect();
        let in_functions: Vec<&str> = imports
            .iter()
            .filter(|i| i.in_function)
            .map(|i| i.name.as_str())
            .collect();
        assert_eq!(
            at_import,
            [
                "__future__",
                "__future__.annotations",
                "os",
                "email.mime.text",
                "collections",
                "collections.abc",
                "sibling",
                "json.decoder",
                "decimal",
                "decimal.Decimal",
            ]
        );
        assert_eq!(
            in_functions,
            ["subprocess", "xml.etree", "xml.etree.ElementTree"]
        );
    }

    #[test]
    fn source_modules_name_their_imports_in_statements() {
        let src = b"import os, sys as system\n\
            from json import decoder\n\
            from . import sibling\n\
            from .pkg import (a, b)\n\
            \tfrom xml.etree import ElementTree as ET\n\
            x = 'import nothing'\n\
            from broken\n\
            class C:\n\
            \x20   import csv\n\
            \x20   def f(self):\n\
            \x20       import subprocess\n\
            \x20   import glob\n\
            async def g():\n\
            \x20   # a comment\n\
            \n\
            \x20   from email import parser\n\
            import gzip\n";
        let imports = imported_names(ModuleFile::Source, src);
        assert_eq!(
            names(&imports),
            [
                "os",
                "sys",
                "json",
                "json.decoder",
                "sibling",
                "pkg",
                "pkg.a",
                "pkg.b",
                "xml.etree",
                "xml.etree.ElementTree",
                "csv",
                "subprocess",
                "glob",
                "email",
                "email.parser",
                "gzip",
            ]
        );
        let in_function: Vec<&str> = imports
            .iter()
            .filter(|i| i.in_function)
            .map(|i| i.name.as_str())
            .collect();
        assert_eq!(in_function, ["subprocess", "email", "email.parser"]);
    }

    #[test]
    fn start_up_modules_are_files_only_where_the_version_does_not_freeze_them() {
        let names = |v| imported_names(ModuleFile::Source, startup_imports(v).as_bytes());
        for v in VERSIONS {
            let names: Vec<String> = names(v).into_iter().map(|i| i.name).collect();
            assert!(names.iter().any(|n| n == "encodings.utf_8"), "3.{v}");
            assert!(names.iter().any(|n| n == "sitecustomize"), "3.{v}");
            assert_eq!(names.iter().any(|n| n == "site"), v < 11, "3.{v}");
            assert_eq!(names.iter().any(|n| n == "os"), v < 11, "3.{v}");
        }
    }

    #[test]
    fn modules_are_looked_for_where_the_interpreter_would() {
        let ctx = ImportContext::of(
            "/usr/lib/python3.11/asyncio/__pycache__/base_events.cpython-311.pyc",
        )
        .unwrap();
        assert_eq!(ctx.package_dir, "/usr/lib/python3.11/asyncio");
        assert_eq!(ctx.tag, "cpython-311");
        assert_eq!(ctx.roots[0], "/usr/lib/python3.11");
        assert!(ctx
            .roots
            .contains(&"/usr/lib/python3/dist-packages".to_owned()));
        // Its own package first (a relative import), then the roots.
        let bases: Vec<&String> = ctx.bases("events").collect();
        assert_eq!(bases.len(), 1 + ctx.roots.len());
        assert_eq!(bases[0], "/usr/lib/python3.11/asyncio");
        assert_eq!(
            ctx.files_under(bases[0], "events"),
            [[
                "/usr/lib/python3.11/asyncio/events/__pycache__/__init__.cpython-311.pyc",
                "/usr/lib/python3.11/asyncio/events/__init__.py",
                "/usr/lib/python3.11/asyncio/__pycache__/events.cpython-311.pyc",
                "/usr/lib/python3.11/asyncio/events.py",
            ]]
        );
        // A dotted name: each package's __init__ along the way.
        assert_eq!(ctx.bases("email.mime").count(), ctx.roots.len());
        let groups = ctx.files_under("/usr/lib/python3.11", "email.mime");
        assert_eq!(groups.len(), 2);
        assert_eq!(
            groups[0],
            [
                "/usr/lib/python3.11/email/__pycache__/__init__.cpython-311.pyc",
                "/usr/lib/python3.11/email/__init__.py"
            ]
        );
        assert_eq!(
            groups[1][2],
            "/usr/lib/python3.11/email/__pycache__/mime.cpython-311.pyc"
        );
        assert!(ctx.files_under("/usr/lib/python3.11", "../etc").is_empty());
        // A source module in the library: the tag from the version.
        let ctx = ImportContext::of("/usr/local/lib/python3.12/json/decoder.py").unwrap();
        assert_eq!(ctx.tag, "cpython-312");
        assert_eq!(ctx.package_dir, "/usr/local/lib/python3.12/json");
        // Outside any library: none (a start script gets `for_script`).
        assert_eq!(ImportContext::of("/app/main.py"), None);
        assert_eq!(ImportContext::of("/usr/lib/python3.x/a.py"), None);
        let ctx = ImportContext::for_script("/bench/imports.py", "/usr/lib", 11);
        assert_eq!(ctx.package_dir, "/bench");
        assert_eq!(ctx.roots[0], "/usr/lib/python3.11");
        assert_eq!(
            module_file(b"a.cpython-311.pyc"),
            Some(ModuleFile::Compiled)
        );
        assert_eq!(module_file(b"a.py"), Some(ModuleFile::Source));
        assert_eq!(module_file(b"a.so"), None);
    }
}
