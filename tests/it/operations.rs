//! Operating hookbox: status, events, the audit queries, replay, prune, import.

use std::{
    path::PathBuf,
    process::{Command, Output},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use hookbox::worker::{LibraryHandlers, Worker};
use uuid::Uuid;

use crate::support::*;

const FLAKY: &str = r#"
CREATE FUNCTION flaky(event uuid, attempt int) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF attempt < 3 THEN RAISE EXCEPTION 'downstream not ready'; END IF;
END $$"#;

fn history_config() -> String {
    format!(
        "{}\n[worker]\nconcurrency = 8\nlease = \"30s\"\n\
         retry = {{ max_attempts = 3, initial = \"50ms\", max = \"200ms\", multiplier = 2.0, jitter = 0.0 }}\n\
         [[route]]\nsource = \"begini\"\nevent_types = [\"*_score.complete\"]\nhandler = \"scores\"\n\
         [[route]]\nsource = \"begini\"\nevent_types = [\"application.expired\"]\nhandler = \"flaky\"\n\
         [[route]]\nsource = \"begini\"\nevent_types = [\"application.cancelled\"]\nhandler = \"broken\"\n\
         [handler.scores]\nkind = \"sql\"\nstatement = \"SELECT $3\"\n\
         [handler.flaky]\nkind = \"sql\"\nstatement = \"SELECT flaky($3, $6)\"\n\
         [handler.broken]\nkind = \"sql\"\nstatement = \"SELECT flaky($3, 0)\"\n",
        BEGINI_CONFIG.replace(
            "secrets_env = [\"BEGINI_API_KEY\"]",
            "secrets_env = [\"BEGINI_API_KEY\"]\nevent_key = { json = [\"/integration_id\", \"/uid\", \"/event/type\"] }"
        )
    )
}

/// The `hookbox` binary pointed at a test database.
struct Cli {
    config: PathBuf,
    url: String,
    _dir: tempfile::TempDir,
}

impl Cli {
    fn new(config_text: &str, url: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("hookbox.toml");
        std::fs::write(&config, config_text).unwrap();
        Self {
            config,
            url: url.to_owned(),
            _dir: dir,
        }
    }

    async fn run(&self, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_hookbox"));
        command
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env("DATABASE_URL", &self.url)
            .env("BEGINI_API_KEY", BEGINI_KEY)
            .env("USER", "auditor")
            .env("RUST_LOG", "warn");
        tokio::task::spawn_blocking(move || command.output().unwrap())
            .await
            .unwrap()
    }

    async fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args).await;
        assert!(
            output.status.success(),
            "hookbox {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    async fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args).await).unwrap()
    }
}

fn worker_for(app: &TestApp, text: &str) -> Worker {
    let config = config(text, &[("BEGINI_API_KEY", BEGINI_KEY)]);
    let pool = hookbox::db::pool(&app.db.url, &hookbox::db::PoolSettings::worker(&config)).unwrap();
    Worker::from_config(&config, pool, LibraryHandlers::default()).unwrap()
}

