//! Secret values and their printable stand-ins.
//!
//! A webhook signing secret is only ever held as a [`SecretString`] (zeroized on
//! drop, `Debug` prints `[REDACTED]`). Everything a human can see — logs, errors,
//! status, history — shows a [`Fingerprint`] instead: the first 8 hex digits of the
//! secret's SHA-256, enough to tell two secrets apart and useless to an attacker.

use std::fmt;

pub use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// First 8 hex digits of SHA-256 of a secret: safe to log, store and print.
#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Fingerprint(String);

impl Fingerprint {
    pub fn of(secret: &SecretString) -> Self {
        Self::of_str(secret.expose_secret())
    }

    pub fn of_str(secret: &str) -> Self {
        let digest = Sha256::digest(secret.as_bytes());
        Fingerprint(hex::encode(&digest[..4]))
    }

    /// Rebuilds a fingerprint read back from the state database.
    pub fn from_stored(s: String) -> Self {
        Fingerprint(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Builds a [`SecretString`] from an owned string without an extra copy.
pub fn secret(s: impl Into<String>) -> SecretString {
    SecretString::from(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_short_stable_and_not_the_secret() {
        let s = secret("whsec_fintoro_8b5d0c");
        let fp = Fingerprint::of(&s);
        assert_eq!(fp.as_str().len(), 8);
        assert_eq!(fp, Fingerprint::of_str("whsec_fintoro_8b5d0c"));
        assert_ne!(fp, Fingerprint::of_str("whsec_fintoro_8b5d0d"));
        assert!(!format!("{fp} {fp:?}").contains("8b5d0c"));
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = secret("whsec_topsecret");
        assert!(!format!("{s:?}").contains("topsecret"));
    }
}
