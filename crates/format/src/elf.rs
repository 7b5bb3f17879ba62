//! Just enough of ELF to know, from an executable's or shared object's first
//! bytes, what the dynamic loader will read next: the program interpreter, the
//! loadable segments it maps and the shared objects it needs (`DT_NEEDED`, with
//! `DT_RUNPATH`/`DT_RPATH`).
//!
//! Why a snapshotter parses ELF: on a cold start without a profile, every
//! shared object costs the start its own round trips (the loader reads its
//! header, then maps and relocates its data segment), one library after
//! another. The libraries a program needs are written in the program itself,
//! so the fetcher can ask for all of them at once (the library prefetch of
//! `zest-fetch`). Nothing here is trusted: the bytes come from an image, every
//! offset is checked, every count bounded, and a malformed file is an
//! [`ElfError`], never a panic.
//!
//! Usage: [`ElfFile::parse`] the first bytes of a file (the ELF header and the
//! program headers must be inside them; [`ElfFile::headers_end`] says how many
//! bytes that takes), read the [`ElfFile::dynamic`] segment's bytes and pass
//! them to [`ElfFile::dynamic_info`], map [`DynamicInfo::strtab`] to a file
//! offset with [`ElfFile::file_offset`], and read each name with
//! [`string_at`].
//!
//! [`file_names`] finds the strings of a program's read-only data that may
//! name the data files it opens (the fetcher fetches them before it does).

use std::ops::Range;

/// Most program headers accepted (real files have about a dozen).
pub const MAX_PROGRAM_HEADERS: usize = 128;
/// Most dynamic-section entries examined.
pub const MAX_DYNAMIC_ENTRIES: usize = 4096;
/// Most `DT_NEEDED` entries kept.
pub const MAX_NEEDED: usize = 128;
/// Longest library name or search path read from the string table.
pub const MAX_NAME_LEN: usize = 4096;

/// Why bytes are not a usable ELF file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    /// Not an ELF file at all (no magic, unknown class or byte order).
    #[error("not an ELF file")]
    NotElf,
    /// The program headers end past the bytes given: read this many and retry.
    #[error("the program headers end at byte {0}, past the bytes read")]
    NeedMore(u64),
    /// A header field is out of range.
    #[error("malformed ELF file: {0}")]
    Malformed(&'static str),
}

/// A loadable segment (`PT_LOAD`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Bytes of the file mapped.
    pub file: Range<u64>,
    /// Virtual address of the first byte.
    pub vaddr: u64,
    /// Mapped executable (`PF_X`).
    pub executable: bool,
    /// Mapped writable (`PF_W`): relocated at load time, so read whole.
    pub writable: bool,
}

/// What the program headers of an ELF file say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfFile {
    /// 64-bit (`ELFCLASS64`).
    pub is_64: bool,
    /// Little-endian (`ELFDATA2LSB`).
    pub little_endian: bool,
    /// `e_machine`.
    pub machine: u16,
    /// Bytes of the file holding the interpreter's path (`PT_INTERP`).
    pub interp: Option<Range<u64>>,
    /// The loadable segments, in header order.
    pub segments: Vec<Segment>,
    /// Bytes of the file holding the dynamic section (`PT_DYNAMIC`).
    pub dynamic: Option<Range<u64>>,
}

/// What the dynamic section says about other files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DynamicInfo {
    /// String-table offsets of the needed shared objects' names, in order.
    pub needed: Vec<u64>,
    /// Virtual address of the string table (`DT_STRTAB`).
    pub strtab: Option<u64>,
    /// Size of the string table (`DT_STRSZ`).
    pub strsz: Option<u64>,
    /// String-table offset of `DT_RUNPATH`, else of `DT_RPATH`.
    pub search_path: Option<u64>,
}

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

/// Little- or big-endian fixed-width reads, bounds-checked.
#[derive(Clone, Copy)]
struct Reader<'a> {
    bytes: &'a [u8],
    little: bool,
}

