//! Every sender, every safeguard: TLS, environments, proxies, rotation, slow
//! clients, and a suite of malformed and hostile requests.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use hookbox::signature::{HmacParams, Scheme};

use crate::support::*;

const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const STRIPE_SECRET: &str = "whsec_stripe_test_3e1a";
const GITHUB_SECRET: &str = "It's a Secret to Everybody";
const HMAC_SECRET: &str = "custom-hmac-secret-77";

const SUITE_CONFIG: &str = r#"
[receiver]
listen = "127.0.0.1:0"
admin_listen = ""
request_timeout = "2s"
max_body_bytes = 4096

[[source]]
name = "begini"
environment = "sandbox"
scheme = "begini"
secrets_env = ["BEGINI_API_KEY"]

[[source]]
name = "begini-json"
environment = "sandbox"
scheme = "begini"
secrets_env = ["BEGINI_API_KEY"]
event_key = { json = ["/uid"] }

[[source]]
name = "sw"
environment = "sandbox"
scheme = "standard-webhooks"
secrets_env = ["SW_SECRET"]
event_key = { header = "webhook-id" }

[[source]]
name = "stripe"
environment = "sandbox"
scheme = "stripe"
secrets_env = ["STRIPE_SECRET"]

[[source]]
name = "github"
environment = "sandbox"
scheme = "github"
secrets_env = ["GITHUB_SECRET"]

[[source]]
name = "custom"
environment = "sandbox"
scheme = "hmac"
header = "X-Sig"
prefix = "sha256="
algorithm = "sha256"
encoding = "hex"
secrets_env = ["HMAC_SECRET"]
"#;

fn suite_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("BEGINI_API_KEY", BEGINI_KEY),
        ("SW_SECRET", SW_SECRET),
        ("STRIPE_SECRET", STRIPE_SECRET),
        ("GITHUB_SECRET", GITHUB_SECRET),
        ("HMAC_SECRET", HMAC_SECRET),
    ]
}

fn key(scheme: &Scheme, secret: &str) -> hookbox::secret::Secret {
    scheme.key_from_secret(secret).unwrap()
}

fn signed(scheme: &Scheme, secret: &str, body: &[u8], now: i64, id: &str) -> Vec<(String, String)> {
    scheme.sign(&key(scheme, secret), body, now, id)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    &headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .unwrap()
        .1
}

/// One hostile request and what the contract says must happen.
struct Case {
    name: &'static str,
    source: &'static str,
    body: Vec<u8>,
    headers: Vec<(String, String)>,
    status: u16,
    detail: Option<&'static str>,
    audit: Option<(&'static str, &'static str)>,
}

fn case(
    name: &'static str,
    source: &'static str,
    body: &[u8],
    headers: Vec<(String, String)>,
    status: u16,
) -> Case {
    Case {
        name,
        source,
        body: body.to_vec(),
        headers,
        status,
        detail: None,
        audit: None,
    }
}

impl Case {
    fn refused(mut self, reason: &'static str) -> Self {
        self.detail = Some("Validation Failure");
        self.audit = Some(("rejected_signature", reason));
        self
    }
    fn detail(mut self, detail: &'static str) -> Self {
        self.detail = Some(detail);
        self
    }
    fn audit(mut self, outcome: &'static str, reason: &'static str) -> Self {
        self.audit = Some((outcome, reason));
        self
    }
}

fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn hostile_cases() -> Vec<Case> {
    let now = chrono::Utc::now().timestamp();
    let json = br#"{"uid":"U-HOSTILE-1","type":"charge.succeeded","event":{"type":"application.complete"}}"#;
    let begini = signed(&Scheme::Begini, BEGINI_KEY, json, now, "");
    let begini_sig = header(&begini, "x-signature").to_owned();
    let sw = Scheme::StandardWebhooks;
    let sw_ok = signed(&sw, SW_SECRET, json, now, "msg_hostile");
    let sw_sig = header(&sw_ok, "webhook-signature").to_owned();
    let sw_with = |ts: &str, sig: &str| {
        h(&[
            ("webhook-id", "msg_hostile"),
            ("webhook-timestamp", ts),
            ("webhook-signature", sig),
        ])
    };
    let sw_old = signed(&sw, SW_SECRET, json, now - 600, "msg_hostile");
    let sw_new = signed(&sw, SW_SECRET, json, now + 600, "msg_hostile");
    let stripe_ok = signed(&Scheme::Stripe, STRIPE_SECRET, json, now, "");
    let stripe_v1 = header(&stripe_ok, "stripe-signature")
        .split("v1=")
        .nth(1)
        .unwrap()
        .to_owned();
    let stripe_old = signed(&Scheme::Stripe, STRIPE_SECRET, json, now - 600, "");
    let stripe_other = signed(&Scheme::Stripe, "whsec_someone_else", json, now, "");
    let github_ok = signed(&Scheme::Github, GITHUB_SECRET, json, now, "");
    let github_hex = header(&github_ok, "x-hub-signature-256")
        .trim_start_matches("sha256=")
        .to_owned();
    let hmac = Scheme::Hmac(HmacParams {
        header: "X-Sig".into(),
        prefix: "sha256=".into(),
        algorithm: hookbox::signature::Algorithm::Sha256,
        encoding: hookbox::signature::Encoding::Hex,
    });
    let hmac_ok = signed(&hmac, HMAC_SECRET, json, now, "");
    let hmac_hex = header(&hmac_ok, "x-sig")
        .trim_start_matches("sha256=")
        .to_owned();
    let sha512_of_body = signed(&Scheme::Begini, GITHUB_SECRET, json, now, "");
    let sign_begini = |body: &[u8]| signed(&Scheme::Begini, BEGINI_KEY, body, now, "");
    let deep: Vec<u8> = format!("{}{}", "[".repeat(300), "]".repeat(300)).into_bytes();
    let invalid_utf8 = b"{\"uid\":\"\xff\xfe\"}".to_vec();
    let nul_json =
        br#"{"uid":"U-NUL-1","event":{"type":"application.complete"},"note":"a\u0000b"}"#;
    let other_body_sig = header(&sign_begini(b"{}"), "x-signature").to_owned();

    vec![
        // begini
        case("begini: no signature header", "begini", json, vec![], 403).refused("missing_header"),
        case(
            "begini: empty signature",
            "begini",
            json,
            h(&[("X-Signature", "")]),
            403,
        )
        .refused("malformed_header"),
        case(
            "begini: not hex",
            "begini",
            json,
            h(&[("X-Signature", &"zz".repeat(64))]),
            403,
        )
        .refused("malformed_header"),
        case(
            "begini: truncated",
            "begini",
            json,
            h(&[("X-Signature", &begini_sig[..64])]),
            403,
        )
        .refused("signature_mismatch"),
        case(
            "begini: extended",
            "begini",
            json,
            h(&[("X-Signature", &format!("{begini_sig}00"))]),
            403,
        )
        .refused("signature_mismatch"),
        case(
            "begini: odd-length hex",
            "begini",
            json,
            h(&[("X-Signature", &begini_sig[..127])]),
            403,
        )
        .refused("malformed_header"),
        case(
            "begini: prefixed like github",
            "begini",
            json,
            h(&[("X-Signature", &format!("sha512={begini_sig}"))]),
            403,
        )
        .refused("malformed_header"),
        case(
            "begini: signature of another body",
            "begini",
            json,
            h(&[("X-Signature", &other_body_sig)]),
            403,
        )
        .refused("signature_mismatch"),
        case(
            "begini: sha512 under another key",
            "begini",
            json,
            h(&[("X-Signature", header(&sha512_of_body, "x-signature"))]),
            403,
        )
        .refused("signature_mismatch"),
        case(
            "begini: header sent twice",
            "begini",
            json,
            h(&[("X-Signature", &begini_sig), ("X-Signature", &begini_sig)]),
            403,
        )
        .refused("duplicate_header"),
        case(
            "begini: body with a trailing newline",
            "begini",
            &[json.as_slice(), b"\n"].concat(),
            h(&[("X-Signature", &begini_sig)]),
            403,
        )
        .refused("signature_mismatch"),
        // standard-webhooks
        case(
            "sw: no id",
            "sw",
            json,
            h(&[
                ("webhook-timestamp", &now.to_string()),
                ("webhook-signature", &sw_sig),
            ]),
            403,
        )
        .refused("missing_header"),
        case(
            "sw: no timestamp",
            "sw",
            json,
            h(&[
                ("webhook-id", "msg_hostile"),
                ("webhook-signature", &sw_sig),
            ]),
            403,
        )
        .refused("missing_header"),
        case(
            "sw: no signature",
            "sw",
            json,
            h(&[
                ("webhook-id", "msg_hostile"),
                ("webhook-timestamp", &now.to_string()),
            ]),
            403,
        )
        .refused("missing_header"),
        case(
            "sw: timestamp not a number",
            "sw",
            json,
            sw_with("abc", &sw_sig),
            403,
        )
        .refused("malformed_timestamp"),
        case(
            "sw: negative timestamp",
            "sw",
            json,
            sw_with("-5", &sw_sig),
            403,
        )
        .refused("malformed_timestamp"),
        case(
            "sw: timestamp in milliseconds",
            "sw",
            json,
            sw_with(&(now * 1000).to_string(), &sw_sig),
            403,
        )
        .refused("malformed_timestamp"),
        case("sw: timestamp too old", "sw", json, sw_old, 403).refused("timestamp_too_old"),
        case("sw: timestamp too new", "sw", json, sw_new, 403).refused("timestamp_too_new"),
        case(
            "sw: bare v1,",
            "sw",
            json,
            sw_with(&now.to_string(), "v1,"),
            403,
        )
        .refused("malformed_header"),
        case(
            "sw: only a v2 signature",
            "sw",
            json,
            sw_with(&now.to_string(), &sw_sig.replace("v1,", "v2,")),
            403,
        )
        .refused("malformed_header"),
        case(
            "sw: signature not base64",
            "sw",
            json,
            sw_with(&now.to_string(), "v1,!!!notbase64!!!"),
            403,
        )
        .refused("malformed_header"),
        case(
            "sw: truncated signature",
            "sw",
            json,
            sw_with(&now.to_string(), &sw_sig[..20]),
            403,
        )
        .refused("malformed_header"),
        case(
            "sw: signature made for another id",
            "sw",
            json,
            h(&[
                ("webhook-id", "msg_other"),
                ("webhook-timestamp", &now.to_string()),
                ("webhook-signature", &sw_sig),
            ]),
            403,
        )
        .refused("signature_mismatch"),
        // stripe
        case("stripe: no header", "stripe", json, vec![], 403).refused("missing_header"),
        case(
            "stripe: no t=",
            "stripe",
            json,
            h(&[("Stripe-Signature", &format!("v1={stripe_v1}"))]),
            403,
        )
        .refused("malformed_header"),
        case(
            "stripe: no v1=",
            "stripe",
            json,
            h(&[("Stripe-Signature", &format!("t={now},v0={stripe_v1}"))]),
            403,
        )
        .refused("malformed_header"),
        case(
            "stripe: t not a number",
            "stripe",
            json,
            h(&[("Stripe-Signature", &format!("t=soon,v1={stripe_v1}"))]),
            403,
        )
        .refused("malformed_timestamp"),
        case(
            "stripe: two t=",
            "stripe",
            json,
            h(&[(
                "Stripe-Signature",
                &format!("t={now},t={now},v1={stripe_v1}"),
            )]),
            403,
        )
        .refused("malformed_header"),
        case(
            "stripe: garbage",
            "stripe",
            json,
            h(&[("Stripe-Signature", "nonsense")]),
            403,
        )
        .refused("malformed_header"),
        case(
            "stripe: signed with another secret",
            "stripe",
            json,
            stripe_other,
            403,
        )
        .refused("signature_mismatch"),
        case("stripe: too old", "stripe", json, stripe_old, 403).refused("timestamp_too_old"),
        // github
        case("github: no header", "github", json, vec![], 403).refused("missing_header"),
        case(
            "github: sha1 header only",
            "github",
            json,
            h(&[("X-Hub-Signature", "sha1=0123")]),
            403,
        )
        .refused("missing_header"),
        case(
            "github: sha1= prefix",
            "github",
            json,
            h(&[("X-Hub-Signature-256", &format!("sha1={github_hex}"))]),
            403,
        )
        .refused("malformed_header"),
        case(
            "github: empty after prefix",
            "github",
            json,
            h(&[("X-Hub-Signature-256", "sha256=")]),
            403,
        )
        .refused("malformed_header"),
        case(
            "github: no prefix",
            "github",
            json,
            h(&[("X-Hub-Signature-256", &github_hex)]),
            403,
        )
        .refused("malformed_header"),
        // hmac
        case(
            "hmac: missing prefix",
            "custom",
            json,
            h(&[("X-Sig", &hmac_hex)]),
            403,
        )
        .refused("malformed_header"),
        case(
            "hmac: wrong prefix",
            "custom",
            json,
            h(&[("X-Sig", &format!("sha512={hmac_hex}"))]),
            403,
        )
        .refused("malformed_header"),
        case(
            "hmac: base64 where hex is expected",
            "custom",
            json,
            h(&[("X-Sig", "sha256=q83vEjRWeJA=")]),
            403,
        )
        .refused("malformed_header"),
        // payloads
        case(
            "not JSON where the key needs it",
            "begini-json",
            b"{",
            sign_begini(b"{"),
            400,
        )
        .detail("payload is not valid JSON")
        .audit("rejected_payload", "invalid_json"),
        case(
            "invalid UTF-8",
            "begini-json",
            &invalid_utf8,
            sign_begini(&invalid_utf8),
            400,
        )
        .detail("payload is not valid JSON")
        .audit("rejected_payload", "invalid_json"),
        case(
            "nesting deeper than JSON parsing allows",
            "begini-json",
            &deep,
            sign_begini(&deep),
            400,
        )
        .detail("payload is not valid JSON")
        .audit("rejected_payload", "invalid_json"),
        case(
            "key field missing",
            "begini-json",
            b"{\"x\":1}",
            sign_begini(b"{\"x\":1}"),
            400,
        )
        .detail("event key field /uid is missing")
        .audit("rejected_payload", "missing_event_key"),
        case(
            "key field null",
            "begini-json",
            b"{\"uid\":null}",
            sign_begini(b"{\"uid\":null}"),
            400,
        )
        .detail("event key field /uid is missing")
        .audit("rejected_payload", "missing_event_key"),
        case(
            "empty body where the type needs JSON",
            "begini",
            b"",
            sign_begini(b""),
            400,
        )
        .detail("payload is not valid JSON")
        .audit("rejected_payload", "invalid_json"),
        case(
            "a NUL escape PostgreSQL's jsonb cannot hold",
            "begini-json",
            nul_json,
            sign_begini(nul_json),
            200,
        )
        .audit("accepted", ""),
        case(
            "body one byte over the limit",
            "begini",
            &[b' '; 4097],
            sign_begini(&[b' '; 4097]),
            413,
        )
        .detail("Payload Too Large")
        .audit("too_large", "body_too_large"),
        case("unknown source", "nobody", json, vec![], 404).detail("Not Found"),
    ]
}