/// Drives the worker until nothing is due or waiting to be retried.
async fn drain(app: &TestApp, worker: &Worker) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        worker.process_next().await.unwrap();
        let open = app.count("SELECT count(*) FROM inbox_events WHERE status IN ('pending', 'retrying', 'processing')").await;
        if open == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the worker did not drain the queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_realistic_history_reads_the_same_in_the_cli_and_the_audit_queries() {
    let text = history_config();
    let app = TestApp::spawn(&text, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    sqlx::query(FLAKY).execute(&app.db.pool).await.unwrap();
    let worker = worker_for(&app, &text);

    // Accepted, duplicate, conflict, retried, dead, skipped and refused deliveries.
    let first_uid = unique_uid();
    let first = begini_payload(&first_uid, "psychometric_score.complete");
    let first_id = app.post_signed("begini", &first).await.event_id();
    assert_eq!(
        app.post_signed("begini", &first).await.body["status"],
        "duplicate"
    );
    let changed = String::from_utf8(first.clone())
        .unwrap()
        .replace("1644397637", "1644390000");
    assert_eq!(
        app.post_signed("begini", changed.as_bytes()).await.body["status"],
        "conflict"
    );
    for kind in ["android_score.complete", "ios_score.complete"] {
        assert_eq!(
            app.post_signed("begini", &begini_payload(&unique_uid(), kind))
                .await
                .status,
            200
        );
    }
    let flaky_id = app
        .post_signed(
            "begini",
            &begini_payload(&unique_uid(), "application.expired"),
        )
        .await
        .event_id();
    let mut dead_ids = Vec::new();
    for _ in 0..2 {
        dead_ids.push(
            app.post_signed(
                "begini",
                &begini_payload(&unique_uid(), "application.cancelled"),
            )
            .await
            .event_id(),
        );
    }
    let skipped_id = app
        .post_signed(
            "begini",
            &begini_payload(&unique_uid(), "application.complete"),
        )
        .await
        .event_id();
    for _ in 0..2 {
        assert_eq!(
            app.post("begini", first.clone(), &[("X-Signature", "00")])
                .await
                .status,
            403
        );
    }
    drain(&app, &worker).await;

    let cli = Cli::new(&text, &app.db.url);
    // hookbox status
    let status = cli.json(&["status", "--json"]).await;
    let begini = &status[0];
    assert_eq!(begini["source"], "begini");
    let counts: Vec<i64> = [
        "pending",
        "processing",
        "retrying",
        "succeeded",
        "dead",
        "skipped",
    ]
    .iter()
    .map(|k| begini[*k].as_i64().unwrap())
    .collect();
    assert_eq!(counts, [0, 0, 0, 4, 2, 1]);
    assert_eq!(
        begini["deliveries_5m"], 11,
        "seven accepted, a duplicate, a conflict, two refused"
    );
    assert!(begini["last_failure_at"].is_string());
    let table = cli.ok(&["status"]).await;
    assert!(
        table.starts_with("SOURCE") && table.contains("begini"),
        "{table}"
    );

    // hookbox events list / show
    let dead = cli
        .json(&["events", "list", "--status", "dead", "--json"])
        .await;
    let listed: Vec<&str> = dead
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 2);
    assert!(dead_ids
        .iter()
        .all(|id| listed.contains(&id.to_string().as_str())));
    let scores = cli
        .json(&["events", "list", "--type", "*_score.complete", "--json"])
        .await;
    assert_eq!(scores.as_array().unwrap().len(), 3);
    let shown = cli
        .json(&["events", "show", &flaky_id.to_string(), "--json"])
        .await;
    let kinds: Vec<(&str, &str)> = shown["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["kind"].as_str().unwrap(), t["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("delivery", "accepted"),
            ("attempt", "retry"),
            ("attempt", "retry"),
            ("attempt", "succeeded")
        ]
    );
    assert!(
        shown["event"].get("payload").is_none(),
        "payload only on --payload"
    );
    let text_view = cli.ok(&["events", "show", &flaky_id.to_string()]).await;
    assert!(
        text_view.contains("application.expired") && !text_view.contains("uid"),
        "{text_view}"
    );
    let key: String = sqlx::query_scalar("SELECT event_key FROM inbox_events WHERE id = $1")
        .bind(first_id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    let by_key = cli
        .ok(&["events", "show", &format!("begini:{key}"), "--payload"])
        .await;
    assert!(
        by_key.contains(&first_id.to_string()) && by_key.contains(&first_uid),
        "{by_key}"
    );

    // A replay of the dead events (they die again: their handler is broken).
    let replayed = cli
        .ok(&["replay", "--status", "dead", "--reason", "handler fixed?"])
        .await;
    assert!(replayed.contains("replayed 2 events"), "{replayed}");
    drain(&app, &worker).await;

    let hour = chrono::Duration::hours(1);
    let vars = [
        ("event_id", flaky_id.to_string()),
        ("source", "begini".to_string()),
        ("event_key", key.clone()),
        ("since", (chrono::Utc::now() - hour).to_rfc3339()),
        ("until", (chrono::Utc::now() + hour).to_rfc3339()),
        ("min_attempts", "3".to_string()),
    ];
    let queries = audit_queries();
    assert_eq!(queries.len(), 15, "fifteen numbered queries");
    let mut results = Vec::new();
    for (heading, sql) in &queries {
        results.push((
            heading.as_str(),
            audit_query(&app.db.pool, sql, &vars).await,
        ));
    }
    let rows = |n: usize| &results[n - 1].1;
    // 1. the flaky event's timeline: its delivery and three attempts
    assert_eq!(rows(1).len(), 4, "{}", results[0].0);
    // 2. found by source and key, succeeded
    assert_eq!(rows(2).len(), 1);
    assert_eq!(rows(2)[0]["status"], "succeeded");
    assert_eq!(rows(2)[0]["id"], first_id.to_string());
    // 3. every delivery of an event: accepted, duplicate, conflict (flaky event: 1)
    let first_deliveries = audit_query(
        &app.db.pool,
        &queries[2].1,
        &[("event_id", first_id.to_string())],
    )
    .await;
    let outcomes: Vec<&str> = first_deliveries
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["accepted", "duplicate", "conflict"]);
    // 4. rejected signatures grouped by origin
    assert_eq!(rows(4).len(), 1);
    assert_eq!(
        (
            rows(4)[0]["remote_addr"].as_str(),
            rows(4)[0]["deliveries"].as_i64()
        ),
        (Some("127.0.0.1"), Some(2))
    );
    // 5. duplicates per day
    assert_eq!(
        (
            rows(5)[0]["duplicates"].as_i64(),
            rows(5)[0]["accepted"].as_i64()
        ),
        (Some(1), Some(7))
    );
    // 6. at least three attempts: the flaky event and the twice-dead ones
    assert_eq!(rows(6).len(), 3);
    // 7. time to success
    assert_eq!(rows(7)[0]["succeeded"], 4);
    // 8. not done after the window: the two dead events
    let open: Vec<&str> = rows(8)
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(open, ["dead", "dead"]);
    // 9. failures by handler: flaky retried twice; broken retried twice per run and died once per run (2 events x 2 runs)
    let failures: Vec<(String, String, i64)> = rows(9)
        .iter()
        .map(|r| {
            (
                r["handler"].as_str().unwrap().into(),
                r["outcome"].as_str().unwrap().into(),
                r["attempts"].as_i64().unwrap(),
            )
        })
        .collect();
    assert!(
        failures.contains(&("broken".into(), "retry".into(), 2 * 2 * 2)),
        "{failures:?}"
    );
    assert!(
        failures.contains(&("broken".into(), "dead".into(), 2 * 2)),
        "{failures:?}"
    );
    assert!(
        failures.contains(&("flaky".into(), "retry".into(), 2)),
        "{failures:?}"
    );
    // 10. the replay, with the two events it touched
    assert_eq!(rows(10).len(), 1);
    assert_eq!(
        (
            rows(10)[0]["action"].as_str(),
            rows(10)[0]["actor"].as_str()
        ),
        (Some("replay"), Some("auditor"))
    );
    assert_eq!(
        (
            rows(10)[0]["affected"].as_i64(),
            rows(10)[0]["linked_events"].as_i64()
        ),
        (Some(2), Some(2))
    );
    // 11. every refusal is counted, the detailed ones included
    let total = |rows: &Vec<serde_json::Value>, field: &str| -> i64 {
        rows.iter().map(|r| r[field].as_i64().unwrap_or(0)).sum()
    };
    assert!(total(rows(15), "refused") >= total(rows(4), "deliveries"));
    // The replay shows in a replayed event's timeline, between its two runs.
    let timeline = cli
        .json(&["events", "show", &dead_ids[0].to_string(), "--json"])
        .await;
    let kinds: Vec<&str> = timeline["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["delivery", "attempt", "attempt", "attempt", "action", "attempt", "attempt", "attempt"]
    );
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM inbox_events WHERE id = '{skipped_id}' AND status = 'skipped'"
        ))
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downstream_outage_is_recovered_by_replaying_the_dead_events_exactly_once() {
    use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
    let healthy = Arc::new(AtomicBool::new(false));
    let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
    let (state, log) = (healthy.clone(), accepted.clone());
    let server = HttpServer::new(move || {
        let (state, log) = (state.clone(), log.clone());
        App::new().default_service(web::to(move |request: HttpRequest| {
            let (state, log) = (state.clone(), log.clone());
            async move {
                if !state.load(Ordering::SeqCst) {
                    return HttpResponse::InternalServerError().finish();
                }
                let key = request
                    .headers()
                    .get("idempotency-key")
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned();
                log.lock().unwrap().push(key);
                HttpResponse::Ok().finish()
            }
        }))
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .unwrap();
    let port = server.addrs()[0].port();
    tokio::spawn(server.run());
    let text = format!(
        "{BEGINI_CONFIG}\n[worker]\nretry = {{ max_attempts = 2, initial = \"50ms\", max = \"100ms\", multiplier = 2.0, jitter = 0.0 }}\n\
         [[route]]\nsource = \"begini\"\nhandler = \"downstream\"\n\
         [handler.downstream]\nkind = \"http\"\nurl = \"http://127.0.0.1:{port}/hook\"\ntimeout = \"5s\"\n"
    );
    let app = TestApp::spawn(&text, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    let worker = worker_for(&app, &text);
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            app.post_signed(
                "begini",
                &begini_payload(&unique_uid(), "application.complete"),
            )
            .await
            .event_id(),
        );
    }
    drain(&app, &worker).await;
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_events WHERE status = 'dead'")
            .await,
        5,
        "the outage killed them"
    );

    healthy.store(true, Ordering::SeqCst);
    let cli = Cli::new(&text, &app.db.url);
    let dry = cli
        .ok(&[
            "replay",
            "--status",
            "dead",
            "--since",
            "10m",
            "--reason",
            "downstream outage",
            "--dry-run",
        ])
        .await;
    assert!(dry.starts_with("would replay 5 events"), "{dry}");
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_events WHERE status = 'dead'")
            .await,
        5,
        "a dry run changes nothing"
    );
    let done = cli
        .ok(&[
            "replay",
            "--status",
            "dead",
            "--since",
            "10m",
            "--reason",
            "downstream outage",
        ])
        .await;
    assert!(done.contains("replayed 5 events"), "{done}");
    drain(&app, &worker).await;

    assert_eq!(
        app.count("SELECT count(*) FROM inbox_events WHERE status = 'succeeded'")
            .await,
        5
    );
    let mut delivered = accepted.lock().unwrap().clone();
    delivered.sort();
    let mut expected: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    expected.sort();
    assert_eq!(
        delivered, expected,
        "each event delivered downstream exactly once after the outage"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_actions WHERE action = 'replay' AND reason = 'downstream outage' AND affected = 5 AND actor = 'auditor'").await,
        1
    );
    let again = cli
        .ok(&[
            "replay", "--status", "dead", "--since", "10m", "--reason", "again",
        ])
        .await;
    assert!(
        again.contains("replayed 0 events"),
        "replaying twice is safe: {again}"
    );
}

