//! Differential: hookbox's `standard-webhooks` and `stripe` verification
//! against an independent implementation of each provider's published
//! algorithm, written here from the specifications:
//!
//! - Standard Webhooks: `base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))`,
//!   key = the secret without `whsec_`, base64-decoded; header
//!   `webhook-signature` = space-separated `v1,<signature>`.
//! - Stripe: `hex(HMAC-SHA256(secret, "{t}.{body}"))`, key = the whole secret
//!   as UTF-8; header `Stripe-Signature: t=<t>,v1=<signature>[,v1=...]`.
//!
//! Signatures are made by the independent side, right or wrong (another key,
//! another body, another timestamp, an extra random candidate); hookbox must
//! accept exactly the deliveries the independent side accepts.
#![no_main]

use std::time::Duration;

use base64::{engine::general_purpose::STANDARD as BASE64, Engine};
use hmac::{Hmac, Mac};
use hookbox::signature::Scheme;
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

const NOW: i64 = 1_700_000_000;

fuzz_target!(|data: &[u8]| {
    if data.len() < 24 {
        return;
    }
    let (control, rest) = data.split_at(8);
    let (key_bytes, body) = rest.split_at(16);
    let flags = control[0];
    let skew = i64::from(control[1]) * 5 - 640; // -640s..+635s
    let timestamp = NOW + skew;
    let wrong_key = flags & 1 != 0;
    let wrong_body = flags & 2 != 0;
    let extra_candidate = flags & 4 != 0;
    let id = format!("msg_{}", hex::encode(&control[2..8]));
    let tolerance = Duration::from_secs(300);
    let in_time = skew.abs() <= 300;

    // Standard Webhooks.
    let secret = format!("whsec_{}", BASE64.encode(key_bytes));
    let mut signing_key = key_bytes.to_vec();
    if wrong_key {
        signing_key[0] ^= 1;
    }
    let signed_body: Vec<u8> = if wrong_body {
        [body, b"x"].concat()
    } else {
        body.to_vec()
    };
    let signature = hmac_sha256(
        &signing_key,
        &[format!("{id}.{timestamp}.").as_bytes(), &signed_body],
    );
    let mut header = format!("v1,{}", BASE64.encode(&signature));
    if extra_candidate {
        header = format!("v1,{} {header}", BASE64.encode(&control[..]));
    }
    let independent = !wrong_key && !wrong_body && in_time;
    let scheme = Scheme::StandardWebhooks;
    let key = scheme.key_from_secret(&secret).expect("a valid secret");
    let timestamp_text = timestamp.to_string();
    let headers = [
        ("webhook-id", id.as_str()),
        ("webhook-timestamp", timestamp_text.as_str()),
        ("webhook-signature", header.as_str()),
    ];
    let verdict = scheme.verify(&[key], headers.as_slice(), body, NOW, tolerance);
    assert_eq!(verdict.is_ok(), independent, "standard-webhooks: {verdict:?}");

    // Stripe.
    let secret = format!("whsec_{}", hex::encode(key_bytes));
    let mut signing_secret = secret.clone().into_bytes();
    if wrong_key {
        signing_secret[6] ^= 1;
    }
    let signature = hmac_sha256(
        &signing_secret,
        &[format!("{timestamp}.").as_bytes(), &signed_body],
    );
    let mut header = format!("t={timestamp},v1={}", hex::encode(signature));
    if extra_candidate {
        header.push_str(&format!(",v1={}", hex::encode(hmac_sha256(b"other", &[body]))));
    }
    let scheme = Scheme::Stripe;
    let key = scheme.key_from_secret(&secret).expect("a valid secret");
    let headers = [("Stripe-Signature", header.as_str())];
    let verdict = scheme.verify(&[key], headers.as_slice(), body, NOW, tolerance);
    assert_eq!(verdict.is_ok(), independent, "stripe: {verdict:?}");
});
