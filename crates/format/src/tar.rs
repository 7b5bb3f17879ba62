//! A minimal streaming tar header parser for the writer.
//!
//! It keeps every raw byte it consumes (header blocks, PAX and GNU long-name
//! extension records, padding) so the writer can re-emit them unchanged: the
//! converted blob must decompress to a tar byte-identical to its input. It
//! interprets ustar, PAX (`x`; `g` is kept but not applied) and GNU (`L`, `K`,
//! base-256 numbers) headers, following what Go's `archive/tar` does where
//! formats disagree, since podman's tar-split consumers use it.

use super::error::FormatError;
use super::index::Timestamp;
use super::Result;

pub(crate) const BLOCK: usize = 512;
/// Largest PAX or GNU long-name extension record accepted (bounds memory).
const MAX_EXTENSION: u64 = 1 << 20;

/// The meaning of one logical tar entry (after applying its extension headers).
#[derive(Debug, Default, Clone)]
pub(crate) struct Header {
    pub kind: Kind,
    pub name: String,
    pub link_name: String,
    pub mode: u64,
    pub uid: u64,
    pub gid: u64,
    pub uname: String,
    pub gname: String,
    /// Payload bytes that follow the header (0 for header-only types).
    pub size: u64,
    pub mtime: Timestamp,
    pub atime: Option<Timestamp>,
    pub ctime: Option<Timestamp>,
    pub dev_major: u64,
    pub dev_minor: u64,
    /// PAX `SCHILY.xattr.*` records in archive order.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Input offset of the entry's first header block (for messages).
    pub offset: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    #[default]
    Reg,
    HardLink,
    Symlink,
    Char,
    Block,
    Dir,
    Fifo,
}

impl Kind {
    pub fn toc_type(self) -> &'static str {
        match self {
            Kind::Reg => "reg",
            Kind::HardLink => "hardlink",
            Kind::Symlink => "symlink",
            Kind::Char => "char",
            Kind::Block => "block",
            Kind::Dir => "dir",
            Kind::Fifo => "fifo",
        }
    }
}

