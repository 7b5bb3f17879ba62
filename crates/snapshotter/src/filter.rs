//! containerd filter expressions, as sent in `List` requests.
//!
//! Grammar (containerd's documented filter syntax):
//!
//! ```text
//! filter    := selector ("," selector)*          all selectors must match (AND)
//! selector  := fieldpath [operator value]        no operator: the field is present
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z0-9_]+
//! operator  := "==" | "!=" | "~="                 ~= is a regular expression match
//! value     := quoted | run of characters other than "," and white space
//! quoted    := "..." with Go escapes; a ~= value may also be quoted as /.../ or |...|
//! ```
//!
//! Several filter strings in one request are alternatives (OR); no filter at all
//! matches everything. The snapshot fields are `name`, `parent`, `kind` (`active`,
//! `view`, `committed`) and `labels.<key>` (a label key with dots or slashes is
//! written quoted: `labels."containerd.io/snapshot.ref"`). Unlike containerd, which
//! silently matches nothing, an unknown field or an invalid regular expression is an
//! error, so a typo in a filter is reported instead of listing nothing.
//!
//! Parsing is a single left-to-right pass over the input: its cost is linear in the
//! input length, and regular expressions are compiled with a size limit.

use std::collections::BTreeMap;

use regex::Regex;

use super::types::Kind;

/// Upper bound on a compiled regular expression, so that a hostile `~=` value cannot
/// make the service allocate without bound.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A parse error in a filter expression: the input, the byte position, and what was
/// expected there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid filter {input:?} at byte {position}: {message}")]
pub struct FilterError {
    /// The whole filter string.
    pub input: String,
    /// Byte offset of the problem in `input`.
    pub position: usize,
    /// What is wrong.
    pub message: String,
}

/// The fields of a snapshot that a filter can look at.
#[derive(Debug, Clone, Copy)]
pub struct FilterTarget<'a> {
    /// Snapshot name (key).
    pub name: &'a str,
    /// Parent name; `None` for a base snapshot.
    pub parent: Option<&'a str>,
    /// Snapshot kind.
    pub kind: Kind,
    /// Labels.
    pub labels: &'a BTreeMap<String, String>,
}

/// A parsed set of filters: the snapshot matches if any alternative matches.
#[derive(Debug, Clone)]
pub struct Filter {
    /// Each alternative is a conjunction of selectors. Empty: match everything.
    alternatives: Vec<Vec<Selector>>,
}

#[derive(Debug, Clone)]
enum Field {
    Name,
    Parent,
    Kind,
    Label(String),
}

#[derive(Debug, Clone)]
enum Operator {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug, Clone)]
struct Selector {
    field: Field,
    operator: Operator,
}

impl Filter {
    /// Parses the filter strings of one request (alternatives). An empty list, or a
    /// list of only empty strings, matches everything.
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<Self, FilterError> {
        let mut alternatives = Vec::with_capacity(filters.len());
        for filter in filters {
            let filter = filter.as_ref();
            if filter.trim().is_empty() {
                // containerd treats an empty filter as "match everything".
                return Ok(Filter {
                    alternatives: Vec::new(),
                });
            }
            alternatives.push(Parser::new(filter).selectors()?);
        }
        Ok(Filter { alternatives })
    }

    /// Whether the snapshot matches.
    pub fn matches(&self, target: &FilterTarget<'_>) -> bool {
        self.alternatives.is_empty()
            || self
                .alternatives
                .iter()
                .any(|all| all.iter().all(|selector| selector.matches(target)))
    }
}

impl Selector {
    fn matches(&self, target: &FilterTarget<'_>) -> bool {
        let value: Option<&str> = match &self.field {
            Field::Name => Some(target.name),
            // containerd reports a missing parent as the present, empty string, so
            // that `parent==""` selects base snapshots.
            Field::Parent => Some(target.parent.unwrap_or("")),
            Field::Kind => Some(target.kind.as_filter_str()),
            Field::Label(key) => target.labels.get(key).map(String::as_str),
        };
        match &self.operator {
            Operator::Present => value.is_some(),
            Operator::Equal(expected) => value == Some(expected.as_str()),
            Operator::NotEqual(expected) => value.unwrap_or("") != expected,
            Operator::Matches(re) => re.is_match(value.unwrap_or("")),
        }
    }
}