#[tokio::test]
async fn replay_refuses_without_a_reason_and_guards_succeeded_events() {
    let app = TestApp::begini().await;
    let cli = Cli::new(BEGINI_CONFIG, &app.db.url);
    let no_reason = cli.run(&["replay", "--status", "dead"]).await;
    assert!(!no_reason.status.success());
    assert!(String::from_utf8_lossy(&no_reason.stderr).contains("--reason"));
    let succeeded = cli
        .run(&["replay", "--status", "succeeded", "--reason", "x"])
        .await;
    assert!(String::from_utf8_lossy(&succeeded.stderr).contains("--include-succeeded"));
    let nothing = cli.run(&["replay", "--reason", "x"]).await;
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("name event ids or a filter"));
}

#[tokio::test]
async fn after_prune_a_redelivery_is_still_answered_duplicate() {
    let text = format!("{BEGINI_CONFIG}\n[[route]]\nsource = \"begini\"\nhandler = \"h\"\n[handler.h]\nkind = \"sql\"\nstatement = \"SELECT 1\"\n");
    let app = TestApp::spawn(&text, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    let worker = worker_for(&app, &text);
    let body = begini_payload(&unique_uid(), "application.complete");
    let id = app.post_signed("begini", &body).await.event_id();
    drain(&app, &worker).await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    let cli = Cli::new(&text, &app.db.url);
    let dry = cli
        .ok(&["prune", "--older-than", "10ms", "--dry-run"])
        .await;
    // (The second line names the partitions dropped whole: here the empty
    // ones from before the database was made.)
    assert_eq!(
        dry.lines().next(),
        Some("would prune: 1 payloads, 0 deliveries, 0 attempts, 0 events")
    );
    let pruned = cli
        .ok(&["prune", "--older-than", "10ms", "--reason", "retention"])
        .await;
    assert_eq!(
        pruned.lines().next(),
        Some("pruned: 1 payloads, 0 deliveries, 0 attempts, 0 events")
    );
    let row = sqlx::query!(r#"SELECT payload IS NULL AS gone, headers IS NULL AS no_headers, payload_sha256 AS "payload_sha256!" FROM inbox_events WHERE id = $1"#, id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!((row.gone, row.no_headers), (Some(true), Some(true)));
    assert_eq!(
        row.payload_sha256,
        hookbox::event_key::sha256_hex(&body),
        "the key material stays"
    );

    let again = app.post_signed("begini", &body).await;
    assert_eq!(
        (again.status, again.body["status"].as_str()),
        (200, Some("duplicate"))
    );
    assert_eq!(again.event_id(), id);
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_actions WHERE action = 'prune' AND affected = 1")
            .await,
        1
    );
}

#[tokio::test]
async fn a_prune_of_keys_deletes_finished_events_whole_and_a_later_delivery_of_one_is_new() {
    let text = format!("{BEGINI_CONFIG}\n[[route]]\nsource = \"begini\"\nevent_types = [\"application.complete\"]\nhandler = \"h\"\n[handler.h]\nkind = \"sql\"\nstatement = \"SELECT 1\"\n");
    let app = TestApp::spawn(&text, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    let worker = worker_for(&app, &text);
    let finished_body = begini_payload(&unique_uid(), "application.complete");
    let finished = app.post_signed("begini", &finished_body).await.event_id();
    drain(&app, &worker).await;
    // Delivered after the drain and never claimed: it stays pending.
    let pending_body = begini_payload(&unique_uid(), "application.complete");
    let pending = app.post_signed("begini", &pending_body).await.event_id();
    tokio::time::sleep(Duration::from_millis(50)).await;

    let cli = Cli::new(&text, &app.db.url);
    let dry = cli
        .ok(&["prune", "--keys-older-than", "10ms", "--dry-run"])
        .await;
    assert_eq!(
        dry.lines().next(),
        Some("would prune: 0 payloads, 0 deliveries, 0 attempts, 1 events")
    );
    let pruned = cli
        .ok(&[
            "prune",
            "--keys-older-than",
            "10ms",
            "--reason",
            "dedup window",
        ])
        .await;
    assert_eq!(
        pruned.lines().next(),
        Some("pruned: 0 payloads, 0 deliveries, 0 attempts, 1 events")
    );
    let left = |sql: &str, id: Uuid| {
        let pool = app.db.pool.clone();
        let sql = sql.to_owned();
        async move {
            sqlx::query_scalar::<_, i64>(&sql)
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    for (table, sql) in [
        (
            "inbox_events",
            "SELECT count(*) FROM inbox_events WHERE id = $1",
        ),
        (
            "inbox_payloads",
            "SELECT count(*) FROM inbox_payloads WHERE event_id = $1",
        ),
        (
            "inbox_attempts",
            "SELECT count(*) FROM inbox_attempts WHERE event_id = $1",
        ),
    ] {
        assert_eq!(
            left(sql, finished).await,
            0,
            "{table} still holds the pruned event"
        );
    }
    assert_eq!(
        left(
            "SELECT count(*) FROM inbox_events WHERE id = $1 AND status = 'pending'",
            pending
        )
        .await,
        1,
        "an unfinished event is never pruned"
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM inbox_deliveries WHERE event_id IS NULL AND outcome = 'accepted'"
        )
        .await,
        1,
        "the delivery stays in the audit trail, without its event"
    );
    // Every documented audit query still runs, on the event that is left.
    let hour = chrono::Duration::hours(1);
    let vars = [
        ("event_id", pending.to_string()),
        ("source", "begini".to_string()),
        ("event_key", "none".to_string()),
        ("since", (chrono::Utc::now() - hour).to_rfc3339()),
        ("until", (chrono::Utc::now() + hour).to_rfc3339()),
        ("min_attempts", "1".to_string()),
    ];
    for (_, sql) in audit_queries() {
        audit_query(&app.db.pool, &sql, &vars).await;
    }

    let again = app.post_signed("begini", &finished_body).await;
    assert_eq!(
        (again.status, again.body["status"].as_str()),
        (200, Some("accepted")),
        "past its dedup window, the key is new"
    );
    assert_ne!(again.event_id(), finished);
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_actions WHERE action = 'prune' AND affected = 1 AND filter->>'keys_older_than' = '10ms'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_whose_event_is_pruned_while_its_delivery_is_recorded_is_stored_as_new() {
    let text = format!("{BEGINI_CONFIG}\n[[route]]\nsource = \"begini\"\nhandler = \"h\"\n[handler.h]\nkind = \"sql\"\nstatement = \"SELECT 1\"\n");
    let app = TestApp::spawn(&text, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    let worker = worker_for(&app, &text);
    let body = begini_payload(&unique_uid(), "application.complete");
    let first = app.post_signed("begini", &body).await.event_id();
    drain(&app, &worker).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Widens the moment between the receiver's key check (it sees the
    // event) and the check of its delivery row's reference to the event.
    sqlx::raw_sql(
        "CREATE FUNCTION slow_duplicates() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.outcome = 'duplicate' THEN PERFORM pg_sleep(1); END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER slow_duplicates BEFORE INSERT ON inbox_deliveries
             FOR EACH ROW EXECUTE FUNCTION slow_duplicates();",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();

    let redelivery = app.post_signed("begini", &body);
    let prune = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while app
            .count("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'")
            .await
            == 0
        {
            assert!(
                Instant::now() < deadline,
                "the redelivery never reached its delivery row"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let request = keys_prune(Duration::from_millis(10), false, 100);
        hookbox::ops::prune::prune(&app.db.pool, &request, |_| {})
            .await
            .unwrap()
    };
    let (answer, pruned) = tokio::join!(redelivery, prune);
    assert_eq!(pruned.events, 1);
    assert_eq!(
        (answer.status, answer.body["status"].as_str()),
        (200, Some("accepted")),
        "{:?}",
        answer.body
    );
    let stored = answer.event_id();
    assert_ne!(stored, first);
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_events WHERE status = 'pending'")
            .await,
        1,
        "the redelivery is stored as a new event, to be processed"
    );
}

/// A prune of whole events finished longer ago than `keys_older_than`.
fn keys_prune(
    keys_older_than: Duration,
    include_dead: bool,
    batch_size: i64,
) -> hookbox::ops::prune::PruneRequest {
    hookbox::ops::prune::PruneRequest {
        payloads_older_than: None,
        include_dead,
        deliveries_older_than: None,
        attempts_older_than: None,
        keys_older_than: Some(keys_older_than),
        dry_run: false,
        actor: "test".into(),
        reason: None,
        batch_size,
    }
}

/// Inserts `n` events of `status` received (and, unless pending, finished)
/// `age` ago (an interval), one a millisecond from `first`; ids are UUIDv7 of
/// that time, as the receiver makes them.
async fn events_received_ago(
    db: &TestDb,
    age: &str,
    status: &str,
    first: i64,
    n: i64,
    ordering_key: Option<&str>,
    dead_blocks: bool,
) {
    sqlx::query(
        "INSERT INTO inbox_event_state (id, source, environment, event_key, event_type, payload_sha256,
                                        status, attempts, received_at, processed_at,
                                        ordering_key, ordered_at, ordering_seq, dead_blocks)
         SELECT inbox_uuid_at(t), 'begini', 'sandbox', $1 || '-' || g, 't', md5(g::text), $1, 1, t,
                CASE WHEN $1 <> 'pending' THEN t END,
                $4, CASE WHEN $4 IS NOT NULL THEN t END,
                CASE WHEN $4 IS NOT NULL THEN nextval('inbox_ordering_seq') END, $5
         FROM generate_series($2, $2 + $3 - 1) g,
              LATERAL (SELECT now() - $6::text::interval + g * interval '1 ms' AS t) at",
    )
    .bind(status)
    .bind(first)
    .bind(n)
    .bind(ordering_key)
    .bind(dead_blocks)
    .bind(age)
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_prune_of_keys_keeps_a_dead_event_that_holds_back_its_ordering_key() {
    let db = database().await;
    events_received_ago(&db, "3 days", "dead", 1, 1, Some("order-42"), true).await;
    events_received_ago(&db, "3 days", "pending", 2, 3, Some("order-42"), false).await;
    events_received_ago(&db, "3 days", "dead", 5, 1, None, false).await;

    let pruned = hookbox::ops::prune::prune(
        &db.pool,
        &keys_prune(Duration::from_secs(3600), true, 100),
        |_| {},
    )
    .await
    .unwrap();

    assert_eq!(pruned.events, 1, "only the dead event of no ordering key");
    let left: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT status, ordering_key FROM inbox_events ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        left,
        [
            ("dead", Some("order-42")),
            ("pending", Some("order-42")),
            ("pending", Some("order-42")),
            ("pending", Some("order-42"))
        ]
        .map(|(s, k)| (s.to_owned(), k.map(str::to_owned))),
        "the key stays held back until an operator skips the dead event"
    );
}

#[tokio::test]
async fn a_prune_of_keys_reads_only_the_events_of_the_status_it_deletes() {
    let db = database().await;
    // Enough succeeded events for many batches of one statement (a cached
    // plan), then dead ones that stay, then a few skipped ones after them.
    events_received_ago(&db, "3 days", "succeeded", 1, 1_000, None, false).await;
    events_received_ago(&db, "3 days", "dead", 1_001, 5_000, None, false).await;
    events_received_ago(&db, "3 days", "skipped", 6_001, 5, None, false).await;
    sqlx::query("ANALYZE inbox_event_state")
        .execute(&db.pool)
        .await
        .unwrap();

    let pruned = hookbox::ops::prune::prune(
        &db.pool,
        &keys_prune(Duration::from_secs(3600), false, 100),
        |_| {},
    )
    .await
    .unwrap();

    assert_eq!(pruned.events, 1_005);
    // The prune's backends report their reads when they go idle, with their
    // deletes.
    let reported = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT n_tup_del FROM pg_stat_user_tables WHERE relname = 'inbox_event_state'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while reported().await < 1_005 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        reported().await,
        1_005,
        "the prune's reads were never reported, so none could be counted"
    );
    let primary_key_reads = sqlx::query_scalar::<_, i64>(
        "SELECT idx_tup_read FROM pg_stat_user_indexes WHERE indexrelname = 'inbox_events_pkey'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        primary_key_reads < 3_000,
        "deleting 1,005 events read {primary_key_reads} entries of the primary key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_of_keys_and_a_prune_of_deliveries_at_once_both_finish() {
    let db = database().await;
    // Received 40 to 20 seconds ago: in the partition that holds now, which
    // prune cannot drop whole (both prunes go row by row).
    events_received_ago(&db, "40 seconds", "succeeded", 1, 20_000, None, false).await;
    // Each event's delivery, and for every third a duplicate 200 ms later:
    // in time order, the duplicates come among the later events' deliveries.
    sqlx::query(
        "INSERT INTO inbox_deliveries (received_at, source, outcome, event_id, payload_sha256, status_code)
         SELECT CASE WHEN d.outcome = 'accepted' THEN e.received_at
                     ELSE e.received_at + interval '200 ms' END,
                'begini', d.outcome, e.id, e.payload_sha256, 200
         FROM inbox_event_state e
         CROSS JOIN (VALUES ('accepted'), ('duplicate')) d(outcome)
         WHERE d.outcome = 'accepted' OR substr(e.event_key, 11)::int % 3 = 0",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let deliveries = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM inbox_deliveries")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let cli = Cli::new(BEGINI_CONFIG, &db.url);

    // As two scheduled jobs would run them, in two processes.
    let (keys, old_deliveries) = tokio::join!(
        cli.ok(&["prune", "--keys-older-than", "10s", "--batch-size", "1000"]),
        cli.ok(&[
            "prune",
            "--deliveries-older-than",
            "10s",
            "--batch-size",
            "50"
        ]),
    );

    assert_eq!(
        keys.lines().next(),
        Some("pruned: 0 payloads, 0 deliveries, 0 attempts, 20000 events")
    );
    assert_eq!(
        old_deliveries.lines().next(),
        Some(format!("pruned: 0 payloads, {deliveries} deliveries, 0 attempts, 0 events").as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn importing_1000_events_of_which_300_are_stored_adds_exactly_700() {
    let app = TestApp::begini().await;
    let bodies: Vec<Vec<u8>> = (0..1000)
        .map(|_| begini_payload(&unique_uid(), "application.complete"))
        .collect();
    let statuses: Vec<u16> = futures_util::stream::iter(bodies.iter().take(300))
        .map(|body| app.deliver_as_sender("begini", body))
        .buffer_unordered(16)
        .map(|answer| answer.status)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 200));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.jsonl");
    let mut lines = bodies.join(&b"\n"[..]);
    lines.push(b'\n');
    std::fs::write(&file, lines).unwrap();
    let file = file.to_str().unwrap();

    let cli = Cli::new(BEGINI_CONFIG, &app.db.url);
    let dry = cli
        .ok(&["import", "--source", "begini", file, "--dry-run"])
        .await;
    assert!(
        dry.contains("would import 1000 lines: 700 new, 300 already stored"),
        "{dry}"
    );
    assert_eq!(app.count("SELECT count(*) FROM inbox_events").await, 300);

    let first = cli
        .ok(&[
            "import",
            "--source",
            "begini",
            file,
            "--reason",
            "receiver was down 02:00-03:00",
        ])
        .await;
    assert!(
        first
            .contains("imported 1000 lines: 700 new, 300 already stored, 0 conflicting, 0 invalid"),
        "{first}"
    );
    assert_eq!(app.count("SELECT count(*) FROM inbox_events").await, 1000);
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_deliveries WHERE outcome = 'imported'")
            .await,
        1000
    );
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_actions WHERE action = 'import' AND affected = 700")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_action_events").await,
        700
    );

    let second = cli
        .ok(&["import", "--source", "begini", file, "--reason", "again"])
        .await;
    assert!(second.contains("0 new, 1000 already stored"), "{second}");
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_events").await,
        1000,
        "importing again adds no event"
    );

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"uid\":\"x\",\"event\":{\"type\":\"a\"}}\nnot json\n",
    )
    .unwrap();
    let output = cli
        .run(&["import", "--source", "begini", bad.to_str().unwrap()])
        .await;
    assert!(
        !output.status.success(),
        "an invalid line fails the command"
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("line 2: payload is not valid JSON"));
}

/// A receiver recording a duplicate delivery of a dead event holds a key-share
/// lock on it; a replay that names the event waits for that moment instead of
/// skipping it (and reporting fewer events than it was asked for).
#[tokio::test]
async fn replay_waits_for_a_duplicate_being_recorded_and_replays_every_named_event() {
    let app = TestApp::begini().await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let body = begini_payload(&unique_uid(), "application.complete");
        ids.push(app.post_signed("begini", &body).await.event_id());
    }
    sqlx::query("UPDATE inbox_events SET status = 'dead', processed_at = now() WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&app.db.pool)
        .await
        .unwrap();

    // A duplicate of the first, being recorded: the delivery row's foreign key
    // holds the event until this transaction ends.
    let mut receiver = app.db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO inbox_deliveries (source, outcome, event_id, status_code) VALUES ('begini', 'duplicate', $1, 200)",
    )
    .bind(ids[0])
    .execute(&mut *receiver)
    .await
    .unwrap();
    let request = hookbox::ops::replay::ReplayRequest {
        ids: ids.clone(),
        filter: Default::default(),
        include_succeeded: false,
        reason: "downstream fixed".into(),
        actor: "ops".into(),
        batch_size: 10,
    };
    let replay = hookbox::ops::replay::replay(&app.db.pool, &request, |_| {});
    let commit = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        receiver.commit().await.unwrap();
    };
    let (report, ()) = tokio::join!(replay, commit);

    assert_eq!(report.unwrap().replayed, 2);
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_events WHERE status = 'pending'")
            .await,
        2
    );
}
