//! Signature schemes: verifying a delivery over its raw bytes, and signing a
//! payload the same way a sender would (for `hookbox send`, load tests and tests).

use std::time::Duration;

use base64::{engine::general_purpose::STANDARD as BASE64, Engine};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::{Sha256, Sha512};
use subtle::ConstantTimeEq;

use crate::{headers::HeaderLookup, secret::Secret};

/// Why a delivery's signature was refused. The client always gets the same
/// 403; this goes to the audit row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    MissingHeader,
    DuplicateHeader,
    MalformedHeader,
    MalformedTimestamp,
    TimestampTooOld,
    TimestampTooNew,
    SignatureMismatch,
}

impl Rejection {
    /// The `reason` recorded in `inbox_deliveries`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::MissingHeader => "missing_header",
            Self::DuplicateHeader => "duplicate_header",
            Self::MalformedHeader => "malformed_header",
            Self::MalformedTimestamp => "malformed_timestamp",
            Self::TimestampTooOld => "timestamp_too_old",
            Self::TimestampTooNew => "timestamp_too_new",
            Self::SignatureMismatch => "signature_mismatch",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Sha256,
    Sha512,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Hex,
    Base64,
}

/// The generic scheme: one header carrying `prefix` + the encoded MAC of the body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HmacParams {
    pub header: String,
    pub prefix: String,
    pub algorithm: Algorithm,
    pub encoding: Encoding,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scheme {
    Begini,
    StandardWebhooks,
    Stripe,
    Github,
    Hmac(HmacParams),
}

const STANDARD_WEBHOOKS_NAMES: [[&str; 3]; 2] = [
    ["webhook-id", "webhook-timestamp", "webhook-signature"],
    ["svix-id", "svix-timestamp", "svix-signature"],
];

impl Scheme {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Begini => "begini",
            Self::StandardWebhooks => "standard-webhooks",
            Self::Stripe => "stripe",
            Self::Github => "github",
            Self::Hmac(_) => "hmac",
        }
    }

    /// Headers that carry signatures: never stored, never logged.
    pub fn signature_headers(&self) -> Vec<&str> {
        match self {
            Self::Begini => vec!["x-signature"],
            Self::StandardWebhooks => vec!["webhook-signature", "svix-signature"],
            Self::Stripe => vec!["stripe-signature"],
            Self::Github => vec!["x-hub-signature-256", "x-hub-signature"],
            Self::Hmac(p) => vec![p.header.as_str()],
        }
    }

    /// Turns a configured secret into the key bytes the scheme MACs with.
    pub fn key_from_secret(&self, secret: &str) -> Result<Secret, String> {
        if secret.is_empty() {
            return Err("the secret is empty".into());
        }
        match self {
            Self::StandardWebhooks => {
                let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
                BASE64
                    .decode(encoded)
                    .ok()
                    .filter(|key| !key.is_empty())
                    .map(Secret::new)
                    .ok_or_else(|| {
                        "a standard-webhooks secret is `whsec_` followed by base64".into()
                    })
            }
            _ => Ok(Secret::new(secret.as_bytes().to_vec())),
        }
    }

    /// Verifies a delivery against every key (rotation). `now` is unix seconds.
    pub fn verify(
        &self,
        keys: &[Secret],
        headers: &(impl HeaderLookup + ?Sized),
        body: &[u8],
        now: i64,
        tolerance: Duration,
    ) -> Result<(), Rejection> {
        let (signed_prefix, candidates, algorithm) = match self {
            Self::Begini => {
                let value = single_header(headers, "x-signature")?;
                (Vec::new(), vec![decode_hex(value)?], Algorithm::Sha512)
            }
            Self::Github => {
                let value = single_header(headers, "x-hub-signature-256")?;
                let hex = value
                    .strip_prefix("sha256=")
                    .ok_or(Rejection::MalformedHeader)?;
                (Vec::new(), vec![decode_hex(hex)?], Algorithm::Sha256)
            }
            Self::Hmac(params) => {
                let value = single_header(headers, &params.header)?;
                let encoded = value
                    .strip_prefix(params.prefix.as_str())
                    .ok_or(Rejection::MalformedHeader)?;
                let signature = match params.encoding {
                    Encoding::Hex => decode_hex(encoded)?,
                    Encoding::Base64 => decode_base64(encoded)?,
                };
                (Vec::new(), vec![signature], params.algorithm)
            }
            Self::Stripe => {
                let value = single_header(headers, "stripe-signature")?;
                let (timestamp, signatures) = parse_stripe_header(value)?;
                check_timestamp(timestamp, now, tolerance)?;
                (
                    format!("{timestamp}.").into_bytes(),
                    signatures,
                    Algorithm::Sha256,
                )
            }
            Self::StandardWebhooks => {
                let [id, timestamp, signature] = standard_webhooks_headers(headers)?;
                let ts = parse_timestamp(timestamp)?;
                check_timestamp(ts, now, tolerance)?;
                let signatures = parse_standard_webhooks_signatures(signature)?;
                (
                    format!("{id}.{timestamp}.").into_bytes(),
                    signatures,
                    Algorithm::Sha256,
                )
            }
        };
        let verified = keys.iter().any(|key| {
            let expected = mac(algorithm, key.expose(), &[&signed_prefix, body]);
            candidates
                .iter()
                .any(|candidate| equal_in_constant_time(&expected, candidate))
        });
        if verified {
            Ok(())
        } else {
            Err(Rejection::SignatureMismatch)
        }
    }

    /// The headers a sender of this scheme would attach to `body`.
    pub fn sign(
        &self,
        key: &Secret,
        body: &[u8],
        now: i64,
        message_id: &str,
    ) -> Vec<(String, String)> {
        match self {
            Self::Begini => vec![(
                "X-Signature".into(),
                hex::encode(mac(Algorithm::Sha512, key.expose(), &[body])),
            )],
            Self::Github => vec![(
                "X-Hub-Signature-256".into(),
                format!(
                    "sha256={}",
                    hex::encode(mac(Algorithm::Sha256, key.expose(), &[body]))
                ),
            )],
            Self::Hmac(params) => {
                let tag = mac(params.algorithm, key.expose(), &[body]);
                let encoded = match params.encoding {
                    Encoding::Hex => hex::encode(tag),
                    Encoding::Base64 => BASE64.encode(tag),
                };
                vec![(params.header.clone(), format!("{}{encoded}", params.prefix))]
            }
            Self::Stripe => {
                let prefix = format!("{now}.");
                let tag = mac(Algorithm::Sha256, key.expose(), &[prefix.as_bytes(), body]);
                vec![(
                    "Stripe-Signature".into(),
                    format!("t={now},v1={}", hex::encode(tag)),
                )]
            }
            Self::StandardWebhooks => {
                let prefix = format!("{message_id}.{now}.");
                let tag = mac(Algorithm::Sha256, key.expose(), &[prefix.as_bytes(), body]);
                vec![
                    ("webhook-id".into(), message_id.into()),
                    ("webhook-timestamp".into(), now.to_string()),
                    (
                        "webhook-signature".into(),
                        format!("v1,{}", BASE64.encode(tag)),
                    ),
                ]
            }
        }
    }
}

