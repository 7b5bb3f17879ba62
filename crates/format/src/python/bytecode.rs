//! The imports a compiled module performs, read from its code: the module's
//! `marshal` data is walked object by object, and each code object's
//! instructions are decoded for `IMPORT_NAME` and `IMPORT_FROM`, whose
//! arguments index the code object's names.
//!
//! Why decode rather than take every identifier: a module's names include
//! every attribute and global it uses, and many match a module's file
//! (`copy`, `types`, `select`); fetching those, and what they import in turn,
//! cost python-imports half again its working set. The code says which names
//! are imported, and whether at import time (the module's own code and class
//! bodies, which run when the module is imported) or in a function (run when
//! called, perhaps never).
//!
//! Versions: Python 3.6 to 3.14 (wordcode). The pyc header's magic number
//! selects the code object's layout and the opcode numbers; an unknown magic,
//! a truncated or malformed stream gives `None`, and the caller falls back to
//! the identifier scan. Bounded: one pass over the bytes, nesting at most
//! [`MAX_NESTING`] objects deep, every length checked against the data.

use std::ops::Range;

/// Objects nested deeper than this are taken for hostile input (real code
/// nests a few dozen at most; CPython's own limit is 2000).
const MAX_NESTING: u32 = 100;

/// `marshal`'s flag on a type code: the object is entered in the reference
/// table, for later `TYPE_REF`s to it.
const FLAG_REF: u8 = 0x80;

/// A code object's flag of functions (a new locals dictionary), clear for a
/// module's code and class bodies.
const CO_NEWLOCALS: u32 = 0x2;

/// Import instructions taken from one module, at most (a real module has a
/// few hundred; the bound keeps hostile code from making millions of names).
const MAX_IMPORTS: usize = 4096;

/// One import a compiled module's code performs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct CodeImport {
    /// The dotted name (`IMPORT_NAME`'s), or the package's name joined with
    /// an `IMPORT_FROM`'s (`from email import parser` gives `email.parser`;
    /// a relative `from . import x` gives `x`).
    pub name: String,
    /// In a function's code: imported when the function is called.
    pub in_function: bool,
}

/// What differs between the versions: the header's length, the code
/// object's layout and the opcodes looked for.
#[derive(Clone, Copy, Debug)]
struct Layout {
    header: usize,
    /// 32-bit fields before the code (the flags last).
    ints_before_code: usize,
    /// Objects between the names and the first line number.
    objects_after_names: usize,
    /// Objects after the first line number.
    objects_after_line: usize,
    import_name: u8,
    import_from: u8,
    extended_arg: u8,
}

impl Layout {
    /// The layout of the Python 3 version whose pyc files begin with `magic`.
    fn of_magic(magic: u16) -> Option<Layout> {
        let minor = match magic {
            3360..=3379 => 6,
            3390..=3399 => 7,
            3400..=3419 => 8,
            3420..=3429 => 9,
            3430..=3449 => 10,
            3450..=3499 => 11,
            3500..=3549 => 12,
            3550..=3599 => 13,
            3600..=3649 => 14,
            _ => return None,
        };
        let (import_name, import_from, extended_arg) = match minor {
            ..=12 => (108, 109, 144),
            13 => (75, 74, 71),
            _ => (73, 72, 69),
        };
        let (ints_before_code, objects_after_names, objects_after_line) = match minor {
            // argcount, kwonlyargcount, nlocals, stacksize, flags; varnames,
            // freevars, cellvars, filename, name; lnotab.
            6 | 7 => (5, 5, 1),
            // posonlyargcount added.
            8..=10 => (6, 5, 1),
            // argcount, posonlyargcount, kwonlyargcount, stacksize, flags;
            // localsplusnames, localspluskinds, filename, name, qualname;
            // linetable, exceptiontable.
            _ => (5, 5, 2),
        };
        Some(Layout {
            header: if minor >= 7 { 16 } else { 12 },
            ints_before_code,
            objects_after_names,
            objects_after_line,
            import_name,
            import_from,
            extended_arg,
        })
    }
}

/// The imports of the compiled module `data` (a whole pyc file): the
/// module's own code's first, then those of the code objects it holds
/// (classes' bodies, functions) in the order they appear; `None` when the
/// data is not a complete pyc of a known version.
pub(super) fn code_imports(data: &[u8]) -> Option<Vec<CodeImport>> {
    let magic = u16::from_le_bytes([*data.first()?, *data.get(1)?]);
    if data.get(2..4)? != b"\r\n" {
        return None;
    }
    let layout = Layout::of_magic(magic)?;
    let mut reader = Reader {
        data,
        pos: layout.header,
        layout,
        refs: Vec::new(),
        tuples: Vec::new(),
        codes: 0,
        imports: 0,
        found: Vec::new(),
    };
    reader.object(0)?;
    // Pre-order: the module's code, then what it contains in order.
    reader.found.sort_by_key(|(order, _)| *order);
    Some(reader.found.into_iter().flat_map(|(_, i)| i).collect())
}

