//! Fuzzes the Python import scan that import prefetch runs on modules from
//! images: any input, compiled or source, yields a bounded list of module
//! names (identifiers joined by dots), never a panic; and every path built from
//! them stays under the directory it was asked for. Inputs are also tried
//! behind the header of each Python version the compiled-code decoder knows,
//! so the fuzzer reaches the decoder with a valid magic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zest_format::python::{imported_names, ImportContext, ModuleFile, MAX_NAMES};

fuzz_target!(|data: &[u8]| {
    let context = ImportContext::of("/usr/lib/python3.11/pkg/__pycache__/m.cpython-311.pyc")
        .expect("a library path");
    // 3.6, 3.7, 3.10, 3.11, 3.12, 3.13 and 3.14 headers.
    let magic: u16 = [3379, 3394, 3439, 3495, 3531, 3571, 3627]
        [usize::from(data.first().copied().unwrap_or(0)) % 7];
    let mut with_header = magic.to_le_bytes().to_vec();
    with_header.extend(b"\r\n");
    with_header.resize(if magic < 3390 { 12 } else { 16 }, 0);
    with_header.extend(data.get(1..).unwrap_or_default());
    for (kind, data) in [
        (ModuleFile::Compiled, data),
        (ModuleFile::Compiled, &with_header[..]),
        (ModuleFile::Source, data),
    ] {
        let imports = imported_names(kind, data);
        assert!(imports.len() <= MAX_NAMES);
        for name in imports.iter().map(|i| &i.name) {
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