fn mac(algorithm: Algorithm, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    fn run<M: Mac + hmac::digest::KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        let mut mac = <M as hmac::digest::KeyInit>::new_from_slice(key)
            .expect("HMAC accepts keys of any length");
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().to_vec()
    }
    match algorithm {
        Algorithm::Sha256 => run::<Hmac<Sha256>>(key, parts),
        Algorithm::Sha512 => run::<Hmac<Sha512>>(key, parts),
    }
}

/// Length first (an empty or truncated signature never passes), then the bytes
/// in constant time.
fn equal_in_constant_time(expected: &[u8], candidate: &[u8]) -> bool {
    !expected.is_empty()
        && expected.len() == candidate.len()
        && bool::from(expected.ct_eq(candidate))
}

fn single_header<'h>(
    headers: &'h (impl HeaderLookup + ?Sized),
    name: &str,
) -> Result<&'h str, Rejection> {
    match headers.values(name).as_slice() {
        [] => Err(Rejection::MissingHeader),
        [value] => std::str::from_utf8(value)
            .map(str::trim)
            .map_err(|_| Rejection::MalformedHeader),
        _ => Err(Rejection::DuplicateHeader),
    }
}

fn standard_webhooks_headers(
    headers: &(impl HeaderLookup + ?Sized),
) -> Result<[&str; 3], Rejection> {
    // The `webhook-*` names win; Svix's own `svix-*` names are the same scheme.
    let names = STANDARD_WEBHOOKS_NAMES
        .iter()
        .find(|names| !headers.values(names[0]).is_empty())
        .unwrap_or(&STANDARD_WEBHOOKS_NAMES[0]);
    // Svix sends both families with the same values. Different values mean
    // one family was added by someone else: the event key may be read from
    // the id header of the family that was not verified, so refuse.
    let [ours, theirs] = &STANDARD_WEBHOOKS_NAMES;
    for i in 0..2 {
        let (a, b) = (headers.values(ours[i]), headers.values(theirs[i]));
        if !a.is_empty() && !b.is_empty() && a != b {
            return Err(Rejection::MalformedHeader);
        }
    }
    Ok([
        single_header(headers, names[0])?,
        single_header(headers, names[1])?,
        single_header(headers, names[2])?,
    ])
}

fn decode_hex(text: &str) -> Result<Vec<u8>, Rejection> {
    if text.is_empty() {
        return Err(Rejection::MalformedHeader);
    }
    hex::decode(text).map_err(|_| Rejection::MalformedHeader)
}

