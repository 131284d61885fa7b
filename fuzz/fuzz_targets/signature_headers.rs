//! Every scheme's header parsing, through `Scheme::verify`, with arbitrary
//! header values and bodies: it must never panic, and never accept.
#![no_main]

use std::time::Duration;

use hookbox::signature::{Algorithm, Encoding, HmacParams, Scheme};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Layout: header values separated by 0xFF, then the body after the last one.
    let mut parts = data.split(|b| *b == 0xFF);
    let values: Vec<String> = parts.by_ref().take(3).map(|p| String::from_utf8_lossy(p).into_owned()).collect();
    let body: Vec<u8> = parts.flatten().copied().collect();
    let value = |i: usize| values.get(i).map(String::as_str).unwrap_or("");
    let schemes = [
        (Scheme::Begini, vec![("X-Signature", value(0))]),
        (Scheme::Github, vec![("X-Hub-Signature-256", value(0))]),
        (Scheme::Stripe, vec![("Stripe-Signature", value(0))]),
        (
            Scheme::StandardWebhooks,
            vec![("webhook-id", value(0)), ("webhook-timestamp", value(1)), ("webhook-signature", value(2))],
        ),
        (
            Scheme::StandardWebhooks,
            vec![("svix-id", value(0)), ("svix-timestamp", value(1)), ("svix-signature", value(2))],
        ),
        (
            Scheme::Hmac(HmacParams {
                header: "X-Sig".into(),
                prefix: "sha256=".into(),
                algorithm: Algorithm::Sha256,
                encoding: Encoding::Base64,
            }),
            vec![("X-Sig", value(0))],
        ),
    ];
    for (scheme, headers) in schemes {
        let key = scheme.key_from_secret("whsec_ZnV6ei1rZXk=").unwrap();
        let verdict = scheme.verify(&[key], headers.as_slice(), &body, 1_700_000_000, Duration::from_secs(300));
        assert!(verdict.is_err(), "random input verified under {}", scheme.name());
    }
});