impl Reader<'_> {
    fn take<const N: usize>(&self, at: u64) -> Result<[u8; N], ElfError> {
        let start = usize::try_from(at).map_err(|_| ElfError::Malformed("offset too large"))?;
        let end = start
            .checked_add(N)
            .ok_or(ElfError::Malformed("offset too large"))?;
        let b = self
            .bytes
            .get(start..end)
            .ok_or(ElfError::Malformed("field past the end of the bytes"))?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }
    fn u16(&self, at: u64) -> Result<u16, ElfError> {
        let b = self.take::<2>(at)?;
        Ok(if self.little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        })
    }
    fn u32(&self, at: u64) -> Result<u32, ElfError> {
        let b = self.take::<4>(at)?;
        Ok(if self.little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    }
    fn u64(&self, at: u64) -> Result<u64, ElfError> {
        let b = self.take::<8>(at)?;
        Ok(if self.little {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        })
    }
    /// A word of the file's class: 8 bytes for ELF64, 4 for ELF32.
    fn word(&self, is_64: bool, at: u64) -> Result<u64, ElfError> {
        if is_64 {
            self.u64(at)
        } else {
            self.u32(at).map(u64::from)
        }
    }
}

/// `[offset, offset + len)`, or an error when it overflows.
fn span(offset: u64, len: u64) -> Result<Range<u64>, ElfError> {
    let end = offset
        .checked_add(len)
        .ok_or(ElfError::Malformed("segment end overflows"))?;
    Ok(offset..end)
}

impl ElfFile {
    /// Whether `head` starts like an ELF file (cheap; call before parsing).
    pub fn has_magic(head: &[u8]) -> bool {
        head.starts_with(b"\x7fELF")
    }

    /// Where the program headers end, from the ELF header alone (the first 64
    /// bytes); [`ElfFile::parse`] needs that many bytes.
    pub fn headers_end(head: &[u8]) -> Result<u64, ElfError> {
        let (r, is_64) = ident(head)?;
        let (phoff, phentsize, phnum) = program_header_table(r, is_64)?;
        phoff
            .checked_add(u64::from(phentsize) * u64::from(phnum))
            .ok_or(ElfError::Malformed("program header table overflows"))
    }

    /// Parses the ELF header and the program headers from the first bytes of a
    /// file. [`ElfError::NeedMore`] when the program headers end past `head`.
    pub fn parse(head: &[u8]) -> Result<ElfFile, ElfError> {
        let (r, is_64) = ident(head)?;
        let machine = r.u16(18)?;
        let (phoff, phentsize, phnum) = program_header_table(r, is_64)?;
        let end = Self::headers_end(head)?;
        if end > head.len() as u64 {
            return Err(ElfError::NeedMore(end));
        }
        let mut file = ElfFile {
            is_64,
            little_endian: r.little,
            machine,
            interp: None,
            segments: Vec::new(),
            dynamic: None,
        };
        for i in 0..u64::from(phnum) {
            let at = phoff + i * u64::from(phentsize);
            let kind = r.u32(at)?;
            // ELF64: type, flags, offset, vaddr, paddr, filesz, memsz, align.
            // ELF32: type, offset, vaddr, paddr, filesz, memsz, flags, align.
            let (flags, offset, vaddr, filesz) = if is_64 {
                (
                    r.u32(at + 4)?,
                    r.u64(at + 8)?,
                    r.u64(at + 16)?,
                    r.u64(at + 32)?,
                )
            } else {
                (
                    r.u32(at + 24)?,
                    u64::from(r.u32(at + 4)?),
                    u64::from(r.u32(at + 8)?),
                    u64::from(r.u32(at + 16)?),
                )
            };
            match kind {
                PT_LOAD => file.segments.push(Segment {
                    file: span(offset, filesz)?,
                    vaddr,
                    executable: flags & PF_X != 0,
                    writable: flags & PF_W != 0,
                }),
                PT_DYNAMIC => file.dynamic = Some(span(offset, filesz)?),
                PT_INTERP => file.interp = Some(span(offset, filesz)?),
                _ => {}
            }
        }
        Ok(file)
    }

