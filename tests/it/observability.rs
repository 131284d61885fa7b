//! Metrics that agree with the tables, and logs that keep secrets.

use std::time::{Duration, Instant};

use crate::support::*;

/// The value of the series `name` whose labels include all of `labels`.
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .filter(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_after_a_scripted_run_match_the_rows_in_the_tables() {
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    let (source, handler) = (format!("m{suffix}"), format!("h{suffix}"));
    let text = format!(
        "{}\n[worker]\nadmin_listen = \"\"\n[[route]]\nsource = \"{source}\"\nhandler = \"{handler}\"\n\
         [handler.{handler}]\nkind = \"sql\"\nstatement = \"SELECT $3\"\n",
        BEGINI_CONFIG.replace("name = \"begini\"", &format!("name = \"{source}\""))
    );
    let app = TestApp::spawn(&text, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    let uid = format!("UID-{}", unique_uid());
    let first = begini_payload(&uid, "psychometric_score.complete");
    for body in [
        first.clone(),
        first.clone(),
        begini_payload(&unique_uid(), "application.complete"),
    ] {
        assert_eq!(app.post_signed(&source, &body).await.status, 200);
    }
    for _ in 0..2 {
        assert_eq!(
            app.post(&source, first.clone(), &[("X-Signature", "00")])
                .await
                .status,
            403
        );
    }
    assert_eq!(
        app.post_signed(&source, &vec![b'x'; 5000]).await.status,
        413
    );

    let config = config(&text, &[("BEGINI_API_KEY", BEGINI_KEY)]);
    let pool = hookbox::db::pool(&app.db.url, &hookbox::db::PoolSettings::worker(&config)).unwrap();
    let worker = hookbox::worker::Worker::from_config(&config, pool, Default::default()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while app
        .count("SELECT count(*) FROM inbox_events WHERE status <> 'succeeded'")
        .await
        > 0
        && Instant::now() < deadline
    {
        worker.process_next().await.unwrap();
    }

    let metrics = app
        .client
        .get(format!("{}/metrics", app.admin_address))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let outcomes: Vec<(String, i64)> =
        sqlx::query_as("SELECT outcome, count(*) FROM inbox_deliveries GROUP BY outcome")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(
        outcomes.len(),
        4,
        "accepted, duplicate, rejected_signature, too_large: {outcomes:?}"
    );
    for (outcome, rows) in &outcomes {
        let counted = sample(
            &metrics,
            "hookbox_deliveries_total",
            &[("source", &source), ("outcome", outcome)],
        );
        assert_eq!(counted, *rows as f64, "deliveries_total for {outcome}");
    }
    let mismatches = sample(
        &metrics,
        "hookbox_rejections_total",
        &[("source", &source), ("reason", "signature_mismatch")],
    );
    assert_eq!(mismatches, 2.0);
    let attempts = app
        .count("SELECT count(*) FROM inbox_attempts WHERE outcome = 'succeeded'")
        .await;
    let counted = sample(
        &metrics,
        "hookbox_attempts_total",
        &[("handler", &handler), ("outcome", "succeeded")],
    );
    assert_eq!(counted, attempts as f64);
    let timed = sample(
        &metrics,
        "hookbox_handler_seconds_count",
        &[("handler", &handler)],
    );
    assert_eq!(timed, attempts as f64, "one handler duration per attempt");
    assert!(
        sample(
            &metrics,
            "hookbox_ingest_seconds_count",
            &[("source", &source)]
        ) >= 3.0
    );
    assert!(metrics.contains("hookbox_db_pool_connections"));

    // The run's logs (receiver and worker) name events, never their contents.
    let logs = captured_logs();
    let worker_lines = logs
        .lines()
        .filter(|l| l.contains("attempt finished") && l.contains(&source))
        .count();
    assert_eq!(
        worker_lines, 2,
        "each processed event is logged by the worker with its source"
    );
    assert!(logs
        .lines()
        .filter(|l| l.contains("attempt finished") && l.contains(&source))
        .all(|l| l.contains("event_id")));
    assert_logs_never_contain(&[
        BEGINI_KEY,
        uid.as_str(),
        "12345678901234567890",
        "scored_at",
    ]);
}