/// A decoded object, as far as imports need it.
#[derive(Clone, Debug)]
enum Value {
    /// `NULL`: the end of a dict.
    Null,
    /// A string or bytes object: its bytes in the data.
    Bytes(Range<usize>),
    /// A tuple, list or set: its index in `Reader::tuples`.
    Tuple(usize),
    /// Anything else.
    Other,
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    layout: Layout,
    /// The reference table, in the order objects were flagged (a container
    /// takes its slot before its contents, as the writer numbered them).
    refs: Vec<Value>,
    /// The string elements of each tuple read.
    tuples: Vec<Vec<Option<Range<usize>>>>,
    /// Code objects begun so far.
    codes: usize,
    /// Imports found so far.
    imports: usize,
    /// Imports of each code object, with its pre-order number.
    found: Vec<(usize, Vec<CodeImport>)>,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<Range<usize>> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len())?;
        let range = self.pos..end;
        self.pos = end;
        Some(range)
    }

    fn byte(&mut self) -> Option<u8> {
        let b = *self.data.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn u32(&mut self) -> Option<u32> {
        let r = self.take(4)?;
        Some(u32::from_le_bytes(self.data[r].try_into().ok()?))
    }

    fn object(&mut self, depth: u32) -> Option<Value> {
        if depth > MAX_NESTING {
            return None;
        }
        let code = self.byte()?;
        let (kind, flagged) = (code & !FLAG_REF, code & FLAG_REF != 0);
        // Singletons and references never take a slot.
        let slot = (flagged && !b"0NFTS.r".contains(&kind)).then(|| {
            self.refs.push(Value::Other);
            self.refs.len() - 1
        });
        let value = match kind {
            b'0' => Value::Null,
            b'N' | b'F' | b'T' | b'S' | b'.' => Value::Other,
            b'i' => self.skip(4)?,
            b'I' | b'g' => self.skip(8)?,
            b'y' => self.skip(16)?,
            b'f' => {
                let n = self.byte()?;
                self.skip(usize::from(n))?
            }
            b'x' => {
                for _ in 0..2 {
                    let n = self.byte()?;
                    self.take(usize::from(n))?;
                }
                Value::Other
            }
            b'l' => {
                // Digit count, negative for a negative number; 15-bit digits.
                let n = self.u32()? as i32;
                self.skip((n.unsigned_abs() as usize).checked_mul(2)?)?
            }
            b's' | b't' | b'u' | b'a' | b'A' => {
                let n = self.u32()? as usize;
                Value::Bytes(self.take(n)?)
            }
            b'z' | b'Z' => {
                let n = self.byte()?;
                Value::Bytes(self.take(usize::from(n))?)
            }
            b'r' => {
                let index = self.u32()? as usize;
                self.refs.get(index)?.clone()
            }
            b'(' | b'[' | b'<' | b'>' => {
                let n = self.u32()? as usize;
                self.sequence(n, depth)?
            }
            b')' => {
                let n = self.byte()?;
                self.sequence(usize::from(n), depth)?
            }
            b'{' => {
                // Key and value pairs up to a NULL key; each pair takes at
                // least two bytes, so the data bounds the loop.
                while !matches!(self.object(depth + 1)?, Value::Null) {
                    self.object(depth + 1)?;
                }
                Value::Other
            }
            // A slice (3.14 constants).
            b':' => {
                for _ in 0..3 {
                    self.object(depth + 1)?;
                }
                Value::Other
            }
            b'c' => self.code(depth)?,
            _ => return None,
        };
        if let Some(slot) = slot {
            self.refs[slot] = value.clone();
        }
        Some(value)
    }

    fn skip(&mut self, n: usize) -> Option<Value> {
        self.take(n)?;
        Some(Value::Other)
    }

    /// `n` objects of a tuple, list or set (each at least a byte: the data
    /// bounds `n`).
    fn sequence(&mut self, n: usize, depth: u32) -> Option<Value> {
        let mut strings = Vec::new();
        for _ in 0..n {
            strings.push(match self.object(depth + 1)? {
                Value::Bytes(r) => Some(r),
                _ => None,
            });
        }
        self.tuples.push(strings);
        Some(Value::Tuple(self.tuples.len() - 1))
    }

    fn code(&mut self, depth: u32) -> Option<Value> {
        let order = self.codes;
        self.codes += 1;
        let mut flags = 0;
        for _ in 0..self.layout.ints_before_code {
            flags = self.u32()?;
        }
        let Value::Bytes(code) = self.object(depth + 1)? else {
            return None;
        };
        // The constants hold the nested code objects.
        self.object(depth + 1)?;
        let Value::Tuple(names) = self.object(depth + 1)? else {
            return None;
        };
        for _ in 0..self.layout.objects_after_names {
            self.object(depth + 1)?;
        }
        self.u32()?; // first line number
        for _ in 0..self.layout.objects_after_line {
            self.object(depth + 1)?;
        }
        let imports = self.decode(code, names, flags & CO_NEWLOCALS != 0);
        if !imports.is_empty() {
            self.imports += imports.len();
            self.found.push((order, imports));
        }
        Some(Value::Other)
    }

    /// The imports of the instructions `code` (two bytes each: an opcode and
    /// its argument's low byte, `EXTENDED_ARG`s giving the higher ones).
    fn decode(&self, code: Range<usize>, names: usize, in_function: bool) -> Vec<CodeImport> {
        // Longer names are no module's: never copied or joined.
        let name_at = |index: u32| -> Option<&str> {
            let range = self.tuples[names].get(index as usize)?.clone()?;
            if range.len() > super::MAX_NAME_LEN {
                return None;
            }
            std::str::from_utf8(&self.data[range]).ok()
        };
        let mut imports = Vec::new();
        let mut package: Option<&str> = None;
        let mut extended = 0u32;
        for instruction in self.data[code].chunks_exact(2) {
            if self.imports + imports.len() >= MAX_IMPORTS {
                break;
            }
            let (op, arg) = (instruction[0], u32::from(instruction[1]));
            if op == self.layout.extended_arg {
                extended = (extended | arg) << 8;
                continue;
            }
            let arg = extended | arg;
            extended = 0;
            if op == self.layout.import_name {
                package = name_at(arg);
                if let Some(name) = package.filter(|n| !n.is_empty()) {
                    imports.push(CodeImport {
                        name: name.to_owned(),
                        in_function,
                    });
                }
            } else if op == self.layout.import_from {
                if let Some(name) = name_at(arg) {
                    let name = match package {
                        Some(p) if !p.is_empty() => format!("{p}.{name}"),
                        _ => name.to_owned(),
                    };
                    imports.push(CodeImport { name, in_function });
                }
            }
        }
        imports
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A `marshal` writer for the tests: enough to build the code objects of
    /// each version's layout.
    pub struct Pyc {
        pub bytes: Vec<u8>,
        layout: Layout,
    }

    impl Pyc {
        pub fn new(magic: u16) -> Pyc {
            let layout = Layout::of_magic(magic).expect("a known magic");
            let mut bytes = magic.to_le_bytes().to_vec();
            bytes.extend(b"\r\n");
            bytes.resize(layout.header, 0);
            Pyc { bytes, layout }
        }

        pub fn name(&mut self, s: &str) {
            self.bytes.extend([b'Z' | FLAG_REF, s.len() as u8]);
            self.bytes.extend(s.as_bytes());
        }

        /// A code object whose code is `ops` (opcode, argument) with
        /// `names`; `consts` written by `nested`.
        pub fn code(
            &mut self,
            function: bool,
            ops: &[(u8, u8)],
            names: &[&str],
            nested: impl FnOnce(&mut Pyc),
        ) {
            self.bytes.push(b'c' | FLAG_REF);
            for i in 0..self.layout.ints_before_code {
                let flags = if function { 3u32 } else { 0 };
                let v = if i + 1 == self.layout.ints_before_code {
                    flags
                } else {
                    0
                };
                self.bytes.extend(v.to_le_bytes());
            }
            self.bytes.push(b's');
            self.bytes.extend((ops.len() as u32 * 2).to_le_bytes());
            for &(op, arg) in ops {
                self.bytes.extend([op, arg]);
            }
            // Constants: None, then what `nested` writes, in a list.
            self.bytes.push(b'[');
            let at = self.bytes.len();
            self.bytes.extend(1u32.to_le_bytes());
            self.bytes.push(b'N');
            let before = self.bytes.len();
            nested(self);
            if self.bytes.len() > before {
                self.bytes[at..at + 4].copy_from_slice(&2u32.to_le_bytes());
            }
            self.bytes.push(b'(');
            self.bytes.extend((names.len() as u32).to_le_bytes());
            for n in names {
                self.name(n);
            }
            for _ in 0..self.layout.objects_after_names {
                self.bytes.extend([b')', 0]);
            }
            self.bytes.extend(1u32.to_le_bytes());
            for _ in 0..self.layout.objects_after_line {
                self.bytes.extend([b'y']);
                self.bytes.extend([0u8; 16]);
            }
        }

        pub fn ops(&self) -> (u8, u8, u8) {
            (
                self.layout.import_name,
                self.layout.import_from,
                self.layout.extended_arg,
            )
        }
    }

    fn names(imports: &[CodeImport]) -> Vec<(&str, bool)> {
        imports
            .iter()
            .map(|i| (i.name.as_str(), i.in_function))
            .collect()
    }

    #[test]
    fn every_version_layout_yields_its_imports_module_level_first() {
        // 3.6, 3.7, 3.10, 3.11, 3.12, 3.13, 3.14.
        for magic in [3379u16, 3394, 3439, 3495, 3531, 3571, 3627] {
            let mut pyc = Pyc::new(magic);
            let (name, from, ext) = pyc.ops();
            pyc.code(
                false,
                &[
                    (name, 0),
                    (1, 0),
                    (name, 1),
                    (from, 2),
                    (name, 3),
                    (from, 4),
                ],
                &["os", "email", "parser", "", "sibling"],
                |pyc| {
                    // A function: `import json` with an EXTENDED_ARG'd index.
                    let mut names = vec!["x"; 256];
                    names.push("json");
                    pyc.code(true, &[(ext, 1), (name, 0)], &names, |_| {});
                },
            );
            let imports = code_imports(&pyc.bytes).unwrap_or_else(|| panic!("magic {magic}"));
            assert_eq!(
                names(&imports),
                [
                    ("os", false),
                    ("email", false),
                    ("email.parser", false),
                    ("sibling", false),
                    ("json", true)
                ],
                "magic {magic}"
            );
        }
    }

    #[test]
    fn references_to_earlier_strings_and_tuples_resolve() {
        let mut pyc = Pyc::new(3495);
        let (name, ..) = pyc.ops();
        // Names: a tuple of a reference to the string `os` that the code's
        // constants flagged first.
        pyc.bytes.push(b'c' | FLAG_REF);
        pyc.bytes.extend([0u8; 20]);
        pyc.bytes.push(b's');
        pyc.bytes.extend(2u32.to_le_bytes());
        pyc.bytes.extend([name, 0]);
        pyc.bytes.extend([b')', 1]);
        pyc.name("os"); // ref 1 (the code object is 0)
        pyc.bytes.extend([b')', 1, b'r', 1, 0, 0, 0]);
        for _ in 0..5 {
            pyc.bytes.extend([b')', 0]);
        }
        pyc.bytes.extend([0u8; 4]);
        pyc.bytes.extend([b'N', b'N']);
        let imports = code_imports(&pyc.bytes).unwrap();
        assert_eq!(names(&imports), [("os", false)]);
    }

    #[test]
    fn unknown_truncated_or_malformed_data_gives_none() {
        let mut pyc = Pyc::new(3495);
        let (name, ..) = pyc.ops();
        pyc.code(false, &[(name, 0)], &["os"], |_| {});
        assert!(code_imports(&pyc.bytes).is_some());
        for cut in 0..pyc.bytes.len() {
            assert_eq!(code_imports(&pyc.bytes[..cut]), None, "cut at {cut}");
        }
        let mut unknown = pyc.bytes.clone();
        unknown[..2].copy_from_slice(&3700u16.to_le_bytes());
        assert_eq!(code_imports(&unknown), None);
        // A reference past the table, nesting without end.
        let mut bad = pyc.bytes[..16].to_vec();
        bad.extend([b'r', 9, 0, 0, 0]);
        assert_eq!(code_imports(&bad), None);
        let mut deep = pyc.bytes[..16].to_vec();
        deep.extend(std::iter::repeat_n([b')', 1], 10_000).flatten());
        assert_eq!(code_imports(&deep), None);
        // A name longer than any module's is not taken; a flood of imports
        // is cut at the bound.
        let mut pyc = Pyc::new(3495);
        let long = "a".repeat(200);
        pyc.code(false, &[(name, 0), (name, 1)], &[&long, "os"], |_| {});
        let imports = code_imports(&pyc.bytes).unwrap();
        assert_eq!(names(&imports), [("os", false)]);
        let mut pyc = Pyc::new(3495);
        pyc.code(false, &vec![(name, 0); 10_000], &["os"], |_| {});
        assert_eq!(code_imports(&pyc.bytes).unwrap().len(), MAX_IMPORTS);
        // An index past the names: nothing taken, no panic.
        let mut pyc = Pyc::new(3495);
        pyc.code(false, &[(name, 7)], &["os"], |_| {});
        assert_eq!(code_imports(&pyc.bytes), Some(vec![]));
    }
}