fn decode_base64(text: &str) -> Result<Vec<u8>, Rejection> {
    if text.is_empty() {
        return Err(Rejection::MalformedHeader);
    }
    BASE64.decode(text).map_err(|_| Rejection::MalformedHeader)
}

fn parse_timestamp(text: &str) -> Result<i64, Rejection> {
    if text.is_empty() || text.len() > 12 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Rejection::MalformedTimestamp);
    }
    text.parse().map_err(|_| Rejection::MalformedTimestamp)
}

fn check_timestamp(timestamp: i64, now: i64, tolerance: Duration) -> Result<(), Rejection> {
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if now.saturating_sub(timestamp) > tolerance {
        Err(Rejection::TimestampTooOld)
    } else if timestamp.saturating_sub(now) > tolerance {
        Err(Rejection::TimestampTooNew)
    } else {
        Ok(())
    }
}

/// `t=<unix>,v1=<hex>[,v1=<hex>...]`; other schemes (`v0`) are ignored.
fn parse_stripe_header(value: &str) -> Result<(i64, Vec<Vec<u8>>), Rejection> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for item in value.split(',') {
        let (key, val) = item
            .trim()
            .split_once('=')
            .ok_or(Rejection::MalformedHeader)?;
        match key {
            "t" if timestamp.is_none() => timestamp = Some(parse_timestamp(val)?),
            "t" => return Err(Rejection::MalformedHeader),
            "v1" => {
                // A malformed candidate is simply not a match; a valid one may follow.
                if let Ok(sig) = decode_hex(val) {
                    signatures.push(sig);
                }
            }
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(Rejection::MalformedHeader)?;
    if signatures.is_empty() {
        return Err(Rejection::MalformedHeader);
    }
    Ok((timestamp, signatures))
}

/// Space-separated `v1,<base64>` entries; other versions are ignored.
fn parse_standard_webhooks_signatures(value: &str) -> Result<Vec<Vec<u8>>, Rejection> {
    let signatures: Vec<Vec<u8>> = value
        .split(' ')
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|encoded| decode_base64(encoded).ok())
        .collect();
    if signatures.is_empty() {
        return Err(Rejection::MalformedHeader);
    }
    Ok(signatures)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOLERANCE: Duration = Duration::from_secs(300);

    fn scheme_named(name: &str) -> Scheme {
        match name {
            "begini" => Scheme::Begini,
            "standard-webhooks" => Scheme::StandardWebhooks,
            "stripe" => Scheme::Stripe,
            "github" => Scheme::Github,
            other => panic!("no vector scheme {other}"),
        }
    }

    #[test]
    fn every_shared_vector_verifies_as_published() {
        let file: serde_json::Value =
            serde_json::from_str(include_str!("../tests/fixtures/signatures.json")).unwrap();
        let vectors = file["vectors"].as_array().unwrap();
        assert!(vectors.len() >= 15);
        for (i, vector) in vectors.iter().enumerate() {
            let scheme = scheme_named(vector["scheme"].as_str().unwrap());
            let key = scheme
                .key_from_secret(vector["secret"].as_str().unwrap())
                .unwrap();
            let headers: Vec<(&str, &str)> = vector["headers"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str().unwrap()))
                .collect();
            let now = vector["now"].as_i64().unwrap_or(0);
            let body = vector["body"].as_str().unwrap().as_bytes();
            let result = scheme.verify(&[key], headers.as_slice(), body, now, TOLERANCE);
            assert_eq!(
                result.is_ok(),
                vector["valid"].as_bool().unwrap(),
                "vector {i}: {vector}"
            );
        }
    }

    #[test]
    fn standard_webhooks_published_vector_signs_identically() {
        let scheme = Scheme::StandardWebhooks;
        let key = scheme
            .key_from_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        let headers = scheme.sign(
            &key,
            br#"{"test": 2432232314}"#,
            1614265330,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
        );
        assert_eq!(
            headers[2].1,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    /// A captured delivery signed with one header family, replayed with the
    /// other family's id header added: the event key could be read from the
    /// unsigned one, so it is refused; Svix's own both-families delivery
    /// (same values) still verifies.
    #[test]
    fn standard_webhooks_refuses_an_id_header_that_differs_from_the_signed_one() {
        let scheme = Scheme::StandardWebhooks;
        let key = scheme
            .key_from_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        let body = br#"{"test": 2432232314}"#;
        let signed = scheme.sign(&key, body, 1614265330, "msg_original");
        let as_svix: Vec<(String, String)> = signed
            .iter()
            .map(|(name, value)| (name.replace("webhook-", "svix-"), value.clone()))
            .collect();
        let verify = |extra: &[(&str, &str)], family: &[(String, String)]| {
            let mut headers: Vec<(&str, &str)> = family
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            headers.extend_from_slice(extra);
            scheme.verify(
                std::slice::from_ref(&key),
                headers.as_slice(),
                body,
                1614265330,
                Duration::from_secs(300),
            )
        };
        assert_eq!(verify(&[], &signed), Ok(()));
        assert_eq!(verify(&[], &as_svix), Ok(()));
        assert_eq!(verify(&[("svix-id", "msg_original")], &signed), Ok(()));
        assert_eq!(
            verify(&[("svix-id", "msg_forged")], &signed),
            Err(Rejection::MalformedHeader)
        );
        assert_eq!(
            verify(&[("webhook-id", "msg_forged")], &as_svix),
            Err(Rejection::MalformedHeader)
        );
    }

    #[test]
    fn github_documented_vector_signs_identically() {
        let scheme = Scheme::Github;
        let key = scheme
            .key_from_secret("It's a Secret to Everybody")
            .unwrap();
        let headers = scheme.sign(&key, b"Hello, World!", 0, "");
        assert_eq!(
            headers[0].1,
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[test]
    fn every_scheme_verifies_what_it_signs_and_refuses_a_changed_body() {
        let hmac = Scheme::Hmac(HmacParams {
            header: "X-Sig".into(),
            prefix: "sha512=".into(),
            algorithm: Algorithm::Sha512,
            encoding: Encoding::Base64,
        });
        for scheme in [
            Scheme::Begini,
            Scheme::StandardWebhooks,
            Scheme::Stripe,
            Scheme::Github,
            hmac,
        ] {
            let key = scheme.key_from_secret("whsec_c2VjcmV0LWtleQ==").unwrap();
            let signed = scheme.sign(&key, b"{\"a\":1}", 1_000, "msg_1");
            let headers: Vec<(&str, &str)> = signed
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert_eq!(
                scheme.verify(
                    std::slice::from_ref(&key),
                    headers.as_slice(),
                    b"{\"a\":1}",
                    1_000,
                    TOLERANCE
                ),
                Ok(())
            );
            assert_eq!(
                scheme.verify(&[key], headers.as_slice(), b"{\"a\": 1}", 1_000, TOLERANCE),
                Err(Rejection::SignatureMismatch),
                "{}",
                scheme.name()
            );
        }
    }

    #[test]
    fn any_configured_key_verifies_during_rotation() {
        let scheme = Scheme::Begini;
        let old = scheme.key_from_secret("old-key").unwrap();
        let new = scheme.key_from_secret("new-key").unwrap();
        let signed = scheme.sign(&old, b"body", 0, "");
        let headers = [("X-Signature", signed[0].1.as_str())];
        assert_eq!(
            scheme.verify(&[new, old], headers.as_slice(), b"body", 0, TOLERANCE),
            Ok(())
        );
    }

    #[test]
    fn timestamps_outside_tolerance_are_refused_both_ways() {
        let scheme = Scheme::Stripe;
        let key = scheme.key_from_secret("whsec_x").unwrap();
        let signed = scheme.sign(&key, b"{}", 10_000, "");
        let headers = [("Stripe-Signature", signed[0].1.as_str())];
        let verify = |now| {
            scheme.verify(
                std::slice::from_ref(&key),
                headers.as_slice(),
                b"{}",
                now,
                TOLERANCE,
            )
        };
        assert_eq!(verify(10_300), Ok(()));
        assert_eq!(verify(10_301), Err(Rejection::TimestampTooOld));
        assert_eq!(verify(9_699), Err(Rejection::TimestampTooNew));
    }

    #[test]
    fn malformed_headers_have_precise_reasons() {
        let key = Scheme::Begini.key_from_secret("k").unwrap();
        let cases: [(&[(&str, &str)], Rejection); 4] = [
            (&[], Rejection::MissingHeader),
            (&[("X-Signature", "zz")], Rejection::MalformedHeader),
            (
                &[("X-Signature", "ab"), ("x-signature", "ab")],
                Rejection::DuplicateHeader,
            ),
            (&[("X-Signature", "abcd")], Rejection::SignatureMismatch),
        ];
        for (headers, expected) in cases {
            assert_eq!(
                Scheme::Begini.verify(std::slice::from_ref(&key), headers, b"", 0, TOLERANCE),
                Err(expected)
            );
        }
        let sw = [
            ("webhook-id", "m"),
            ("webhook-timestamp", "12a"),
            ("webhook-signature", "v1,AA=="),
        ];
        let sw_key = Scheme::StandardWebhooks
            .key_from_secret("whsec_AAAA")
            .unwrap();
        assert_eq!(
            Scheme::StandardWebhooks.verify(&[sw_key], sw.as_slice(), b"", 0, TOLERANCE),
            Err(Rejection::MalformedTimestamp)
        );
    }
}