/// Extension values pending for the next real header.
#[derive(Default)]
struct Pending {
    pax: Vec<(String, Vec<u8>)>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

/// Where the parser gets blocks from: the writer's buffered input.
pub(crate) trait BlockSource {
    /// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean EOF before the first
    /// byte; an error on a partial read.
    fn read_exact_or_eof(&mut self, buf: &mut [u8]) -> Result<bool>;
    /// Current input offset.
    fn offset(&self) -> u64;
}

fn bad(offset: u64, reason: impl Into<String>) -> FormatError {
    FormatError::InvalidTar {
        offset,
        reason: reason.into(),
    }
}

/// Parses the next entry's headers, appending every consumed byte to `raw`.
/// Returns `None` at the end-of-archive marker (the zero block is appended to
/// `raw`) or at a clean EOF on a block boundary.
pub(crate) fn next_header(src: &mut impl BlockSource, raw: &mut Vec<u8>) -> Result<Option<Header>> {
    let mut pending = Pending::default();
    let start = src.offset();
    loop {
        let at = src.offset();
        let mut block = [0u8; BLOCK];
        if !src.read_exact_or_eof(&mut block)? {
            if pending.pax.is_empty() && pending.long_name.is_none() && pending.long_link.is_none()
            {
                return Ok(None);
            }
            return Err(bad(at, "archive ends after an extension header"));
        }
        raw.extend_from_slice(&block);
        if block.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        verify_checksum(&block, at)?;
        let typeflag = block[156];
        let size = parse_number(&block[124..136]).ok_or_else(|| bad(at, "invalid size field"))?;
        match typeflag {
            b'x' | b'g' | b'L' | b'K' => {
                if size > MAX_EXTENSION {
                    return Err(bad(
                        at,
                        format!("extension header of {size} bytes (limit {MAX_EXTENSION})"),
                    ));
                }
                let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
                let data_start = raw.len();
                raw.resize(data_start + padded as usize, 0);
                if !src.read_exact_or_eof(&mut raw[data_start..])? {
                    return Err(bad(at, "archive ends inside an extension header"));
                }
                let data = &raw[data_start..data_start + size as usize];
                match typeflag {
                    b'x' => pending.pax = parse_pax(data, at)?,
                    // Global PAX headers are kept verbatim but not applied (podman
                    // refuses them outright; applying them is not needed for layers).
                    b'g' => {}
                    b'L' => pending.long_name = Some(cstr(data).to_vec()),
                    _ => pending.long_link = Some(cstr(data).to_vec()),
                }
                continue;
            }
            _ => return build_header(&block, typeflag, size, pending, start).map(Some),
        }
    }
}

fn build_header(
    block: &[u8; BLOCK],
    typeflag: u8,
    size: u64,
    p: Pending,
    offset: u64,
) -> Result<Header> {
    let err = |r: &str| bad(offset, r.to_owned());
    let magic = &block[257..265];
    let ustar = &magic[..6] == b"ustar\0";
    let gnu = magic == b"ustar  \0";
    let num = |r: std::ops::Range<usize>, what: &str| {
        parse_number(&block[r]).ok_or_else(|| bad(offset, format!("invalid {what} field")))
    };
    let mut h = Header {
        offset,
        mode: num(100..108, "mode")?,
        uid: num(108..116, "uid")?,
        gid: num(116..124, "gid")?,
        ..Header::default()
    };
    let mtime = parse_signed(&block[136..148]).ok_or_else(|| err("invalid mtime field"))?;
    h.mtime = Timestamp {
        secs: mtime,
        nanos: 0,
    };
    let mut name = cstr(&block[0..100]).to_vec();
    if ustar {
        let prefix = cstr(&block[345..500]);
        if !prefix.is_empty() {
            let mut full = prefix.to_vec();
            full.push(b'/');
            full.extend_from_slice(&name);
            name = full;
        }
    }
    let mut link = cstr(&block[157..257]).to_vec();
    if ustar || gnu {
        h.uname = utf8(cstr(&block[265..297]), offset, "user name")?;
        h.gname = utf8(cstr(&block[297..329]), offset, "group name")?;
        h.dev_major = num(329..337, "devmajor")?;
        h.dev_minor = num(337..345, "devminor")?;
    }
    if gnu {
        let a = parse_signed(&block[345..357]).unwrap_or(0);
        let c = parse_signed(&block[357..369]).unwrap_or(0);
        if a != 0 {
            h.atime = Some(Timestamp { secs: a, nanos: 0 });
        }
        if c != 0 {
            h.ctime = Some(Timestamp { secs: c, nanos: 0 });
        }
    }
    if let Some(n) = p.long_name {
        name = n;
    }
    if let Some(l) = p.long_link {
        link = l;
    }
    let mut payload = size;
    for (k, v) in p.pax {
        let text = || utf8(&v, offset, &k);
        let number = || -> Result<u64> {
            text()?
                .parse::<u64>()
                .map_err(|_| bad(offset, format!("invalid PAX {k} value")))
        };
        match k.as_str() {
            "path" => name = v,
            "linkpath" => link = v,
            "size" => payload = number()?,
            "uid" => h.uid = number()?,
            "gid" => h.gid = number()?,
            "uname" => h.uname = text()?,
            "gname" => h.gname = text()?,
            "mtime" => {
                h.mtime = parse_pax_time(&text()?).ok_or_else(|| err("invalid PAX mtime"))?
            }
            "atime" => {
                h.atime = Some(parse_pax_time(&text()?).ok_or_else(|| err("invalid PAX atime"))?)
            }
            "ctime" => {
                h.ctime = Some(parse_pax_time(&text()?).ok_or_else(|| err("invalid PAX ctime"))?)
            }
            _ => {
                if let Some(x) = k.strip_prefix("SCHILY.xattr.") {
                    h.xattrs.push((x.to_owned(), v));
                } else if k.starts_with("GNU.sparse.") {
                    return Err(err("GNU sparse files are not supported"));
                }
            }
        }
    }
    h.name = utf8(&name, offset, "name")?;
    h.link_name = utf8(&link, offset, "link name")?;
    h.kind = match typeflag {
        b'0' | b'7' => Kind::Reg,
        // Old-style regular file; a trailing slash made it a directory (as Go reads it).
        0 if h.name.ends_with('/') => Kind::Dir,
        0 => Kind::Reg,
        b'1' => Kind::HardLink,
        b'2' => Kind::Symlink,
        b'3' => Kind::Char,
        b'4' => Kind::Block,
        b'5' => Kind::Dir,
        b'6' => Kind::Fifo,
        b'S' => return Err(err("GNU sparse files are not supported")),
        t => {
            return Err(bad(
                offset,
                format!(
                    "unsupported entry type {:?}",
                    char::from(t).escape_default().to_string()
                ),
            ))
        }
    };
    h.size = if h.kind == Kind::Reg { payload } else { 0 };
    Ok(h)
}

fn utf8(b: &[u8], offset: u64, what: &str) -> Result<String> {
    String::from_utf8(b.to_vec()).map_err(|_| {
        bad(
            offset,
            format!("{what} is not UTF-8 (the TOC cannot represent it)"),
        )
    })
}

fn cstr(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(i) => &b[..i],
        None => b,
    }
}

fn verify_checksum(block: &[u8; BLOCK], at: u64) -> Result<()> {
    let stored = parse_number(&block[148..156]).ok_or_else(|| bad(at, "invalid checksum field"))?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    if stored == unsigned || stored as i64 == signed {
        Ok(())
    } else {
        Err(bad(
            at,
            "header checksum mismatch (not a tar archive, or corrupt)",
        ))
    }
}

