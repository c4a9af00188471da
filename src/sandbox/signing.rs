//! How each provider signs webhook deliveries — the one place that knows.
//!
//! The simulators sign with these functions and the sandbox receiver verifies with
//! them, so a change in a provider's scheme (several are inferred, see
//! `PROVIDERS.md`) is a change here only. Fintoro is written; Monite
//! (`Monite-Signature: t=…,v1=…`) and Storno (`X-Webhook-Signature`) go next to it.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Fintoro's header carrying the delivery id (stable across retries of one event).
pub const FINTORO_ID_HEADER: &str = "webhook-id";
/// Fintoro's header carrying the send time, unix seconds.
pub const FINTORO_TIMESTAMP_HEADER: &str = "webhook-timestamp";
/// Fintoro's header carrying the signature, lowercase hex.
pub const FINTORO_SIGNATURE_HEADER: &str = "webhook-signature";
/// Fintoro's suggested tolerance between `webhook-timestamp` and the receiver's clock.
pub const FINTORO_TIMESTAMP_TOLERANCE_SECS: i64 = 300;

fn mac_for(secret: &str) -> HmacSha256 {
    // HMAC takes keys of any length (long ones are hashed), so this cannot fail.
    HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length")
}

/// Fintoro's `webhook-signature`: lowercase hex HMAC-SHA256 of the raw body only,
/// keyed with the secret string as-is (the `whsec_fintoro_` prefix included, no
/// base64 decoding). *Hex format inferred from Fintoro's sample code.*
pub fn fintoro_signature(secret: &str, body: &[u8]) -> String {
    let mut mac = mac_for(secret);
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Checks a Fintoro signature in constant time. A signature that is not hex (or has
/// the wrong length) simply does not verify.
pub fn verify_fintoro(secret: &str, body: &[u8], signature_hex: &str) -> bool {
    let Ok(expected) = hex::decode(signature_hex.trim()) else {
        return false;
    };
    let mut mac = mac_for(secret);
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_fintoro_8b5d7c9f4f6549f7a3e8c4fd5f55ab91";
    const BODY: &[u8] = br#"{"id":"evt_1","type":"invoices.created","occurredAt":"2026-03-18T15:04:05Z","resource":{"type":"invoice","id":42}}"#;
    // Computed independently:
    // python3 -c 'import hmac,hashlib;print(hmac.new(SECRET, BODY, hashlib.sha256).hexdigest())'
    const EXPECTED: &str = "fb2d228ba9c6ffe93410a1909568562be2fecbd8d6e1ae1404f0d049bd1c4b3c";

    #[test]
    fn fintoro_signature_matches_an_independent_vector() {
        assert_eq!(fintoro_signature(SECRET, BODY), EXPECTED);
        // The RFC-style empty case, also from Python.
        assert_eq!(
            fintoro_signature("", b""),
            "b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad"
        );
    }

    #[test]
    fn verify_accepts_the_right_secret_only() {
        assert!(verify_fintoro(SECRET, BODY, EXPECTED));
        assert!(!verify_fintoro("whsec_fintoro_other", BODY, EXPECTED));
        let mut tampered = BODY.to_vec();
        tampered[5] ^= 1;
        assert!(!verify_fintoro(SECRET, &tampered, EXPECTED));
    }

    #[test]
    fn verify_rejects_malformed_signatures() {
        assert!(!verify_fintoro(SECRET, BODY, ""));
        assert!(!verify_fintoro(SECRET, BODY, "not-hex"));
        assert!(!verify_fintoro(SECRET, BODY, &EXPECTED[..62]));
        assert!(!verify_fintoro(SECRET, BODY, &format!("v1,{EXPECTED}")));
    }
}