    /// The file offset of virtual address `vaddr`, through the loadable
    /// segment that maps it from the file.
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.segments.iter().find_map(|s| {
            let len = s.file.end - s.file.start;
            let rel = vaddr.checked_sub(s.vaddr)?;
            (rel < len).then(|| s.file.start + rel)
        })
    }

    /// Reads the dynamic section's bytes (`dynamic`, the file bytes of
    /// [`ElfFile::dynamic`]): the needed libraries, the string table and the
    /// search path. Stops at `DT_NULL`, the end of the bytes, or after
    /// [`MAX_DYNAMIC_ENTRIES`].
    pub fn dynamic_info(&self, dynamic: &[u8]) -> Result<DynamicInfo, ElfError> {
        let r = Reader {
            bytes: dynamic,
            little: self.little_endian,
        };
        let entry = if self.is_64 { 16 } else { 8 };
        let half = entry / 2;
        let mut info = DynamicInfo::default();
        let (mut runpath, mut rpath) = (None, None);
        for i in 0..MAX_DYNAMIC_ENTRIES as u64 {
            let at = i * entry;
            if at + entry > dynamic.len() as u64 {
                break;
            }
            let tag = r.word(self.is_64, at)?;
            let val = r.word(self.is_64, at + half)?;
            match tag {
                DT_NULL => break,
                DT_NEEDED if info.needed.len() < MAX_NEEDED => info.needed.push(val),
                DT_STRTAB => info.strtab = Some(val),
                DT_STRSZ => info.strsz = Some(val),
                DT_RUNPATH => runpath = Some(val),
                DT_RPATH => rpath = Some(val),
                _ => {}
            }
        }
        // The loader ignores DT_RPATH when DT_RUNPATH is present.
        info.search_path = runpath.or(rpath);
        Ok(info)
    }
}

/// Checks the identification bytes; the reader and whether the file is ELF64.
fn ident(head: &[u8]) -> Result<(Reader<'_>, bool), ElfError> {
    if !ElfFile::has_magic(head) {
        return Err(ElfError::NotElf);
    }
    let is_64 = match head.get(4) {
        Some(1) => false,
        Some(2) => true,
        _ => return Err(ElfError::NotElf),
    };
    let little = match head.get(5) {
        Some(1) => true,
        Some(2) => false,
        _ => return Err(ElfError::NotElf),
    };
    let min = if is_64 { 64 } else { 52 };
    if head.len() < min {
        return Err(ElfError::NeedMore(min as u64));
    }
    Ok((
        Reader {
            bytes: head,
            little,
        },
        is_64,
    ))
}

/// `(e_phoff, e_phentsize, e_phnum)`, checked against the class's header size
/// and [`MAX_PROGRAM_HEADERS`].
fn program_header_table(r: Reader<'_>, is_64: bool) -> Result<(u64, u16, u16), ElfError> {
    let (phoff, phentsize, phnum) = if is_64 {
        (r.u64(32)?, r.u16(54)?, r.u16(56)?)
    } else {
        (u64::from(r.u32(28)?), r.u16(42)?, r.u16(44)?)
    };
    let min_entry = if is_64 { 56 } else { 32 };
    if phnum == 0 {
        return Err(ElfError::Malformed("no program headers"));
    }
    if usize::from(phnum) > MAX_PROGRAM_HEADERS {
        return Err(ElfError::Malformed("too many program headers"));
    }
    if phentsize < min_entry {
        return Err(ElfError::Malformed("program header entry too small"));
    }
    Ok((phoff, phentsize, phnum))
}

/// The NUL-terminated string at `offset` of `table` (bytes of a string table
/// read from that offset on are fine too: pass `offset` 0), without the NUL;
/// `None` when it is empty, unterminated within [`MAX_NAME_LEN`] or out of
/// range.
pub fn string_at(table: &[u8], offset: u64) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    let rest = table.get(start..)?;
    let rest = &rest[..rest.len().min(MAX_NAME_LEN + 1)];
    let end = rest.iter().position(|&b| b == 0)?;
    (end > 0).then(|| &rest[..end])
}