#[tokio::test]
async fn hostile_and_malformed_requests_get_their_exact_status_body_and_audit_row() {
    let env = suite_env();
    let app = TestApp::spawn(SUITE_CONFIG, &env).await;
    let cases = hostile_cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let before: i64 = app
            .count("SELECT coalesce(max(id), 0) FROM inbox_deliveries")
            .await;
        let headers: Vec<(&str, &str)> = case
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let answer = app.post(case.source, case.body.clone(), &headers).await;
        let rows: Vec<(String, Option<String>, i32)> = sqlx::query_as(
            "SELECT outcome, reason, status_code FROM inbox_deliveries WHERE id > $1 ORDER BY id",
        )
        .bind(before)
        .fetch_all(&app.db.pool)
        .await
        .unwrap();
        let expected_rows: Vec<(String, Option<String>, i32)> = case
            .audit
            .iter()
            .map(|(outcome, reason)| {
                let reason = (!reason.is_empty()).then(|| reason.to_string());
                (outcome.to_string(), reason, i32::from(case.status))
            })
            .collect();
        let detail_ok = case
            .detail
            .is_none_or(|d| answer.body == serde_json::json!({ "detail": d }));
        if answer.status != case.status
            || !detail_ok
            || rows != expected_rows
            || answer.status >= 500
        {
            failures.push(format!(
                "{}: got {} {} with rows {rows:?}; expected {} {:?} with rows {expected_rows:?}",
                case.name, answer.status, answer.body, case.status, case.detail
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert_logs_never_contain(&[
        BEGINI_KEY,
        SW_SECRET,
        STRIPE_SECRET,
        GITHUB_SECRET,
        HMAC_SECRET,
        "U-HOSTILE-1",
        "U-NUL-1",
    ]);
}

/// Sends raw bytes and returns the status line's code and the body, or None
/// if the server closed the connection without an answer.
fn raw_request(port: u16, request: &[u8]) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(request);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Some((status, body))
}

fn port_of(app: &TestApp) -> u16 {
    app.address.rsplit(':').next().unwrap().parse().unwrap()
}

/// A name, the raw request, the statuses allowed, and the body's detail if fixed.
type RawCase = (&'static str, Vec<u8>, &'static [u16], Option<&'static str>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_protocol_tricks_never_get_a_server_error() {
    let app = TestApp::spawn(SUITE_CONFIG, &suite_env()).await;
    let port = port_of(&app);
    let now = chrono::Utc::now().timestamp();
    let chunk = vec![b'a'; 3000];
    let sig = header(
        &signed(
            &Scheme::Begini,
            BEGINI_KEY,
            &[chunk.clone(), chunk.clone()].concat(),
            now,
            "",
        ),
        "x-signature",
    )
    .to_owned();
    let mut chunked = format!(
        "POST /webhooks/begini HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\nX-Signature: {sig}\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..2 {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(&chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let huge_header = format!("POST /webhooks/begini HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: {}\r\nContent-Length: 0\r\n\r\n", "a".repeat(256 * 1024));
    let cases: Vec<RawCase> = vec![
        ("chunked body over the limit", chunked, &[413], Some("Payload Too Large")),
        ("a 256 KiB header", huge_header.into_bytes(), &[431, 400], None),
        ("path traversal", b"POST /webhooks/../webhooks/begini HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".to_vec(), &[404, 403], None),
        ("a sub-path of a source", b"POST /webhooks/begini/extra HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".to_vec(), &[404], Some("Not Found")),
        ("an empty source", b"POST /webhooks/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".to_vec(), &[404], Some("Not Found")),
        ("an encoded slash in the source", b"POST /webhooks/beg%2Fini HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".to_vec(), &[404], Some("Not Found")),
        ("a source with a NUL", b"POST /webhooks/begini%00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".to_vec(), &[404], Some("Not Found")),
        ("content-length larger than the body sent", b"POST /webhooks/nobody HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 10\r\n\r\n{}".to_vec(), &[404], Some("Not Found")),
        ("garbage instead of HTTP", b"\x16\x03\x01\x00\xa5garbage\r\n\r\n".to_vec(), &[400], None),
    ];
    for (name, request, statuses, detail) in cases {
        let answer = tokio::task::spawn_blocking(move || raw_request(port, &request))
            .await
            .unwrap();
        if let Some((status, body)) = answer {
            assert!(statuses.contains(&status), "{name}: got {status} {body}");
            if let Some(detail) = detail {
                assert_eq!(
                    serde_json::from_str::<serde_json::Value>(&body).ok(),
                    Some(serde_json::json!({"detail": detail})),
                    "{name}"
                );
            }
        } else {
            assert!(detail.is_none(), "{name}: closed without an answer");
        }
    }
    assert_eq!(app.count("SELECT count(*) FROM inbox_events").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_cannot_hold_a_connection_past_the_request_timeout() {
    let app = TestApp::spawn(SUITE_CONFIG, &suite_env()).await;
    let port = port_of(&app);
    let started = Instant::now();
    // Headers never finish: the connection is dropped after request_timeout (2s).
    let closed = tokio::task::spawn_blocking(move || {
        raw_request(port, b"POST /webhooks/begini HTTP/1.1\r\nHost: x\r\n")
    })
    .await
    .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "the server hung up on the slow client"
    );
    if let Some((status, _)) = closed {
        assert_eq!(status, 408);
    }
    // A body that never finishes arriving.
    let started = Instant::now();
    let answer = tokio::task::spawn_blocking(move || {
        raw_request(port, b"POST /webhooks/begini HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nX-Signature: 00\r\n\r\n{")
    })
    .await
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(9));
    assert_eq!(answer.map(|(status, _)| status), Some(408));
}

#[tokio::test]
async fn a_signature_made_with_the_other_environments_key_is_diagnosed() {
    let config = r#"
[receiver]
listen = "127.0.0.1:0"
admin_listen = ""
tls_terminated_by_proxy = true

[[source]]
name = "begini"
environment = "production"
scheme = "begini"
secrets_env = ["LIVE_KEY"]

[[source]]
name = "begini-sandbox"
environment = "sandbox"
scheme = "begini"
secrets_env = ["SANDBOX_KEY"]
"#;
    let app = TestApp::spawn(
        config,
        &[
            ("LIVE_KEY", "live-key-number-one-0001"),
            ("SANDBOX_KEY", "sandbox-key-number-one-01"),
        ],
    )
    .await;
    let body = begini_payload(&unique_uid(), "application.complete");
    let with_sandbox_key = signed(&Scheme::Begini, "sandbox-key-number-one-01", &body, 0, "");

    let answer = app
        .post(
            "begini",
            body.clone(),
            &[("X-Signature", header(&with_sandbox_key, "x-signature"))],
        )
        .await;

    assert_eq!(answer.status, 403);
    assert_eq!(
        answer.body,
        serde_json::json!({"detail": "Validation Failure"})
    );
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_deliveries WHERE reason = 'wrong_environment'")
            .await,
        1
    );
    assert!(captured_logs().contains("another environment"));
    assert_eq!(
        app.post_signed("begini-sandbox", &body).await.status,
        200,
        "the sandbox source takes it"
    );
}

#[tokio::test]
async fn during_rotation_both_keys_verify() {
    let config = BEGINI_CONFIG.replace(
        "secrets_env = [\"BEGINI_API_KEY\"]",
        "secrets_env = [\"NEW_KEY\", \"OLD_KEY\"]",
    );
    let app = TestApp::spawn(
        &config,
        &[
            ("NEW_KEY", "new-key-number-two-00002"),
            ("OLD_KEY", "old-key-number-one-00001"),
        ],
    )
    .await;
    for key in ["new-key-number-two-00002", "old-key-number-one-00001"] {
        let body = begini_payload(&unique_uid(), "application.complete");
        let headers = signed(&Scheme::Begini, key, &body, 0, "");
        let answer = app
            .post(
                "begini",
                body,
                &[("X-Signature", header(&headers, "x-signature"))],
            )
            .await;
        assert_eq!(answer.status, 200, "{key}");
    }
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let trusted = BEGINI_CONFIG
        .replace(
            "request_timeout",
            "trusted_proxies = [\"127.0.0.1\"]\nrequest_timeout",
        )
        .replace(
            "scheme = \"begini\"",
            "scheme = \"begini\"\nallow_ips = [\"203.0.113.0/24\"]",
        );
    let app = TestApp::spawn(&trusted, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    let app = &app;
    let send = |xff: &'static str| {
        let body = begini_payload(&unique_uid(), "application.complete");
        let signature = header(&app.sign("begini", &body), "x-signature").to_owned();
        async move {
            app.post(
                "begini",
                body,
                &[("X-Signature", &signature), ("X-Forwarded-For", xff)],
            )
            .await
            .status
        }
    };
    assert_eq!(send("203.0.113.7").await, 200);
    assert_eq!(send("198.51.100.1").await, 403);
    assert_eq!(
        send("203.0.113.9, 198.51.100.1").await,
        403,
        "the right-most untrusted hop is the client"
    );
    assert_eq!(app.count("SELECT count(*) FROM inbox_deliveries WHERE remote_addr = '203.0.113.7' AND outcome = 'accepted'").await, 1);

    let untrusted = BEGINI_CONFIG.replace(
        "scheme = \"begini\"",
        "scheme = \"begini\"\nallow_ips = [\"203.0.113.0/24\"]",
    );
    let direct = TestApp::spawn(&untrusted, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    let body = begini_payload(&unique_uid(), "application.complete");
    let signature = header(&direct.sign("begini", &body), "x-signature").to_owned();
    let spoofed = direct
        .post(
            "begini",
            body,
            &[
                ("X-Signature", &signature),
                ("X-Forwarded-For", "203.0.113.7"),
            ],
        )
        .await;
    assert_eq!(
        spoofed.status, 403,
        "a spoofed X-Forwarded-For from an untrusted peer is ignored"
    );
}

fn tls_files(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = certified.cert.pem();
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    (cert, key, cert_pem)
}

#[tokio::test]
async fn tls_1_3_clients_are_served_and_tls_1_2_clients_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, cert_pem) = tls_files(dir.path());
    let config = format!(
        "[receiver]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\ntls = {{ cert_file = \"{}\", key_file = \"{}\" }}\n\n\
         [[source]]\nname = \"begini\"\nenvironment = \"production\"\nscheme = \"begini\"\nsecrets_env = [\"BEGINI_API_KEY\"]\n",
        cert.display(),
        key.display()
    );
    let app = TestApp::spawn(&config, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    let port = port_of(&app);
    let client = |max: reqwest::tls::Version| {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
            .resolve("localhost", ([127, 0, 0, 1], port).into())
            .max_tls_version(max)
            .build()
            .unwrap()
    };
    let body = begini_payload(&unique_uid(), "application.complete");
    let signature = header(&app.sign("begini", &body), "x-signature").to_owned();
    let url = format!("https://localhost:{port}/webhooks/begini");

    let modern = client(reqwest::tls::Version::TLS_1_3)
        .post(&url)
        .header("X-Signature", &signature)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(modern.status().as_u16(), 200);

    let old = client(reqwest::tls::Version::TLS_1_2)
        .post(&url)
        .header("X-Signature", &signature)
        .body(body)
        .send()
        .await;
    assert!(old.is_err(), "a TLS 1.2-only client cannot connect");
}

#[test]
fn production_on_plain_http_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hookbox.toml");
    std::fs::write(&path, BEGINI_CONFIG.replace("sandbox", "production")).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hookbox-receiver"))
        .arg("--config")
        .arg(&path)
        .env("BEGINI_API_KEY", BEGINI_KEY)
        .env("DATABASE_URL", "postgres://127.0.0.1:1/none")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("receiver.tls") && stderr.contains("tls_terminated_by_proxy"),
        "{stderr}"
    );
}