/// Parses an octal (space/NUL padded) or GNU base-256 unsigned field.
pub(crate) fn parse_number(field: &[u8]) -> Option<u64> {
    let v = parse_signed(field)?;
    u64::try_from(v).ok()
}

fn parse_signed(field: &[u8]) -> Option<i64> {
    if let Some(&first) = field.first() {
        if first & 0x80 != 0 {
            // GNU base-256: big-endian two's complement below a marker bit.
            let inv: u8 = if first & 0x40 != 0 { 0xff } else { 0 };
            let mut x: u64 = 0;
            for (i, &b) in field.iter().enumerate() {
                let mut c = b ^ inv;
                if i == 0 {
                    c &= 0x7f;
                }
                if x >> 56 > 0 {
                    return None;
                }
                x = (x << 8) | u64::from(c);
            }
            if x >> 63 > 0 {
                return None;
            }
            let x = x as i64;
            return Some(if inv == 0xff { !x } else { x });
        }
    }
    let s: &[u8] = {
        let start = field
            .iter()
            .position(|&b| b != b' ' && b != 0)
            .unwrap_or(field.len());
        let rest = &field[start..];
        let end = rest
            .iter()
            .position(|&b| b == b' ' || b == 0)
            .unwrap_or(rest.len());
        // Nothing but padding may follow the digits.
        if rest[end..].iter().any(|&b| b != b' ' && b != 0) {
            return None;
        }
        &rest[..end]
    };
    if s.is_empty() {
        return Some(0);
    }
    let mut v: i64 = 0;
    for &c in s {
        if !(b'0'..=b'7').contains(&c) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add(i64::from(c - b'0'))?;
    }
    Some(v)
}

fn parse_pax(data: &[u8], at: u64) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| bad(at, "malformed PAX record"))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(at, "malformed PAX record length"))?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad(at, "malformed PAX record"));
        }
        let rec = &rest[sp + 1..len - 1];
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad(at, "PAX record without '='"))?;
        let key = std::str::from_utf8(&rec[..eq]).map_err(|_| bad(at, "PAX key is not UTF-8"))?;
        out.push((key.to_owned(), rec[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(out)
}

fn parse_pax_time(s: &str) -> Option<Timestamp> {
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (secs, frac) = match s.split_once('.') {
        Some((a, b)) => (a, b),
        None => (s, ""),
    };
    if secs.is_empty()
        || !secs.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: u32 = 0;
    for (i, c) in frac.bytes().take(9).enumerate() {
        nanos += u32::from(c - b'0') * 10u32.pow(8 - i as u32);
    }
    if !neg {
        return Some(Timestamp { secs, nanos });
    }
    if nanos == 0 {
        Some(Timestamp {
            secs: -secs,
            nanos: 0,
        })
    } else {
        Some(Timestamp {
            secs: -secs - 1,
            nanos: 1_000_000_000 - nanos,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_number(b"0000644\0"), Some(0o644));
        assert_eq!(parse_number(b"  644 \0\0"), Some(0o644));
        assert_eq!(parse_number(b"\0\0\0\0"), Some(0));
        assert_eq!(parse_number(b"0009\0"), None);
        assert_eq!(parse_number(b"12 3"), None);
        let mut b256 = [0u8; 12];
        b256[0] = 0x80;
        b256[11] = 0x01;
        b256[10] = 0x02;
        assert_eq!(parse_number(&b256), Some(0x0201));
        let neg = [0xffu8; 8];
        assert_eq!(parse_signed(&neg), Some(-1));
        assert_eq!(parse_number(&neg), None);
    }

    #[test]
    fn pax_records_and_times() {
        let recs = parse_pax(b"19 path=a/long/nam\n21 SCHILY.xattr.x=\x00\x01\n", 0).unwrap();
        assert_eq!(recs[0], ("path".to_string(), b"a/long/nam".to_vec()));
        assert_eq!(recs[1], ("SCHILY.xattr.x".to_string(), vec![0, 1]));
        assert!(parse_pax(b"99 path=x\n", 0).is_err());
        assert!(parse_pax(b"x path=x\n", 0).is_err());
        assert_eq!(
            parse_pax_time("1.5"),
            Some(Timestamp {
                secs: 1,
                nanos: 500_000_000
            })
        );
        assert_eq!(
            parse_pax_time("-1.25"),
            Some(Timestamp {
                secs: -2,
                nanos: 750_000_000
            })
        );
        assert_eq!(parse_pax_time("12"), Some(Timestamp { secs: 12, nanos: 0 }));
        assert_eq!(parse_pax_time("1.x"), None);
    }
}
