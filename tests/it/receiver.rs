//! The receiver's HTTP contract, row by row, against a real PostgreSQL.

use crate::support::*;

fn hmac_sha512_hex(key: &str, body: &[u8]) -> String {
    // Exactly Begini's Python sample: hmac.new(key, raw_body, sha512).hexdigest()
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha512>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[tokio::test]
async fn begini_signed_delivery_is_accepted_and_stored() {
    let app = TestApp::begini().await;
    let body = begini_payload(&unique_uid(), "psychometric_score.complete");
    let signature = hmac_sha512_hex(BEGINI_KEY, &body);

    let answer = app
        .post(
            "begini",
            body.clone(),
            &[
                ("X-Signature", &signature),
                ("Content-Type", "application/json"),
            ],
        )
        .await;

    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["status"], "accepted");
    let id = answer.event_id();
    let row = sqlx::query!(
        r#"SELECT source AS "source!", environment AS "environment!", event_type, status AS "status!",
                  attempts AS "attempts!", payload, payload_json IS NOT NULL AS has_json, headers
           FROM inbox_events WHERE id = $1"#,
        id
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        (row.source.as_str(), row.environment.as_str()),
        ("begini", "sandbox")
    );
    assert_eq!(
        row.event_type.as_deref(),
        Some("psychometric_score.complete")
    );
    assert_eq!((row.status.as_str(), row.attempts), ("pending", 0));
    assert_eq!(
        row.payload.as_deref(),
        Some(body.as_slice()),
        "the exact bytes are kept"
    );
    assert_eq!(row.has_json, Some(true));
    let headers = row.headers.unwrap();
    assert!(
        headers.get("x-signature").is_none(),
        "signatures are not stored"
    );
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(app.count("SELECT count(*) FROM inbox_deliveries WHERE outcome = 'accepted' AND status_code = 200").await, 1);
}

#[tokio::test]
async fn a_json_payload_is_stored_once_and_still_reads_as_json() {
    let app = TestApp::begini().await;
    let uid = unique_uid();
    let body = begini_payload(&uid, "psychometric_score.complete");

    let id = app.post_signed("begini", &body).await.event_id();

    let stored = sqlx::query!(
        r#"SELECT payload, payload_json IS NULL AS "json_not_stored!", payload_is_json
           FROM inbox_payloads WHERE event_id = $1"#,
        id
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(stored.payload.as_deref(), Some(body.as_slice()));
    assert!(stored.json_not_stored, "the bytes are the one copy");
    assert!(stored.payload_is_json);
    let read = sqlx::query!(
        r#"SELECT payload_json ->> 'uid' AS uid, payload_json -> 'event' ->> 'type' AS kind
           FROM inbox_events WHERE id = $1 AND payload_json @> '{"event": {"type": "psychometric_score.complete"}}'"#,
        id
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        (read.uid.as_deref(), read.kind.as_deref()),
        (Some(uid.as_str()), Some("psychometric_score.complete"))
    );
}

#[tokio::test]
async fn json_that_jsonb_cannot_hold_keeps_its_bytes_without_payload_json() {
    let app = TestApp::begini().await;
    // A NUL character, and numbers beyond what PostgreSQL's numeric holds
    // (16,383 digits after the point; an exponent in its range).
    for extra in [r#""a\u0000b""#, "1e-20000", "0e99999999999"] {
        let body = format!(
            r#"{{"uid":"{}","event":{{"type":"application.complete"}},"note":{extra}}}"#,
            unique_uid()
        )
        .into_bytes();

        let answer = app.post_signed("begini", &body).await;

        assert_eq!(answer.status, 200, "{}", answer.body);
        let row = sqlx::query!(
            r#"SELECT e.payload, e.payload_json IS NULL AS "no_json!", p.payload_is_json
               FROM inbox_events e JOIN inbox_payloads p ON p.event_id = e.id WHERE e.id = $1"#,
            answer.event_id()
        )
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
        assert_eq!(row.payload.as_deref(), Some(body.as_slice()));
        assert!(row.no_json, "{extra}");
        assert!(!row.payload_is_json, "{extra}");
    }
}

#[tokio::test]
async fn duplicate_delivery_is_acknowledged_but_not_stored_twice() {
    let app = TestApp::begini().await;
    let body = begini_payload(&unique_uid(), "application.complete");

    let first = app.post_signed("begini", &body).await;
    let second = app.post_signed("begini", &body).await;

    assert_eq!((first.status, second.status), (200, 200));
    assert_eq!(second.body["status"], "duplicate");
    assert_eq!(first.event_id(), second.event_id());
    assert_eq!(app.count("SELECT count(*) FROM inbox_events").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM inbox_deliveries").await, 2);
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_deliveries WHERE outcome = 'duplicate'")
            .await,
        1
    );
}

#[tokio::test]
async fn same_key_with_a_different_payload_is_a_conflict_and_keeps_the_first() {
    let config = BEGINI_CONFIG.replace(
        "secrets_env = [\"BEGINI_API_KEY\"]",
        "secrets_env = [\"BEGINI_API_KEY\"]\nevent_key = { json = [\"/integration_id\", \"/uid\", \"/event/type\"] }",
    );
    let app = TestApp::spawn(&config, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    let uid = unique_uid();
    let first_body = begini_payload(&uid, "application.complete");
    let second_body = String::from_utf8(first_body.clone())
        .unwrap()
        .replace("1644397637", "1644399999");

    let first = app.post_signed("begini", &first_body).await;
    let second = app.post_signed("begini", second_body.as_bytes()).await;

    assert_eq!(second.status, 200);
    assert_eq!(second.body["status"], "conflict");
    assert_eq!(second.event_id(), first.event_id());
    let stored: Vec<u8> = sqlx::query_scalar!("SELECT payload FROM inbox_events")
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored, first_body);
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_deliveries WHERE outcome = 'conflict'")
            .await,
        1
    );
}