/// The Debian/Ubuntu multiarch triplet of an ELF machine, for library
/// directories such as `usr/lib/x86_64-linux-gnu`.
pub fn multiarch_triplet(machine: u16, is_64: bool) -> Option<&'static str> {
    Some(match (machine, is_64) {
        (62, true) => "x86_64-linux-gnu",
        (183, true) => "aarch64-linux-gnu",
        (3, false) => "i386-linux-gnu",
        (40, false) => "arm-linux-gnueabihf",
        (21, true) => "powerpc64le-linux-gnu",
        (22, true) => "s390x-linux-gnu",
        (243, true) => "riscv64-linux-gnu",
        _ => return None,
    })
}

/// Names [`file_names`] takes from one program's data, at most.
pub const MAX_FILE_NAMES: usize = 256;

/// A string of a program that may name a data file: an absolute path, or a
/// file name with an extension (`postgres.bki`, `pg_hba.conf.sample`), not a
/// shared library's.
fn is_file_name(s: &[u8]) -> bool {
    let plain = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'+');
    if s.first() == Some(&b'/') {
        return (6..=128).contains(&s.len())
            && s.iter().all(|b| plain(b) || *b == b'/')
            && !s.windows(2).any(|w| w == b"//" || w == b"/.")
            && s.last() != Some(&b'/');
    }
    if !(5..=64).contains(&s.len()) || !s.iter().all(plain) || !s[0].is_ascii_alphanumeric() {
        return false;
    }
    let Some(dot) = s.iter().rposition(|&b| b == b'.') else {
        return false;
    };
    let extension = &s[dot + 1..];
    let library = s.windows(4).any(|w| w == b".so.") || s.ends_with(b".so");
    dot > 0
        && (1..=8).contains(&extension.len())
        && extension.iter().all(u8::is_ascii_alphanumeric)
        && extension.iter().any(u8::is_ascii_alphabetic)
        && !library
}

