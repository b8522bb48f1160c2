//! Standard Webhooks 1.0 signatures (<https://www.standardwebhooks.com/>): what a
//! receiver's Standard Webhooks library checks, so that it verifies us without custom
//! code.
//!
//! A secret is `whsec_` followed by the base64 of its key bytes. A request carries
//! `webhook-id` (the same on every retry of one notification), `webhook-timestamp`
//! (integer seconds since the epoch, of this attempt) and `webhook-signature`: one
//! `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` per secret, space-separated, so
//! that during a rotation the old and the new secret both sign.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const PREFIX: &str = "whsec_";

/// A signing key decoded from its `whsec_…` form. Its bytes are never printed.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

impl SigningKey {
    /// Decodes `whsec_<base64>`; the reason, if not, never repeats the value.
    pub fn parse(secret: &str) -> Result<SigningKey, &'static str> {
        let encoded = secret
            .strip_prefix(PREFIX)
            .ok_or("must start with whsec_ (a Standard Webhooks secret)")?;
        // Receivers' libraries accept unpadded base64 too.
        let padded = match encoded.len() % 4 {
            2 => format!("{encoded}=="),
            3 => format!("{encoded}="),
            _ => encoded.to_string(),
        };
        let key = STANDARD
            .decode(padded.as_bytes())
            .map_err(|_| "the part after whsec_ must be base64")?;
        if key.len() < 16 {
            return Err("the key after whsec_ must be at least 16 bytes (24 base64 characters)");
        }
        Ok(SigningKey(key))
    }

    /// HMAC-SHA256 of `{id}.{timestamp}.{body}`, the timestamp as the header carries it.
    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

/// The `webhook-signature` value: one `v1,` signature per key, space-separated.
pub fn signature_header(keys: &[SigningKey], id: &str, timestamp: i64, body: &[u8]) -> String {
    let timestamp = timestamp.to_string();
    keys.iter()
        .map(|k| {
            format!(
                "v1,{}",
                STANDARD.encode(k.mac(id, &timestamp, body).finalize().into_bytes())
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why a request does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("webhook-timestamp is not a number of seconds")]
    BadTimestamp,
    #[error("webhook-timestamp is more than the tolerance away from now")]
    Stale,
    #[error("no v1 signature matches")]
    NoMatch,
}

/// What a receiver does (the demo's receiver uses it): the request verifies if its
/// timestamp is within `tolerance_secs` of `now` and one of its `v1` signatures is that of
/// one of `keys`. Compared in constant time.
pub fn verify(
    keys: &[SigningKey],
    id: &str,
    timestamp: &str,
    signatures: &str,
    body: &[u8],
    now: i64,
    tolerance_secs: i64,
) -> Result<(), VerifyError> {
    let ts: i64 = timestamp.parse().map_err(|_| VerifyError::BadTimestamp)?;
    if now.abs_diff(ts) > tolerance_secs.unsigned_abs() {
        return Err(VerifyError::Stale);
    }
    let given: Vec<Vec<u8>> = signatures
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|b64| STANDARD.decode(b64).ok())
        .collect();
    let matches = keys
        .iter()
        .any(|k| given.iter().any(|g| k.mac(id, timestamp, body).verify_slice(g).is_ok()));
    if matches {
        Ok(())
    } else {
        Err(VerifyError::NoMatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example of the Standard Webhooks specification's reference libraries.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1614265330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const EXPECTED: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_the_specifications_example() {
        let key = SigningKey::parse(SECRET).unwrap();
        assert_eq!(signature_header(&[key], ID, TS, BODY), EXPECTED);
    }

    #[test]
    fn a_rotation_signs_with_both_keys_and_either_verifies() {
        let old = SigningKey::parse(SECRET).unwrap();
        let new = SigningKey::parse("whsec_c2Vjb25kLXNlY3JldC1mb3Itcm90YXRpb24=").unwrap();
        let header = signature_header(&[new.clone(), old.clone()], ID, TS, BODY);
        assert_eq!(header.split(' ').count(), 2);
        assert!(header.ends_with(EXPECTED));
        for key in [old, new] {
            assert_eq!(verify(&[key], ID, &TS.to_string(), &header, BODY, TS, 300), Ok(()));
        }
    }

    #[test]
    fn tampering_and_staleness_fail() {
        let key = SigningKey::parse(SECRET).unwrap();
        let ts = TS.to_string();
        let v = |id: &str, ts: &str, sig: &str, body: &[u8], now: i64| {
            verify(std::slice::from_ref(&key), id, ts, sig, body, now, 300)
        };
        assert_eq!(v(ID, &ts, EXPECTED, BODY, TS), Ok(()));
        assert_eq!(
            v(ID, &ts, EXPECTED, br#"{"test": 2432232315}"#, TS),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(v("msg_other", &ts, EXPECTED, BODY, TS), Err(VerifyError::NoMatch));
        assert_eq!(
            v(ID, &ts, "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=", BODY, TS),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(v(ID, &ts, EXPECTED, BODY, TS + 301), Err(VerifyError::Stale));
        assert_eq!(v(ID, "soon", EXPECTED, BODY, TS), Err(VerifyError::BadTimestamp));
        assert_eq!(
            v(ID, &i64::MIN.to_string(), EXPECTED, BODY, TS),
            Err(VerifyError::Stale)
        );
        assert_eq!(
            v(ID, &format!("+{TS}"), EXPECTED, BODY, TS),
            Err(VerifyError::NoMatch),
            "the header as signed"
        );
        assert_eq!(v(ID, &ts, "v1,@@@ v1,", BODY, TS), Err(VerifyError::NoMatch));
    }

    #[test]
    fn secrets_that_are_not_whsec_are_refused_without_echoing_them() {
        for bad in [
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_***not base64***",
            "whsec_c2hvcnQ=",
        ] {
            let why = SigningKey::parse(bad).unwrap_err();
            assert!(!why.contains(bad), "{why}");
        }
        assert_eq!(format!("{:?}", SigningKey::parse(SECRET).unwrap()), "SigningKey(***)");
    }
}
