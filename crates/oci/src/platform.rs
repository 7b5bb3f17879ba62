//! Platforms (`os/architecture[/variant]`) as written in image indexes, and matching.
//!
//! Matching normalises the aliases seen in the wild (`x86_64` = `amd64`,
//! `aarch64` = `arm64`, an arm64 without variant is `v8`, an arm without variant is
//! `v7`) and lets a machine run images built for an older variant of its architecture
//! (`arm/v7` runs `arm/v6`, `amd64/v3` runs `amd64/v2`), preferring the closest.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A platform as in the OCI image index `platform` object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture in Go's naming (`amd64`, `arm64`, `arm`, `386`, `ppc64le`, ...).
    pub architecture: String,
    /// Operating system in Go's naming (`linux`, `windows`, ...).
    pub os: String,
    /// Operating system version (Windows images).
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    /// Required OS features (Windows images).
    #[serde(rename = "os.features", default, skip_serializing_if = "Vec::is_empty")]
    pub os_features: Vec<String>,
    /// CPU variant (`v7`, `v8`, `v3`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Reserved CPU features field of the spec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// A platform string that is not `os/arch[/variant]`.
#[derive(Debug, thiserror::Error)]
#[error("invalid platform {value:?}: expected os/architecture[/variant], e.g. linux/amd64 or linux/arm64/v8")]
pub struct PlatformParseError {
    /// The rejected input, truncated to a printable length.
    pub value: String,
}

impl Platform {
    /// A platform from its parts; an empty variant means none.
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        Platform {
            architecture: architecture.to_string(),
            os: os.to_string(),
            variant: variant.filter(|v| !v.is_empty()).map(str::to_string),
            ..Platform::default()
        }
    }

    /// The platform this process runs on, in OCI naming.
    pub fn host() -> Self {
        let os = match std::env::consts::OS {
            "macos" => "darwin",
            other => other,
        };
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", Some("v8")),
            // Rust's "arm" target family is ARMv6/v7; v7 is what Linux distributions ship.
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "powerpc64" => ("ppc64", None),
            "mips64" if cfg!(target_endian = "little") => ("mips64le", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        Platform::new(os, arch, variant)
    }

    /// The normalised `(os, architecture, variant)` triple used for comparisons.
    fn normalized(&self) -> (String, String, String) {
        let os = self.os.to_ascii_lowercase();
        let arch = self.architecture.to_ascii_lowercase();
        let mut variant = self
            .variant
            .clone()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let arch = match arch.as_str() {
            "x86_64" | "x86-64" => "amd64".to_string(),
            "aarch64" => "arm64".to_string(),
            "i386" | "i686" => "386".to_string(),
            "armhf" => {
                if variant.is_empty() {
                    variant = "v7".into();
                }
                "arm".to_string()
            }
            "armel" => {
                if variant.is_empty() {
                    variant = "v6".into();
                }
                "arm".to_string()
            }
            _ => arch,
        };
        match arch.as_str() {
            "arm64" if variant.is_empty() || variant == "8" => variant = "v8".into(),
            "arm" if variant.is_empty() => variant = "v7".into(),
            "arm" if matches!(variant.as_str(), "5" | "6" | "7" | "8") => {
                variant = format!("v{variant}")
            }
            "amd64" if variant == "v1" => variant.clear(),
            _ => {}
        }
        (os, arch, variant)
    }

    /// How well an image built for `candidate` fits a machine of this platform:
    /// `None` if it cannot run, `Some(0)` for an exact fit, larger for older variants.
    pub fn match_rank(&self, candidate: &Platform) -> Option<u32> {
        let (os, arch, variant) = self.normalized();
        let (c_os, c_arch, c_variant) = candidate.normalized();
        if os != c_os || arch != c_arch {
            return None;
        }
        if variant == c_variant {
            return Some(0);
        }
        // Only arm and amd64 have ordered, backwards-compatible variants.
        if arch == "arm" || arch == "amd64" {
            let level = |v: &str| -> Option<u32> {
                if v.is_empty() {
                    Some(1)
                } else {
                    v.strip_prefix('v')?.parse().ok()
                }
            };
            let (want, have) = (level(&variant)?, level(&c_variant)?);
            if have <= want {
                return Some(want - have);
            }
            return None;
        }
        None
    }

    /// Whether an image built for `candidate` runs on this platform.
    pub fn matches(&self, candidate: &Platform) -> bool {
        self.match_rank(candidate).is_some()
    }
}

impl FromStr for Platform {
    type Err = PlatformParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PlatformParseError {
            value: s.chars().take(80).collect(),
        };
        let parts: Vec<&str> = s.split('/').collect();
        let valid = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        };
        match parts.as_slice() {
            [os, arch] if valid(os) && valid(arch) => Ok(Platform::new(os, arch, None)),
            [os, arch, variant] if valid(os) && valid(arch) && valid(variant) => {
                Ok(Platform::new(os, arch, Some(variant)))
            }
            _ => Err(err()),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = self.variant.as_deref().filter(|v| !v.is_empty()) {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    #[test]
    fn parse_and_display() {
        assert_eq!(p("linux/amd64").to_string(), "linux/amd64");
        assert_eq!(p("linux/arm64/v8").variant.as_deref(), Some("v8"));
        assert_eq!(p("linux/arm/v7").to_string(), "linux/arm/v7");
        for bad in ["", "linux", "linux/", "/amd64", "a/b/c/d", "linux/amd 64"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
    }

    #[test]
    fn matching_normalises_and_ranks() {
        assert!(p("linux/amd64").matches(&p("linux/x86_64")));
        assert!(p("linux/arm64").matches(&p("linux/arm64/v8")));
        assert!(p("linux/arm64/v8").matches(&p("linux/aarch64")));
        assert!(!p("linux/amd64").matches(&p("linux/arm64")));
        assert!(!p("linux/amd64").matches(&p("windows/amd64")));
        // An arm/v7 machine runs v6 and v5 images, preferring v7; not v8.
        assert_eq!(p("linux/arm/v7").match_rank(&p("linux/arm/v7")), Some(0));
        assert_eq!(p("linux/arm/v7").match_rank(&p("linux/arm")), Some(0));
        assert_eq!(p("linux/arm/v7").match_rank(&p("linux/arm/v6")), Some(1));
        assert_eq!(p("linux/arm/v6").match_rank(&p("linux/arm/v7")), None);
        assert_eq!(p("linux/amd64/v3").match_rank(&p("linux/amd64")), Some(2));
        assert_eq!(p("linux/amd64").match_rank(&p("linux/amd64/v3")), None);
    }

    #[test]
    fn host_platform_is_sane() {
        let h = Platform::host();
        assert!(!h.os.is_empty() && !h.architecture.is_empty());
        assert!(h.matches(&h));
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        assert_eq!(h.to_string(), "linux/amd64");
    }

    #[test]
    fn serde_field_names() {
        let json = r#"{"architecture":"arm","os":"linux","variant":"v7","os.version":"1"}"#;
        let plat: Platform = serde_json::from_str(json).unwrap();
        assert_eq!(plat.os_version.as_deref(), Some("1"));
        let back = serde_json::to_value(&plat).unwrap();
        assert_eq!(back["os.version"], "1");
        assert!(back.get("features").is_none());
    }
}
