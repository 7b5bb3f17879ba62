//! Fuzzes the scan of a program's read-only data for the names of data files
//! it opens: any input yields a bounded list of names, each an absolute path
//! with no `.`, `..` or empty component or a plain file name, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zest_format::elf::{file_names, MAX_FILE_NAMES};

fuzz_target!(|data: &[u8]| {
    let names = file_names(data);
    assert!(names.len() <= MAX_FILE_NAMES);
    for name in names {
        let name = std::str::from_utf8(name).expect("names are ASCII");
        match name.strip_prefix('/') {
            Some(path) => assert!(path
                .split('/')
                .all(|c| !c.is_empty() && !c.starts_with('.'))),
            None => assert!(!name.contains('/') && !name.starts_with('.') && !name.is_empty()),
        }
    }
});
