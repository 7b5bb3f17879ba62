//! Reordering a layer's tar so that chosen files come first, for startup profiles:
//! the entries are the same, byte for byte, only in another order.
//!
//! Invariants: only regular files and directories move, and only earlier, so every
//! hard link still follows its target; the archive is read in bounded blocks and
//! every entry is checked to lie inside it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::Path;

use crate::tar::{next_header, BlockSource, Kind, BLOCK};
use crate::{FormatError, Result};

/// A tar being read with some files moved to the front: a [`Read`] of the
/// reordered archive, and what moved.
pub struct ReorderedTar {
    /// The moved files, in the order they now come (TOC path form).
    pub first: Vec<String>,
    /// Total size of the moved files' contents.
    pub first_bytes: u64,
    reader: RangesReader,
}

impl Read for ReorderedTar {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reader.read(buf)
    }
}

/// The tar at `path` (`len` bytes) with the regular files named in `first` (first
/// access first; unknown names and non-files are skipped) and the directories above
/// them moved to the front, every other entry following in its original order.
pub fn reorder_tar(path: &Path, len: u64, first: &[String]) -> Result<ReorderedTar> {
    let layout = scan_tar(path, len)?;
    let (order, moved, bytes) = plan_order(&layout.entries, first);
    let mut ranges: Vec<Range<u64>> = order
        .iter()
        .filter_map(|&i| layout.entries.get(i).map(|e| e.range.clone()))
        .collect();
    ranges.push(layout.trailer.clone());
    let file = File::open(path).map_err(|source| FormatError::Io {
        context: "opening the layer tar",
        source,
    })?;
    Ok(ReorderedTar {
        first: moved,
        first_bytes: bytes,
        reader: RangesReader {
            file,
            ranges: ranges.into_iter(),
            current: 0..0,
        },
    })
}

/// One tar entry's bytes (extension headers, header, payload and padding).
#[derive(Debug)]
struct Span {
    range: Range<u64>,
    name: String,
    kind: Kind,
    size: u64,
}

/// A tar's entries and where its end-of-archive marker starts.
#[derive(Debug)]
struct TarLayout {
    entries: Vec<Span>,
    trailer: Range<u64>,
}

/// Blocks of a tar file, read sequentially with payloads skipped.
struct FileBlocks {
    reader: BufReader<File>,
    offset: u64,
}

impl BlockSource for FileBlocks {
    fn read_exact_or_eof(&mut self, buf: &mut [u8]) -> Result<bool> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(FormatError::Io {
                        context: "reading the layer tar",
                        source,
                    })
                }
            }
        }
        if filled == 0 && !buf.is_empty() {
            return Ok(false);
        }
        if filled < buf.len() {
            return Err(FormatError::InvalidTar {
                offset: self.offset,
                reason: "archive truncated in the middle of a block".into(),
            });
        }
        self.offset += filled as u64;
        Ok(true)
    }

    fn offset(&self) -> u64 {
        self.offset
    }
}

/// A clean relative path, as the TOC names entries (`./a/b/` → `a/b`).
fn clean_name(name: &str) -> &str {
    let mut n = name;
    while let Some(rest) = n.strip_prefix("./") {
        n = rest;
    }
    n.trim_start_matches('/').trim_end_matches('/')
}

/// Finds every entry of the tar at `path` (`len` bytes).
fn scan_tar(path: &Path, len: u64) -> Result<TarLayout, FormatError> {
    let file = File::open(path).map_err(|source| FormatError::Io {
        context: "opening the layer tar",
        source,
    })?;
    let mut src = FileBlocks {
        reader: BufReader::with_capacity(1 << 20, file),
        offset: 0,
    };
    let mut entries = Vec::new();
    let mut raw = Vec::new();
    loop {
        let start = src.offset;
        raw.clear();
        let Some(h) = next_header(&mut src, &mut raw)? else {
            return Ok(TarLayout {
                entries,
                trailer: start..len.max(start),
            });
        };
        let padded = h.size.div_ceil(BLOCK as u64) * BLOCK as u64;
        let end = src.offset.checked_add(padded).filter(|&e| e <= len);
        let Some(end) = end else {
            return Err(FormatError::InvalidTar {
                offset: start,
                reason: format!("entry {:?} runs past the end of the archive", h.name),
            });
        };
        let skip = i64::try_from(padded).map_err(|_| FormatError::InvalidTar {
            offset: start,
            reason: "entry too large".into(),
        })?;
        src.reader
            .seek_relative(skip)
            .map_err(|source| FormatError::Io {
                context: "skipping a file in the layer tar",
                source,
            })?;
        src.offset = end;
        entries.push(Span {
            range: start..end,
            name: clean_name(&h.name).to_string(),
            kind: h.kind,
            size: h.size,
        });
    }
}