#[tokio::test]
async fn a_one_character_change_in_the_signature_is_refused_and_audited() {
    let app = TestApp::begini().await;
    let body = begini_payload(&unique_uid(), "application.complete");
    let mut signature = hmac_sha512_hex(BEGINI_KEY, &body);
    let last = if signature.ends_with('0') { "1" } else { "0" };
    signature.replace_range(signature.len() - 1.., last);

    let answer = app
        .post("begini", body, &[("X-Signature", &signature)])
        .await;

    assert_eq!(answer.status, 403);
    assert_eq!(
        answer.body,
        serde_json::json!({"detail": "Validation Failure"})
    );
    assert_eq!(app.count("SELECT count(*) FROM inbox_events").await, 0);
    let reason: Option<String> = sqlx::query_scalar!("SELECT reason FROM inbox_deliveries WHERE outcome = 'rejected_signature' AND status_code = 403")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(reason.as_deref(), Some("signature_mismatch"));
}

#[tokio::test]
async fn a_body_reserialised_with_different_spacing_fails_verification() {
    let app = TestApp::begini().await;
    let body = begini_payload(&unique_uid(), "application.complete");
    let signature = hmac_sha512_hex(BEGINI_KEY, &body);
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let respaced = serde_json::to_vec_pretty(&value).unwrap();

    let answer = app
        .post("begini", respaced, &[("X-Signature", &signature)])
        .await;

    assert_eq!(answer.status, 403);
    assert_eq!(answer.body["detail"], "Validation Failure");
}

#[tokio::test]
async fn missing_empty_and_truncated_signatures_are_refused_with_their_reasons() {
    let app = TestApp::begini().await;
    let body = begini_payload(&unique_uid(), "application.complete");
    let full = hmac_sha512_hex(BEGINI_KEY, &body);
    let cases: [(&[(&str, &str)], &str); 3] = [
        (&[], "missing_header"),
        (&[("X-Signature", "")], "malformed_header"),
        (&[("X-Signature", &full[..64])], "signature_mismatch"),
    ];
    for (headers, reason) in cases {
        let answer = app.post("begini", body.clone(), headers).await;
        assert_eq!(answer.status, 403, "{reason}");
        assert_eq!(answer.body["detail"], "Validation Failure");
        let found = app
            .count(&format!("SELECT count(*) FROM inbox_deliveries WHERE outcome = 'rejected_signature' AND reason = '{reason}'"))
            .await;
        assert_eq!(found, 1, "{reason}");
    }
}

#[tokio::test]
async fn an_unknown_source_is_not_found_and_writes_nothing() {
    let app = TestApp::begini().await;
    let answer = app.post("nobody", b"{}".to_vec(), &[]).await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.body, serde_json::json!({"detail": "Not Found"}));
    assert_eq!(app.count("SELECT count(*) FROM inbox_deliveries").await, 0);
}