/// The distinct strings of `data` (NUL-separated) that may name data files,
/// in order, at most [`MAX_FILE_NAMES`].
pub fn file_names(data: &[u8]) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = Vec::new();
    for s in data.split(|&b| b == 0) {
        if out.len() >= MAX_FILE_NAMES {
            break;
        }
        if is_file_name(s) && !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test binary itself: a dynamically linked ELF on every Linux host.
    fn own_binary() -> Vec<u8> {
        std::fs::read(std::env::current_exe().unwrap()).unwrap()
    }

    #[test]
    fn a_dynamically_linked_binary_names_its_interpreter_and_libraries() {
        let bytes = own_binary();
        let end = ElfFile::headers_end(&bytes).unwrap();
        let elf = ElfFile::parse(&bytes[..end as usize]).unwrap();
        assert!(elf.segments.iter().any(|s| s.executable));
        assert!(elf.segments.iter().any(|s| s.writable));
        let interp = elf.interp.clone().unwrap();
        let path = string_at(&bytes[interp.start as usize..interp.end as usize], 0).unwrap();
        assert!(
            path.starts_with(b"/"),
            "{:?}",
            String::from_utf8_lossy(path)
        );
        let dynamic = elf.dynamic.clone().unwrap();
        let info = elf
            .dynamic_info(&bytes[dynamic.start as usize..dynamic.end as usize])
            .unwrap();
        let strtab = elf.file_offset(info.strtab.unwrap()).unwrap() as usize;
        let names: Vec<String> = info
            .needed
            .iter()
            .map(|&o| String::from_utf8_lossy(string_at(&bytes[strtab..], o).unwrap()).into())
            .collect();
        assert!(names.iter().any(|n| n.starts_with("libc.so")), "{names:?}");
        assert_eq!(
            multiarch_triplet(elf.machine, elf.is_64).is_some(),
            cfg!(target_os = "linux")
        );
    }

    #[test]
    fn short_heads_ask_for_the_program_headers() {
        let bytes = own_binary();
        let end = ElfFile::headers_end(&bytes).unwrap();
        assert_eq!(
            ElfFile::parse(&bytes[..end as usize - 1]),
            Err(ElfError::NeedMore(end))
        );
        assert_eq!(ElfFile::parse(&bytes[..20]), Err(ElfError::NeedMore(64)));
        assert_eq!(ElfFile::parse(b"#!/bin/sh\n"), Err(ElfError::NotElf));
        assert_eq!(ElfFile::parse(b"\x7fELF\x03\x01"), Err(ElfError::NotElf));
    }

    #[test]
    fn hostile_headers_are_errors_not_panics() {
        let mut head = own_binary()[..64].to_vec();
        // e_phnum = 0xffff.
        head[56] = 0xff;
        head[57] = 0xff;
        assert_eq!(
            ElfFile::parse(&head),
            Err(ElfError::Malformed("too many program headers"))
        );
        // e_phoff near u64::MAX.
        let mut head = own_binary()[..64].to_vec();
        head[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(ElfFile::parse(&head).is_err());
        // A PT_LOAD whose end overflows.
        let mut bytes = own_binary();
        let end = ElfFile::headers_end(&bytes).unwrap() as usize;
        let phoff = u64::from_le_bytes(bytes[32..40].try_into().unwrap()) as usize;
        bytes[phoff..phoff + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        bytes[phoff + 8..phoff + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        bytes[phoff + 32..phoff + 40].copy_from_slice(&2u64.to_le_bytes());
        assert_eq!(
            ElfFile::parse(&bytes[..end]),
            Err(ElfError::Malformed("segment end overflows"))
        );
    }

    #[test]
    fn dynamic_sections_are_bounded() {
        let elf = ElfFile {
            is_64: true,
            little_endian: true,
            machine: 62,
            interp: None,
            segments: vec![],
            dynamic: None,
        };
        // Many DT_NEEDED, no DT_NULL, a trailing partial entry.
        let mut d = Vec::new();
        for i in 0..1000u64 {
            d.extend_from_slice(&DT_NEEDED.to_le_bytes());
            d.extend_from_slice(&i.to_le_bytes());
        }
        d.extend_from_slice(&[1, 2, 3]);
        let info = elf.dynamic_info(&d).unwrap();
        assert_eq!(info.needed.len(), MAX_NEEDED);
        // RUNPATH wins over RPATH.
        let mut d = Vec::new();
        for (t, v) in [
            (DT_RPATH, 7u64),
            (DT_RUNPATH, 9),
            (DT_NULL, 0),
            (DT_NEEDED, 1),
        ] {
            d.extend_from_slice(&t.to_le_bytes());
            d.extend_from_slice(&v.to_le_bytes());
        }
        let info = elf.dynamic_info(&d).unwrap();
        assert_eq!(info.search_path, Some(9));
        assert!(info.needed.is_empty(), "entries after DT_NULL are ignored");
    }

    #[test]
    fn strings_are_bounded_and_terminated() {
        assert_eq!(string_at(b"\0libc.so.6\0", 1), Some(&b"libc.so.6"[..]));
        assert_eq!(string_at(b"\0libc", 1), None);
        assert_eq!(string_at(b"\0", 0), None);
        assert_eq!(string_at(b"abc\0", u64::MAX), None);
        let long = vec![b'a'; MAX_NAME_LEN + 10];
        assert_eq!(string_at(&long, 0), None);
    }

    #[test]
    fn names_of_data_files() {
        let data = b"\0postgres.bki\0%s/%s\0pg_hba.conf.sample\0libpq.so.5\0libc.so\0\
            /etc/ssl/openssl.cnf\0could not open file \"%s\"\0x.y\0.hidden.conf\0\
            postgres.bki\0v1.2.3\0/usr/../etc/passwd\0/tmp/\0information_schema.sql";
        let names: Vec<&str> = file_names(data)
            .into_iter()
            .map(|n| std::str::from_utf8(n).unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "postgres.bki",
                "pg_hba.conf.sample",
                "/etc/ssl/openssl.cnf",
                "information_schema.sql"
            ]
        );
    }

    #[test]
    fn names_are_bounded() {
        let mut data = Vec::new();
        for i in 0..10_000 {
            data.extend(format!("file{i}.dat\0").as_bytes());
        }
        assert_eq!(file_names(&data).len(), MAX_FILE_NAMES);
        assert!(file_names(&[0xff; 1000]).is_empty());
        assert!(file_names(b"").is_empty());
    }
}