/// The order to emit entries in: for each recorded file (first access first),
/// the directories above it not yet emitted, then the file; then every other
/// entry in its original order. Returns the order, the moved files' names and
/// their total size. Only regular files and directories move, and only
/// earlier, so every hard link still follows its target.
fn plan_order(entries: &[Span], recorded: &[String]) -> (Vec<usize>, Vec<String>, u64) {
    let mut by_name: HashMap<&str, usize> = HashMap::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        by_name.entry(e.name.as_str()).or_insert(i);
    }
    let mut emitted = vec![false; entries.len()];
    let mut order = Vec::with_capacity(entries.len());
    let mut moved = Vec::new();
    let mut bytes = 0u64;
    for path in recorded {
        let path = clean_name(path);
        let Some(&i) = by_name.get(path) else {
            continue;
        };
        if emitted[i] || entries[i].kind != Kind::Reg {
            continue;
        }
        for (pos, _) in path.match_indices('/') {
            if let Some(&d) = by_name.get(&path[..pos]) {
                if !emitted[d] && entries[d].kind == Kind::Dir {
                    emitted[d] = true;
                    order.push(d);
                }
            }
        }
        emitted[i] = true;
        order.push(i);
        moved.push(entries[i].name.clone());
        bytes = bytes.saturating_add(entries[i].size);
    }
    order.extend((0..entries.len()).filter(|&i| !emitted[i]));
    (order, moved, bytes)
}

/// Reads byte ranges of a file one after another.
struct RangesReader {
    file: File,
    ranges: std::vec::IntoIter<Range<u64>>,
    current: Range<u64>,
}

impl Read for RangesReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.ranges.next() {
                Some(r) => {
                    self.file.seek(SeekFrom::Start(r.start))?;
                    self.current = r;
                }
                None => return Ok(0),
            }
        }
        let want = usize::try_from(self.current.end - self.current.start)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.file.read(&mut buf[..want])?;
        if n == 0 && want > 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "layer tar shrank while being rewritten",
            ));
        }
        self.current.start += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(name: &str, kind: Kind, i: u64) -> Span {
        Span {
            range: i * 1024..(i + 1) * 1024,
            name: name.into(),
            kind,
            size: 10,
        }
    }

    #[test]
    fn recorded_files_and_their_directories_move_first_links_stay_after() {
        let entries = vec![
            span("a", Kind::Dir, 0),
            span("a/x", Kind::Reg, 1),
            span("b", Kind::Dir, 2),
            span("b/c", Kind::Dir, 3),
            span("b/c/y", Kind::Reg, 4),
            span("b/c/link", Kind::HardLink, 5),
            span("z", Kind::Reg, 6),
        ];
        let recorded = vec![
            "b/c/y".to_string(),
            "missing".into(),
            "b/c/link".into(),
            "z".into(),
            "b/c/y".into(),
        ];
        let (order, moved, bytes) = plan_order(&entries, &recorded);
        assert_eq!(order, vec![2, 3, 4, 6, 0, 1, 5]);
        assert_eq!(moved, vec!["b/c/y".to_string(), "z".into()]);
        assert_eq!(bytes, 20);
        let pos = |i| order.iter().position(|&o| o == i).unwrap();
        assert!(pos(5) > pos(4), "the hard link follows its target");
    }

    #[test]
    fn names_are_cleaned_like_toc_paths() {
        assert_eq!(clean_name("./a/b/"), "a/b");
        assert_eq!(clean_name("././a"), "a");
        assert_eq!(clean_name("a"), "a");
        assert_eq!(clean_name("./"), "");
    }
}
