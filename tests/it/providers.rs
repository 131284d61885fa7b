//! Signatures made by the providers' own published libraries (Python's
//! `standardwebhooks`, `svix` and `stripe`) against a running receiver.
//!
//! Needs those packages, so it is ignored by plain `cargo test`; CI installs
//! them and runs it (`HOOKBOX_PYTHON=... cargo test -- --ignored providers`).

use std::{io::Write, process::Stdio};

use crate::support::*;

const CONFIG: &str = r#"
[receiver]
listen = "127.0.0.1:0"
admin_listen = ""

[[source]]
name = "sw"
environment = "sandbox"
scheme = "standard-webhooks"
secrets_env = ["SW_SECRET"]
event_key = { header = "webhook-id" }

[[source]]
name = "svix"
environment = "sandbox"
scheme = "standard-webhooks"
secrets_env = ["SW_SECRET"]

[[source]]
name = "stripe"
environment = "sandbox"
scheme = "stripe"
secrets_env = ["STRIPE_SECRET"]
event_key = { json = ["/id"] }
"#;

const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const STRIPE_SECRET: &str = "whsec_provider_library_test";

fn sign_with_library(
    scheme: &str,
    secret: &str,
    message_id: &str,
    body: &[u8],
) -> Vec<(String, String)> {
    let python = std::env::var("HOOKBOX_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/providers/sign.py");
    let mut child = std::process::Command::new(python)
        .args([script, scheme, secret, message_id])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python runs");
    child.stdin.take().unwrap().write_all(body).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the {scheme} library signed the payload"
    );
    let headers: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&output.stdout).unwrap();
    headers
        .into_iter()
        .map(|(k, v)| (k, v.as_str().unwrap().to_owned()))
        .collect()
}

/// A different last character that cannot decode to the same bytes.
fn flip_last_character(value: &str) -> String {
    let (head, last) = value.split_at(value.len() - 1);
    format!("{head}{}", if last == "0" { "1" } else { "0" })
}

#[tokio::test]
#[ignore = "needs the providers' Python packages; CI installs them"]
async fn providers_own_libraries_signatures_are_accepted_and_mangled_ones_refused() {
    let app = TestApp::spawn(
        CONFIG,
        &[("SW_SECRET", SW_SECRET), ("STRIPE_SECRET", STRIPE_SECRET)],
    )
    .await;
    for (source, library, secret) in [
        ("sw", "standardwebhooks", SW_SECRET),
        ("svix", "svix", SW_SECRET),
        ("stripe", "stripe", STRIPE_SECRET),
    ] {
        let id = format!("evt_{}", unique_uid());
        let body = format!(r#"{{"id":"{id}","type":"invoice.paid","data":{{"amount":1200}}}}"#)
            .into_bytes();
        let headers = sign_with_library(library, secret, &id, &body);
        let pairs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();

        let accepted = app.post(source, body.clone(), &pairs).await;
        assert_eq!(
            (accepted.status, accepted.body["status"].as_str()),
            (200, Some("accepted")),
            "{library}: {}",
            accepted.body
        );

        let mut tampered = body.clone();
        tampered.extend_from_slice(b" ");
        let refused = app.post(source, tampered, &pairs).await;
        assert_eq!(refused.status, 403, "{library}: a changed body is refused");

        let mangled: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| {
                let v = if k.to_ascii_lowercase().contains("signature") {
                    flip_last_character(v)
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect();
        let pairs: Vec<(&str, &str)> = mangled
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let refused = app.post(source, body, &pairs).await;
        assert_eq!(
            refused.status, 403,
            "{library}: a mangled signature is refused"
        );
    }
}