/// Recursive-descent parser over one filter string.
struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser { input, pos: 0 }
    }

    fn error(&self, position: usize, message: impl Into<String>) -> FilterError {
        FilterError {
            input: self.input.to_owned(),
            position,
            message: message.into(),
        }
    }

    fn rest(&self) -> &'a str {
        self.input.get(self.pos..).unwrap_or("")
    }

    fn skip_space(&mut self) {
        let rest = self.rest();
        let trimmed = rest.trim_start();
        self.pos += rest.len() - trimmed.len();
    }

    fn peek(&mut self) -> Option<char> {
        self.skip_space();
        self.rest().chars().next()
    }

    fn selectors(&mut self) -> Result<Vec<Selector>, FilterError> {
        let mut all = vec![self.selector()?];
        loop {
            match self.peek() {
                None => return Ok(all),
                Some(',') => {
                    self.pos += 1;
                    all.push(self.selector()?);
                }
                Some(c) => {
                    return Err(self.error(self.pos, format!("unexpected {c:?}, expected ','")))
                }
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        self.skip_space();
        let start = self.pos;
        let path = self.fieldpath()?;
        let field = self.resolve_field(start, path)?;
        let operator = match self.peek() {
            None | Some(',') => Operator::Present,
            Some('=' | '!' | '~') => {
                let op_pos = self.pos;
                let op: String = self
                    .rest()
                    .chars()
                    .take_while(|c| matches!(c, '=' | '!' | '~'))
                    .collect();
                self.pos += op.len();
                let is_regex = op == "~=";
                let value = self.value(is_regex)?;
                match op.as_str() {
                    "==" => Operator::Equal(value),
                    "!=" => Operator::NotEqual(value),
                    "~=" => Operator::Matches(
                        regex::RegexBuilder::new(&value)
                            .size_limit(REGEX_SIZE_LIMIT)
                            .build()
                            .map_err(|e| {
                                self.error(op_pos, format!("invalid regular expression: {e}"))
                            })?,
                    ),
                    _ => {
                        return Err(self.error(
                            op_pos,
                            format!("unsupported operator {op:?}, expected ==, != or ~="),
                        ))
                    }
                }
            }
            Some(c) => {
                return Err(self.error(
                    self.pos,
                    format!("unexpected {c:?}, expected an operator (==, != or ~=) or ','"),
                ))
            }
        };
        Ok(Selector { field, operator })
    }

    fn resolve_field(&self, position: usize, path: Vec<String>) -> Result<Field, FilterError> {
        let mut parts = path.into_iter();
        let head = parts.next().unwrap_or_default();
        let tail: Vec<String> = parts.collect();
        let simple = |field: Field| {
            if tail.is_empty() {
                Ok(field)
            } else {
                Err(self.error(position, format!("field {head:?} has no sub-fields")))
            }
        };
        match head.as_str() {
            "name" => simple(Field::Name),
            "parent" => simple(Field::Parent),
            "kind" => simple(Field::Kind),
            // The label key is the rest of the path joined with dots, so that
            // `labels.a.b` and `labels."a.b"` name the same label.
            "labels" => Ok(Field::Label(tail.join("."))),
            other => Err(self.error(
                position,
                format!("unknown field {other:?}; snapshot fields are name, parent, kind and labels.<key>"),
            )),
        }
    }

    fn fieldpath(&mut self) -> Result<Vec<String>, FilterError> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.pos += 1;
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> Result<String, FilterError> {
        match self.peek() {
            Some('"') => self.quoted('"'),
            Some(c) if is_field_char(c) => {
                let name: String = self
                    .rest()
                    .chars()
                    .take_while(|&c| is_field_char(c))
                    .collect();
                self.pos += name.len();
                Ok(name)
            }
            Some(c) => {
                Err(self.error(self.pos, format!("unexpected {c:?}, expected a field name")))
            }
            None => Err(self.error(self.pos, "unexpected end, expected a field name")),
        }
    }

    fn value(&mut self, allow_regex_quotes: bool) -> Result<String, FilterError> {
        match self.peek() {
            Some('"') => self.quoted('"'),
            Some(q @ ('/' | '|')) if allow_regex_quotes => self.quoted(q),
            Some(',') | None => Err(self.error(self.pos, "missing value after operator")),
            Some(_) => {
                let value: String = self
                    .rest()
                    .chars()
                    .take_while(|&c| c != ',' && !c.is_whitespace())
                    .collect();
                self.pos += value.len();
                Ok(value)
            }
        }
    }

    /// Reads a quoted string starting at the opening quote, decoding Go escapes.
    fn quoted(&mut self, quote: char) -> Result<String, FilterError> {
        let start = self.pos;
        let mut chars = self.rest().char_indices();
        chars.next(); // the opening quote
        let mut out = String::new();
        while let Some((offset, c)) = chars.next() {
            match c {
                c if c == quote => {
                    self.pos = start + offset + c.len_utf8();
                    return Ok(out);
                }
                '\n' => break,
                '\\' => {
                    let Some((esc_offset, esc)) = chars.next() else {
                        break;
                    };
                    let decoded = match esc {
                        'a' => '\u{7}',
                        'b' => '\u{8}',
                        'f' => '\u{c}',
                        'n' => '\n',
                        'r' => '\r',
                        't' => '\t',
                        'v' => '\u{b}',
                        '\\' => '\\',
                        c if c == quote => c,
                        '0'..='7' => {
                            let mut value = esc.to_digit(8).unwrap_or(0);
                            for _ in 0..2 {
                                let digit = chars.next().and_then(|(_, d)| d.to_digit(8));
                                let Some(digit) = digit else {
                                    return Err(self.error(
                                        start + esc_offset,
                                        "octal escape needs three digits",
                                    ));
                                };
                                value = value * 8 + digit;
                            }
                            char::from_u32(value)
                                .filter(|_| value <= 0o377)
                                .ok_or_else(|| {
                                    self.error(start + esc_offset, "octal escape out of range")
                                })?
                        }
                        'x' | 'u' | 'U' => {
                            let digits = match esc {
                                'x' => 2,
                                'u' => 4,
                                _ => 8,
                            };
                            let mut value: u32 = 0;
                            for _ in 0..digits {
                                let digit = chars.next().and_then(|(_, d)| d.to_digit(16));
                                let Some(digit) = digit else {
                                    return Err(self.error(
                                        start + esc_offset,
                                        format!("\\{esc} escape needs {digits} hex digits"),
                                    ));
                                };
                                value = value.saturating_mul(16).saturating_add(digit);
                            }
                            char::from_u32(value).ok_or_else(|| {
                                self.error(start + esc_offset, "escape is not a valid character")
                            })?
                        }
                        other => {
                            return Err(self.error(
                                start + esc_offset,
                                format!("invalid escape sequence \\{other}"),
                            ))
                        }
                    };
                    out.push(decoded);
                }
                c => out.push(c),
            }
        }
        Err(self.error(start, "quoted string is not terminated"))
    }
}

fn is_field_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn matches(filters: &[&str], target: &FilterTarget<'_>) -> bool {
        Filter::parse_all(filters)
            .unwrap_or_else(|e| panic!("{filters:?} should parse: {e}"))
            .matches(target)
    }

    #[test]
    fn containerd_remote_snapshot_lookup() {
        let l = labels(&[("containerd.io/snapshot.ref", "sha256:abc")]);
        let target = FilterTarget {
            name: "sha256:abc",
            parent: Some("default/3/sha256:def"),
            kind: Kind::Committed,
            labels: &l,
        };
        // Exactly the shape containerd's metadata layer sends.
        let f = r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="default/3/sha256:def""#;
        assert!(matches(&[f], &target));
        let other_parent = r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="""#;
        assert!(!matches(&[other_parent], &target));
        let base = FilterTarget {
            parent: None,
            ..target
        };
        assert!(matches(&[other_parent], &base));
    }

    #[test]
    fn operators_and_alternatives() {
        let l = labels(&[("a", "1"), ("x.y", "z")]);
        let t = FilterTarget {
            name: "layer-7",
            parent: None,
            kind: Kind::Active,
            labels: &l,
        };
        assert!(matches(&["name==layer-7"], &t));
        assert!(!matches(&["name!=layer-7"], &t));
        assert!(matches(&["name~=^layer-[0-9]+$"], &t));
        assert!(matches(&["name~=/lay.r/"], &t));
        assert!(matches(&["name~=|er-7$|"], &t));
        assert!(matches(&["kind==active"], &t));
        assert!(!matches(&["kind==committed"], &t));
        assert!(matches(&["labels.a"], &t));
        assert!(!matches(&["labels.b"], &t));
        assert!(matches(&["labels.x.y==z"], &t));
        assert!(matches(&[r#"labels."x.y"==z"#], &t));
        assert!(matches(&["labels.b!=1"], &t), "absent label is not equal");
        assert!(matches(&["labels.a==1, kind==active"], &t));
        assert!(!matches(&["labels.a==1,kind==view"], &t));
        assert!(matches(&["kind==view", "labels.a==1"], &t), "OR");
        assert!(matches(&[], &t));
        assert!(matches(&[""], &t));
        assert!(matches(&[r#"name=="layer\x2d7""#], &t));
    }

    #[test]
    fn rejects_malformed_filters() {
        for bad in [
            "bogus==1",
            "name.sub==1",
            "name==",
            "name=1",
            "name===1",
            "name==1,",
            "name==1 extra",
            r#"labels."unterminated==1"#,
            r#"name=="bad\q""#,
            "name~=(",
            ",name==1",
            "labels.",
        ] {
            assert!(
                Filter::parse_all(&[bad]).is_err(),
                "{bad:?} should be rejected"
            );
        }
        // Slashes only quote regular expressions; elsewhere they are value characters.
        let l = BTreeMap::new();
        let t = FilterTarget {
            name: "/x/",
            parent: None,
            kind: Kind::View,
            labels: &l,
        };
        assert!(matches(&["name==/x/"], &t));
    }
}
