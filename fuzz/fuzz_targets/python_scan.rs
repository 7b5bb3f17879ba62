//! Fuzzes the Python import scan that import prefetch runs on modules from
//! images: any input, compiled or source, yields a bounded list of module
//! names (identifiers joined by dots), never a panic; and every path built from
//! them stays under the directory it was asked for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zest_format::python::{imported_names, ImportContext, ModuleFile, MAX_NAMES};

fuzz_target!(|data: &[u8]| {
    let context = ImportContext::of("/usr/lib/python3.11/pkg/__pycache__/m.cpython-311.pyc")
        .expect("a library path");
    for kind in [ModuleFile::Compiled, ModuleFile::Source] {
        let names = imported_names(kind, data);
        assert!(names.len() <= MAX_NAMES);
        for name in &names {
            assert!(!name.is_empty() && !name.contains('/') && !name.contains(".."));
            for base in context.bases(name) {
                for group in context.files_under(base, name) {
                    for path in group {
                        assert!(path.starts_with(base.as_str()), "{path} under {base}");
                    }
                }
            }
        }
    }
});
