//! How each provider signs webhook deliveries — the one place that knows.
//!
//! The simulators sign with these functions and the sandbox receiver verifies with
//! them, so a change in a provider's scheme (several are inferred, see
//! `PROVIDERS.md`) is a change here only: Fintoro (`webhook-signature`), Monite
//! (`Monite-Signature: t=…,v1=…`) and Storno (`X-Webhook-Signature`).

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

/// Monite's signature header: `t=<unix seconds>,v1=<lowercase hex>`.
pub const MONITE_SIGNATURE_HEADER: &str = "monite-signature";
/// Tolerance between Monite's `t` and the receiver's clock (Stripe-style default).
pub const MONITE_TIMESTAMP_TOLERANCE_SECS: i64 = 300;

/// The string Monite signs. *Unconfirmed* (PROVIDERS.md): the header format implies
/// the Stripe scheme, `"{t}.{raw body}"`; if Monite turns out to sign something
/// else, this function is the one place to change.
pub fn monite_signed_payload(timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut out = format!("{timestamp}.").into_bytes();
    out.extend_from_slice(body);
    out
}

/// `Monite-Signature` for a delivery sent at `timestamp`.
pub fn monite_signature_header(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = mac_for(secret);
    mac.update(&monite_signed_payload(timestamp, body));
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// Parses `t=…,v1=…` (any order, other schemes ignored): the timestamp and every
/// `v1` signature. `None` when there is no timestamp or no `v1`.
pub fn parse_monite_header(header: &str) -> Option<(i64, Vec<String>)> {
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.trim().parse::<i64>().ok(),
            Some(("v1", v)) => v1.push(v.trim().to_string()),
            _ => {}
        }
    }
    t.filter(|_| !v1.is_empty()).map(|t| (t, v1))
}

/// Checks a `Monite-Signature` header's signatures (not its freshness) in constant
/// time per signature.
pub fn verify_monite(secret: &str, body: &[u8], header: &str) -> bool {
    let Some((t, sigs)) = parse_monite_header(header) else {
        return false;
    };
    let payload = monite_signed_payload(t, body);
    sigs.iter().any(|s| {
        let Ok(expected) = hex::decode(s) else {
            return false;
        };
        let mut mac = mac_for(secret);
        mac.update(&payload);
        mac.verify_slice(&expected).is_ok()
    })
}

/// Storno's signature header (the backend's name; the public reference's
/// `X-Storno-Signature: sha256=…` is not what it sends).
pub const STORNO_SIGNATURE_HEADER: &str = "x-webhook-signature";
/// Storno's event-type header.
pub const STORNO_EVENT_HEADER: &str = "x-webhook-event";
/// Storno's delivery-id header.
pub const STORNO_ID_HEADER: &str = "x-webhook-id";
/// Storno's sender.
pub const STORNO_USER_AGENT: &str = "Storno-Webhook/1.0";

/// Storno's `X-Webhook-Signature`: lowercase hex HMAC-SHA256 of the raw body, keyed
/// with the secret string. No timestamp is signed.
pub fn storno_signature(secret: &str, body: &[u8]) -> String {
    let mut mac = mac_for(secret);
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Checks a Storno signature in constant time.
pub fn verify_storno(secret: &str, body: &[u8], signature_hex: &str) -> bool {
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

    #[test]
    fn monite_signs_timestamp_dot_body() {
        let h = monite_signature_header("whsec_m", 1700000000, b"{}");
        // python3 -c 'import hmac,hashlib;print(hmac.new(b"whsec_m", b"1700000000.{}", hashlib.sha256).hexdigest())'
        assert_eq!(
            h,
            "t=1700000000,v1=f48ce2d315794de493895924adcce5ec349ea5d384bdf3676ce9c52191a7d549"
        );
        assert!(verify_monite("whsec_m", b"{}", &h));
        assert!(!verify_monite("whsec_other", b"{}", &h));
        assert!(!verify_monite("whsec_m", b"{ }", &h));
        // Changing the timestamp breaks the signature: it is signed.
        let moved = h.replace("t=1700000000", "t=1700000001");
        assert!(!verify_monite("whsec_m", b"{}", &moved));
        assert_eq!(parse_monite_header("v1=ab"), None);
        assert_eq!(parse_monite_header("t=5,v0=x,v1=ab").map(|p| p.0), Some(5));
    }

    #[test]
    fn storno_signs_the_raw_body() {
        let sig = storno_signature(SECRET, BODY);
        assert_eq!(sig, EXPECTED, "same construction as Fintoro's");
        assert!(verify_storno(SECRET, BODY, &sig));
        assert!(!verify_storno(SECRET, BODY, &format!("sha256={sig}")));
    }
}
