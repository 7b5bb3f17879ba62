//! Human byte sizes on the command line: `10GiB`, `256M`, `4096`.

use std::str::FromStr;

/// A byte count parsed from `N[K|M|G|T][i][B]` (powers of 1024 either way, as
/// memory and disk budgets are meant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size: expected e.g. 512MiB, 10G or 4096"))?;
        let shift = match unit
            .trim()
            .to_ascii_lowercase()
            .trim_end_matches('b')
            .trim_end_matches('i')
        {
            "" => 0,
            "k" => 10,
            "m" => 20,
            "g" => 30,
            "t" => 40,
            other => return Err(format!("{s:?}: unknown unit {other:?} (use K, M, G or T)")),
        };
        n.checked_mul(1u64 << shift)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

#[cfg(test)]
mod tests {
    use super::ByteSize;

    #[test]
    fn parses_sizes() {
        assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
        assert_eq!("10GiB".parse::<ByteSize>().unwrap().0, 10 << 30);
        assert_eq!("256M".parse::<ByteSize>().unwrap().0, 256 << 20);
        assert_eq!("1kb".parse::<ByteSize>().unwrap().0, 1024);
        assert!("".parse::<ByteSize>().is_err());
        assert!("12Q".parse::<ByteSize>().is_err());
        assert!("99999999999T".parse::<ByteSize>().is_err());
    }
}
