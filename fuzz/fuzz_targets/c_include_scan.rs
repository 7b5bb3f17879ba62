//! Fuzzes the `#include` scan that include prefetch runs on C and C++ files
//! from images: any input yields a bounded list of relative header names,
//! never a panic; and every path joined from them stays inside the image.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zest_format::c_include::{includes, join, MAX_INCLUDES, MAX_NAME_LEN};

fuzz_target!(|data: &[u8]| {
    let found = includes(data);
    assert!(found.len() <= MAX_INCLUDES);
    for include in &found {
        let name = &include.name;
        assert!(!name.is_empty() && name.len() <= MAX_NAME_LEN && !name.starts_with('/'));
        for dir in ["usr/include", "app/src", ""] {
            if let Some(path) = join(dir, name) {
                assert!(!path.starts_with('/'));
                assert!(path.split('/').all(|c| !c.is_empty() && c != "." && c != ".."));
                if !name.split('/').any(|c| c == "..") {
                    assert!(path.starts_with(dir));
                }
            }
        }
    }
});
