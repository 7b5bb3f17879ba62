//! Fuzzes the ELF reader that library prefetch runs on files from images: any
//! input is headers, a dynamic section, names, or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zest_format::elf::{string_at, ElfError, ElfFile};

fuzz_target!(|data: &[u8]| {
    let _ = ElfFile::headers_end(data);
    let elf = match ElfFile::parse(data) {
        Ok(elf) => elf,
        Err(ElfError::NeedMore(end)) => {
            assert!(end > data.len() as u64, "asked for bytes it had");
            return;
        }
        Err(_) => return,
    };
    // The whole input doubles as the dynamic section and the string table.
    if let Ok(info) = elf.dynamic_info(data) {
        for off in info.needed.iter().chain(info.search_path.iter()) {
            let _ = string_at(data, *off);
        }
        if let Some(v) = info.strtab {
            let _ = elf.file_offset(v);
        }
    }
    for s in &elf.segments {
        assert!(s.file.start <= s.file.end);
    }
});