#[tokio::test]
async fn an_address_outside_allow_ips_is_forbidden_and_audited() {
    let config = BEGINI_CONFIG.replace(
        "scheme = \"begini\"",
        "scheme = \"begini\"\nallow_ips = [\"192.0.2.0/24\"]",
    );
    let app = TestApp::spawn(&config, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    let answer = app
        .post_signed(
            "begini",
            &begini_payload(&unique_uid(), "application.complete"),
        )
        .await;
    assert_eq!(answer.status, 403);
    assert_eq!(answer.body, serde_json::json!({"detail": "Forbidden"}));
    assert_eq!(app.count("SELECT count(*) FROM inbox_deliveries WHERE outcome = 'rejected_ip' AND remote_addr = '127.0.0.1'").await, 1);
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_and_audited() {
    let app = TestApp::begini().await;
    let body = vec![b'x'; 4097];
    let answer = app.post_signed("begini", &body).await;
    assert_eq!(answer.status, 413);
    assert_eq!(
        answer.body,
        serde_json::json!({"detail": "Payload Too Large"})
    );
    assert_eq!(app.count("SELECT count(*) FROM inbox_deliveries WHERE outcome = 'too_large' AND status_code = 413").await, 1);
    let padding = "x".repeat(4096 - r#"{"pad":""}"#.len());
    let exactly_at_limit = format!(r#"{{"pad":"{padding}"}}"#);
    assert_eq!(exactly_at_limit.len(), 4096);
    let at_limit = app.post_signed("begini", exactly_at_limit.as_bytes()).await;
    assert_eq!(at_limit.status, 200, "exactly max_body_bytes is accepted");
}

#[tokio::test]
async fn a_payload_that_is_not_json_where_the_key_needs_json_is_a_bad_request() {
    let config = BEGINI_CONFIG.replace(
        "secrets_env = [\"BEGINI_API_KEY\"]",
        "secrets_env = [\"BEGINI_API_KEY\"]\nevent_key = { json = [\"/uid\"] }",
    );
    let app = TestApp::spawn(&config, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;

    let not_json = app.post_signed("begini", b"uid=SECRET-UID-1").await;
    assert_eq!(not_json.status, 400);
    assert_eq!(
        not_json.body,
        serde_json::json!({"detail": "payload is not valid JSON"})
    );

    let no_key = app
        .post_signed("begini", br#"{"event":{"type":"application.complete"}}"#)
        .await;
    assert_eq!(no_key.status, 400);
    assert_eq!(
        no_key.body,
        serde_json::json!({"detail": "event key field /uid is missing"})
    );
    assert_eq!(app.count("SELECT count(*) FROM inbox_deliveries WHERE outcome = 'rejected_payload' AND status_code = 400").await, 2);
    assert_eq!(app.count("SELECT count(*) FROM inbox_events").await, 0);
}

#[tokio::test]
async fn over_the_rate_limit_is_too_many_requests_with_retry_after() {
    let config = BEGINI_CONFIG.replace(
        "scheme = \"begini\"",
        "scheme = \"begini\"\nrate_limit = { per_second = 1, burst = 2 }",
    );
    let app = TestApp::spawn(&config, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..4 {
        let answer = app
            .post_signed(
                "begini",
                &begini_payload(&unique_uid(), "application.complete"),
            )
            .await;
        statuses.push(answer.status);
        if answer.status == 429 {
            limited = Some(answer);
        }
    }
    assert_eq!(&statuses[..2], &[200, 200]);
    let limited = limited.expect("a 429 after the burst");
    assert_eq!(
        limited.body,
        serde_json::json!({"detail": "Too Many Requests"})
    );
    let retry_after: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_deliveries").await,
        2,
        "rate-limited requests leave no audit rows"
    );
}

#[tokio::test]
async fn wrong_method_and_unknown_paths_get_json_errors() {
    let app = TestApp::begini().await;
    let get = app
        .client
        .get(format!("{}/webhooks/begini", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status().as_u16(), 405);
    let body: serde_json::Value = serde_json::from_str(&get.text().await.unwrap()).unwrap();
    assert_eq!(body["detail"], "Method Not Allowed");
    let other = app
        .client
        .post(format!("{}/elsewhere", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status().as_u16(), 404);
}

#[tokio::test]
async fn health_and_readiness_answer_while_the_database_does() {
    let app = TestApp::begini().await;
    let health = app
        .client
        .get(format!("{}/healthz", app.address))
        .send()
        .await
        .unwrap();
    let ready = app.readiness().await;
    assert_eq!((health.status().as_u16(), ready), (200, 200));
}

#[tokio::test]
async fn metrics_are_served_on_the_admin_port_only() {
    let app = TestApp::begini().await;
    app.post_signed(
        "begini",
        &begini_payload(&unique_uid(), "application.complete"),
    )
    .await;
    let metrics = app
        .client
        .get(format!("{}/metrics", app.admin_address))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("hookbox_deliveries_total"), "{metrics}");
    let public = app
        .client
        .get(format!("{}/metrics", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(public.status().as_u16(), 404);
}

#[tokio::test]
async fn no_log_line_carries_the_secret_the_payload_or_the_uid() {
    let secret = format!("log-test-key-{}", unique_uid());
    let app = TestApp::spawn(BEGINI_CONFIG, &[("BEGINI_API_KEY", &secret)]).await;
    let uid = format!("UID-{}", unique_uid());
    let body = begini_payload(&uid, "psychometric_score.complete");

    assert_eq!(app.post_signed("begini", &body).await.status, 200);
    assert_eq!(app.post_signed("begini", &body).await.status, 200);
    let bad = app
        .post("begini", body.clone(), &[("X-Signature", "00")])
        .await;
    assert_eq!(bad.status, 403);
    assert!(!bad.body.to_string().contains(&uid));

    let logs = captured_logs();
    assert!(
        logs.contains("delivery stored"),
        "the test captured the receiver's logs"
    );
    assert_logs_never_contain(&[
        secret.as_str(),
        uid.as_str(),
        "12345678901234567890",
        "scored_at",
    ]);
}
