//! Artifact references and the rules for object-store keys.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A stored object, referenced by content. Every artifact that a job reads or writes is named this way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct ArtifactRef {
    /// Object-store key, e.g. `sha256/ab/abcdef…`.
    pub key: String,
    /// Lower-case hex SHA-256 of the bytes.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// MIME type, e.g. `image/png` or `application/json`.
    pub content_type: String,
}

/// Maximum length of an artifact key.
pub const MAX_KEY_LEN: usize = 512;

/// A validated object-store key: relative, no `..`, no empty segments, a conservative character set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ArtifactKey(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("artifact key is empty")]
    Empty,
    #[error("artifact key is longer than {MAX_KEY_LEN} bytes")]
    TooLong,
    #[error("artifact key must be relative (it starts with '/')")]
    Absolute,
    #[error("artifact key must not contain '..', '.' or empty path segments")]
    Traversal,
    #[error("artifact key contains {0:?}; allowed are ASCII letters, digits and - _ . = /")]
    BadChar(char),
}

impl ArtifactKey {
    pub fn parse(raw: &str) -> Result<Self, KeyError> {
        if raw.is_empty() {
            return Err(KeyError::Empty);
        }
        if raw.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong);
        }
        if raw.starts_with('/') {
            return Err(KeyError::Absolute);
        }
        if let Some(c) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=' | '/')))
        {
            return Err(KeyError::BadChar(c));
        }
        if raw
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        {
            return Err(KeyError::Traversal);
        }
        Ok(Self(raw.to_owned()))
    }

    /// The content-addressed key for bytes with this SHA-256 (lower-case hex, 64 chars).
    pub fn for_sha256(sha256_hex: &str) -> Self {
        Self(format!(
            "sha256/{}/{}",
            &sha256_hex[..2.min(sha256_hex.len())],
            sha256_hex
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ArtifactKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// True when `s` is 64 lower-case hex characters.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_keys() {
        for k in [
            "sha256/ab/abcd",
            "uploads/x.png",
            "a",
            "datasets/v=1/part-0.jsonl",
        ] {
            assert_eq!(ArtifactKey::parse(k).unwrap().as_str(), k);
        }
    }

    #[test]
    fn rejects_traversal_absolute_and_odd_chars() {
        assert_eq!(ArtifactKey::parse(""), Err(KeyError::Empty));
        assert_eq!(ArtifactKey::parse("/etc/passwd"), Err(KeyError::Absolute));
        assert_eq!(ArtifactKey::parse("a/../b"), Err(KeyError::Traversal));
        assert_eq!(ArtifactKey::parse(".."), Err(KeyError::Traversal));
        assert_eq!(ArtifactKey::parse("a//b"), Err(KeyError::Traversal));
        assert_eq!(ArtifactKey::parse("a/"), Err(KeyError::Traversal));
        assert_eq!(ArtifactKey::parse("a\\b"), Err(KeyError::BadChar('\\')));
        assert_eq!(ArtifactKey::parse("a b"), Err(KeyError::BadChar(' ')));
        assert_eq!(ArtifactKey::parse(&"a".repeat(600)), Err(KeyError::TooLong));
    }

    #[test]
    fn content_addressed_keys_fan_out() {
        let h = "ab".repeat(32);
        assert_eq!(
            ArtifactKey::for_sha256(&h).as_str(),
            format!("sha256/ab/{h}")
        );
        assert!(is_sha256_hex(&h));
        assert!(!is_sha256_hex("AB"));
    }
}
