//! History that retention can drop whole: deliveries, attempts and payloads
//! are partitioned by time, workers make the partitions ahead, prune drops
//! them, and nothing an operator reads changes.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use hookbox::worker::{LibraryHandlers, Worker};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::*;

type Time = chrono::DateTime<chrono::Utc>;

/// A begini source routed to a `sql` handler, with partitions of `interval`.
fn config_with(interval: &str, ahead: u32) -> String {
    format!(
        "{BEGINI_CONFIG}\n[worker]\nlease = \"30s\"\npartition_interval = \"{interval}\"\n\
         partitions_ahead = {ahead}\n\
         [[route]]\nsource = \"begini\"\nhandler = \"h\"\n\
         [handler.h]\nkind = \"sql\"\nstatement = \"SELECT 1\"\n"
    )
}

fn worker_for(url: &str, text: &str) -> Worker {
    let config = config(text, &[("BEGINI_API_KEY", BEGINI_KEY)]);
    let pool = hookbox::db::pool(url, &hookbox::db::PoolSettings::worker(&config)).unwrap();
    Worker::from_config(&config, pool, LibraryHandlers::default()).unwrap()
}

/// Runs `hookbox` with `args` against the database at `url`; its stdout.
async fn hookbox(text: &str, url: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hookbox.toml");
    std::fs::write(&path, text).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_hookbox"));
    command
        .arg("--config")
        .arg(&path)
        .args(args)
        .env("DATABASE_URL", url)
        .env("BEGINI_API_KEY", BEGINI_KEY)
        .env("USER", "retention")
        .env("RUST_LOG", "warn");
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "hookbox {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Waits until `sql` (a boolean) holds, for at most `limit`.
async fn wait_until(pool: &sqlx::PgPool, sql: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let holds: bool = sqlx::query_scalar(sql).fetch_one(pool).await.unwrap();
        if holds {
            return;
        }
        assert!(Instant::now() < deadline, "still not true: {sql}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The partitions that hold rows of these events, in the three tables.
async fn partitions_holding(pool: &sqlx::PgPool, ids: &[Uuid]) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT DISTINCT tableoid::regclass::text FROM inbox_deliveries WHERE event_id = ANY($1)
         UNION SELECT DISTINCT tableoid::regclass::text FROM inbox_attempts WHERE event_id = ANY($1)
         UNION SELECT DISTINCT tableoid::regclass::text FROM inbox_payloads WHERE event_id = ANY($1)
         ORDER BY 1",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_past_whole_partitions_drops_them_and_late_duplicates_are_still_recognised() {
    let text = config_with("1m", 2);
    let app = TestApp::spawn(&text, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    let pool = &app.db.pool;
    let stop = CancellationToken::new();
    tokio::spawn(worker_for(&app.db.url, &text).run(stop.clone()));
    // The worker makes this minute's partitions and the next two.
    wait_until(
        pool,
        "SELECT count(DISTINCT parent) = 3 FROM inbox_partitions
         WHERE NOT is_default AND to_time >= now() + interval '2 minutes'",
        Duration::from_secs(20),
    )
    .await;

    let bodies: Vec<Vec<u8>> = (0..5)
        .map(|_| begini_payload(&unique_uid(), "application.complete"))
        .collect();
    let mut ids = Vec::new();
    for body in &bodies {
        let answer = app.post_signed("begini", body).await;
        assert_eq!(answer.body["status"], "accepted");
        ids.push(answer.event_id());
    }
    assert_eq!(
        app.post_signed("begini", &bodies[0]).await.body["status"],
        "duplicate"
    );
    wait_until(
        pool,
        "SELECT count(*) = 5 FROM inbox_events WHERE status = 'succeeded'",
        Duration::from_secs(20),
    )
    .await;
    let holding = partitions_holding(pool, &ids).await;
    assert!(
        !holding.is_empty() && holding.iter().all(|p| !p.ends_with("_default")),
        "the rows are in partitions made ahead, not in a DEFAULT one: {holding:?}"
    );

    // Once those partitions lie wholly in the past, a prune drops them.
    let ends: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT max(to_time) FROM inbox_partitions WHERE partition = ANY($1)")
            .bind(&holding)
            .fetch_one(pool)
            .await
            .unwrap();
    let wait = (ends - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_secs(2)).await;
    let url = &app.db.url;
    let dry = hookbox(&text, url, &["prune", "--older-than", "1s", "--dry-run"]).await;
    assert!(
        dry.starts_with("would prune: 5 payloads"),
        "a dry run counts, and drops nothing: {dry}"
    );
    assert_eq!(partitions_holding(pool, &ids).await, holding);
    let pruned = hookbox(
        &text,
        url,
        &[
            "prune",
            "--older-than",
            "1s",
            "--deliveries-older-than",
            "1s",
            "--attempts-older-than",
            "1s",
            "--reason",
            "retention",
        ],
    )
    .await;
    assert!(
        pruned.starts_with("pruned: 5 payloads, ") && pruned.contains("5 attempts"),
        "{pruned}"
    );
    let dropped = pruned
        .lines()
        .find_map(|line| line.strip_prefix("dropped partitions: "))
        .unwrap_or_else(|| panic!("the partitions dropped are named: {pruned}"));
    for partition in &holding {
        assert!(
            dropped.split(", ").any(|d| d == partition),
            "{partition} dropped"
        );
    }
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class WHERE relname = ANY($1)
         UNION ALL SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE c.relname = ANY($1)
         ORDER BY 1 DESC LIMIT 1",
    )
    .bind(&holding)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(left, 0, "no table of {holding:?} is left");
    let action = sqlx::query!(
        r#"SELECT affected, filter -> 'dropped_partitions' AS "dropped!" FROM inbox_actions WHERE action = 'prune'"#
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(
        action.affected >= 5 + 6 + 5,
        "payloads, deliveries and attempts counted: {}",
        action.affected
    );
    assert!(holding.iter().all(|p| action
        .dropped
        .as_array()
        .unwrap()
        .contains(&p.as_str().into())));

    // Every key stays: a late duplicate is recognised, not processed again.
    let late = app.post_signed("begini", &bodies[0]).await;
    assert_eq!(
        (late.status, late.body["status"].as_str(), late.event_id()),
        (200, Some("duplicate"), ids[0])
    );
    let event = sqlx::query!(
        r#"SELECT status AS "status!", payload IS NULL AS "no_payload!", payload_json IS NULL AS "no_json!",
                  headers IS NULL AS "no_headers!", payload_sha256 AS "payload_sha256!"
           FROM inbox_events WHERE id = $1"#,
        ids[0]
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(event.status, "succeeded");
    assert!(event.no_payload && event.no_json && event.no_headers);
    assert_eq!(
        event.payload_sha256,
        hookbox::event_key::sha256_hex(&bodies[0])
    );

    // The audit trail reads as it always did, every documented query included.
    let hour = chrono::Duration::hours(1);
    let vars = [
        ("event_id", ids[0].to_string()),
        ("source", "begini".to_string()),
        ("event_key", event.payload_sha256.clone()),
        ("since", (chrono::Utc::now() - hour).to_rfc3339()),
        ("until", (chrono::Utc::now() + hour).to_rfc3339()),
        ("min_attempts", "1".to_string()),
    ];
    let queries = audit_queries();
    assert_eq!(queries.len(), 15);
    for (_, sql) in &queries {
        audit_query(pool, sql, &vars).await;
    }
    let found = audit_query(pool, &queries[1].1, &vars).await;
    assert_eq!(found.len(), 1, "2. the event by source and key");
    assert_eq!(found[0]["status"], "succeeded");
    let timeline = audit_query(pool, &queries[0].1, &vars).await;
    assert_eq!(
        timeline
            .iter()
            .map(|row| row["outcome"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["duplicate"],
        "1. what is left of the event's history: the late duplicate"
    );
    let health = audit_query(pool, "SELECT * FROM inbox_source_health", &[]).await;
    assert_eq!(health[0]["succeeded"], 5);

    // New events still go through.
    let fresh = app
        .post_signed(
            "begini",
            &begini_payload(&unique_uid(), "application.complete"),
        )
        .await;
    assert_eq!(fresh.body["status"], "accepted");
    wait_until(
        pool,
        "SELECT count(*) = 6 FROM inbox_events WHERE status = 'succeeded'",
        Duration::from_secs(20),
    )
    .await;
    stop.cancel();
}

#[tokio::test]
async fn a_prune_keeps_an_attempts_partition_while_an_attempt_started_in_it_is_running() {
    let db = database().await;
    let text = config_with("1d", 1);
    // The first partition holds everything before today (UTC); an attempt
    // claimed yesterday still runs. Its row is written when it ends (schema
    // V17): until then it is on its event's row only.
    let first: String = sqlx::query_scalar(
        "SELECT partition FROM inbox_partitions WHERE parent = 'inbox_attempts' AND NOT is_default
         ORDER BY to_time LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let running: Uuid = sqlx::query_scalar(
        "INSERT INTO inbox_event_state (id, source, environment, event_key, event_type, payload_sha256, status,
                                        attempts, locked_by, locked_until, attempt_id, attempt_started_at,
                                        attempt_handler)
         VALUES (gen_random_uuid(), 'begini', 'sandbox', 'running', 't', md5('running'), 'processing', 1,
                 'a-worker', now() + interval '1 hour', nextval('inbox_attempts_id_seq'),
                 date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' - interval '1 hour', 'h')
         RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let prune = [
        "prune",
        "--attempts-older-than",
        "1s",
        "--reason",
        "retention",
    ];

    let kept = hookbox(&text, &db.url, &prune).await;
    let exists = format!("SELECT count(*) FROM pg_class WHERE relname = '{first}'");
    assert_eq!(
        sqlx::query_scalar::<_, i64>(&exists)
            .fetch_one(&db.pool)
            .await
            .unwrap(),
        1,
        "{first} kept while the attempt runs: {kept}"
    );

    sqlx::query(
        "UPDATE inbox_event_state SET status = 'succeeded', processed_at = now(), locked_by = NULL,
                locked_until = NULL, attempt_id = NULL, attempt_started_at = NULL, attempt_handler = NULL
         WHERE id = $1",
    )
    .bind(running)
    .execute(&db.pool)
    .await
    .unwrap();
    let dropped = hookbox(&text, &db.url, &prune).await;
    assert_eq!(
        sqlx::query_scalar::<_, i64>(&exists)
            .fetch_one(&db.pool)
            .await
            .unwrap(),
        0,
        "{first} dropped once nothing in it runs: {dropped}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_elected_worker_makes_the_partitions_ahead_however_many_run() {
    let db = database().await;
    // An hour each, two ahead: the election's period is then a quarter of an
    // hour, far longer than the test.
    let text = config_with("1h", 2);
    let stop = CancellationToken::new();
    let workers: Vec<Worker> = (0..3).map(|_| worker_for(&db.url, &text)).collect();
    let ids: Vec<String> = workers.iter().map(|w| w.id().to_owned()).collect();
    for worker in workers {
        tokio::spawn(worker.run(stop.clone()));
    }
    wait_until(
        &db.pool,
        "SELECT count(DISTINCT parent) = 3 FROM inbox_partitions
         WHERE NOT is_default AND to_time >= now() + interval '2 hours'",
        Duration::from_secs(20),
    )
    .await;
    // Let every worker's housekeeping run a few rounds.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let run = sqlx::query!(
        r#"SELECT runs, run_by AS "run_by!", last_error FROM inbox_housekeeping WHERE task = 'partitions'"#
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(run.runs, 1, "one election this period, among three workers");
    assert!(
        ids.contains(&run.run_by),
        "{} is one of the workers",
        run.run_by
    );
    assert_eq!(run.last_error, None);

    // Each table: contiguous hours from the one of now, the first partition
    // (before the database was made) and the DEFAULT one, which is empty.
    for parent in ["inbox_deliveries", "inbox_attempts", "inbox_payloads"] {
        let ranges: Vec<(Option<Time>, Option<Time>)> = sqlx::query_as(
            "SELECT from_time, to_time FROM inbox_partitions
                 WHERE parent = $1 AND NOT is_default ORDER BY to_time",
        )
        .bind(parent)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        // The first partition ends at the midnight before the database was
        // made; those made ahead start with the hour of now (earlier hours
        // would stay empty) and follow each other without gap or overlap.
        assert!(ranges.len() >= 4, "{parent}: {ranges:?}");
        let made = &ranges[1..];
        for pair in made.windows(2) {
            assert_eq!(pair[0].1, pair[1].0, "{parent}: no gap, no overlap");
        }
        for (from, to) in made {
            let (from, to) = (from.unwrap(), to.unwrap());
            assert_eq!(to - from, chrono::Duration::hours(1), "{parent}");
        }
        assert!(made[0].0.unwrap() <= chrono::Utc::now());
        let in_default: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {parent}_default"))
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(in_default, 0);
    }
    // Outside the election, making partitions is a no-op when they exist.
    let settings = hookbox::db::PartitionSettings {
        interval: Duration::from_secs(3600),
        ahead: 2,
    };
    assert!(hookbox::db::make_partitions(&db.pool, settings)
        .await
        .unwrap()
        .is_empty());
    stop.cancel();
}

/// Snapshots, as JSON, of everything operators read: the contract's tables
/// and the views (inbox_source_health without its age, which moves with
/// the clock), and the columns of the three tables.
async fn everything_operators_read(pool: &sqlx::PgPool) -> Vec<(String, serde_json::Value)> {
    let queries = [
        ("inbox_events", "SELECT * FROM inbox_events ORDER BY id"),
        (
            "inbox_deliveries",
            "SELECT * FROM inbox_deliveries ORDER BY id",
        ),
        ("inbox_attempts", "SELECT * FROM inbox_attempts ORDER BY id"),
        ("inbox_actions", "SELECT * FROM inbox_actions ORDER BY id"),
        (
            "inbox_action_events",
            "SELECT * FROM inbox_action_events ORDER BY event_id, action_id",
        ),
        (
            "inbox_event_timeline",
            "SELECT * FROM inbox_event_timeline ORDER BY event_id, at, kind",
        ),
        (
            "inbox_source_health",
            "SELECT source, pending, processing, retrying, succeeded, dead, skipped, oldest_due_at,
                    last_delivery_at, last_failure_at FROM inbox_source_health ORDER BY source",
        ),
        (
            "inbox_blocked_events",
            "SELECT * FROM inbox_blocked_events ORDER BY id",
        ),
        (
            "columns",
            "SELECT table_name, column_name, data_type FROM information_schema.columns
             WHERE table_name IN ('inbox_events', 'inbox_deliveries', 'inbox_attempts')
             ORDER BY table_name, ordinal_position",
        ),
    ];
    let mut snapshot = Vec::new();
    for (name, sql) in queries {
        snapshot.push((name.to_owned(), audit_query(pool, sql, &[]).await.into()));
    }
    snapshot
}

/// The schema version that partitions the history
/// (migrations/V10__partitioned_history.sql): every install before it is at
/// the version just below.
const PARTITIONED_VERSION: i32 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_filled_under_the_previous_version_reads_the_same_after_the_migration() {
    let db = database_at(PARTITIONED_VERSION - 1).await;
    let pool = db.pool.clone();
    // A history as the previous version stored it: payloads in the event rows.
    let body = |uid: &str| begini_payload(uid, "application.complete");
    let (done_body, open_body, dead_body) = (
        body(&unique_uid()),
        body(&unique_uid()),
        body(&unique_uid()),
    );
    let (done, open, dead) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    for (id, payload, status, days_ago) in [
        (done, &done_body, "succeeded", 3),
        (open, &open_body, "pending", 0),
        (dead, &dead_body, "dead", 2),
    ] {
        let sha = hookbox::event_key::sha256_hex(payload);
        sqlx::query(
            "INSERT INTO inbox_events (id, source, environment, event_key, event_type, status, attempts,
                                       received_at, processed_at, last_error, payload, payload_json,
                                       headers, payload_sha256)
             VALUES ($1, 'begini', 'sandbox', $2, 'application.complete', $3,
                     CASE $3 WHEN 'pending' THEN 0 ELSE 1 END,
                     now() - make_interval(days => $4),
                     CASE WHEN $3 <> 'pending' THEN now() - make_interval(days => $4) END,
                     CASE $3 WHEN 'dead' THEN 'downstream refused it' END,
                     $5, convert_from($5, 'UTF8')::jsonb, '{\"content-type\": \"application/json\"}', $2)",
        )
        .bind(id)
        .bind(&sha)
        .bind(status)
        .bind(days_ago)
        .bind(payload)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO inbox_deliveries (received_at, source, remote_addr, outcome, event_id, payload_sha256, status_code)
             VALUES (now() - make_interval(days => $3), 'begini', '192.0.2.7', 'accepted', $1, $2, 200)",
        )
        .bind(id)
        .bind(&sha)
        .bind(days_ago)
        .execute(&pool)
        .await
        .unwrap();
        if status != "pending" {
            sqlx::query(
                "INSERT INTO inbox_attempts (event_id, attempt, worker_id, handler, started_at, finished_at, outcome, error)
                 VALUES ($1, 1, 'worker-a', 'h', now() - make_interval(days => $2),
                         now() - make_interval(days => $2), CASE WHEN $3 = 'dead' THEN 'dead' ELSE 'succeeded' END,
                         CASE WHEN $3 = 'dead' THEN 'downstream refused it' END)",
            )
            .bind(id)
            .bind(days_ago)
            .bind(status)
            .execute(&pool)
            .await
            .unwrap();
        }
    }
    sqlx::query(
        "INSERT INTO inbox_deliveries (received_at, source, remote_addr, outcome, reason, status_code)
         VALUES (now() - interval '1 day', 'begini', '203.0.113.9', 'rejected_signature', 'signature_mismatch', 403)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "WITH action AS (
             INSERT INTO inbox_actions (actor, action, filter, affected, reason)
             VALUES ('ops', 'replay', '{\"status\": \"dead\"}', 1, 'handler fixed') RETURNING id)
         INSERT INTO inbox_action_events (action_id, event_id) SELECT id, $1 FROM action",
    )
    .bind(dead)
    .execute(&pool)
    .await
    .unwrap();
    // An ordering key with four events waiting, as version 9 leaves them
    // after a claim that came back short: the last two set aside (due a
    // minute from now), to be made due by the completion that frees the key.
    let hot: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    for (seq, id) in hot.iter().enumerate() {
        let payload = body(&unique_uid());
        sqlx::query(
            "INSERT INTO inbox_events (id, source, environment, event_key, event_type, received_at,
                                       next_attempt_at, payload, payload_json, headers, payload_sha256,
                                       ordering_key, ordered_at, ordering_seq, dead_blocks, skip_if_stale)
             VALUES ($1, 'begini', 'sandbox', 'hot-' || $2, 'application.complete', now() - interval '1 hour',
                     now() - interval '1 hour', $3, convert_from($3, 'UTF8')::jsonb, '{}', 'hot-' || $2,
                     'hot-key', now() - interval '1 hour' + make_interval(secs => $2),
                     nextval('inbox_ordering_seq'), true, false)",
        )
        .bind(id)
        .bind(seq as i32)
        .bind(&payload)
        .execute(&pool)
        .await
        .unwrap();
    }
    sqlx::query("SELECT inbox_park_waiting(ARRAY['begini'])")
        .execute(&pool)
        .await
        .unwrap();
    let set_aside: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM inbox_events WHERE next_attempt_at > now() ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        set_aside,
        hot[2..],
        "the previous version set aside the last two"
    );
    let before = everything_operators_read(&pool).await;
    let last_delivery: i64 = sqlx::query_scalar("SELECT max(id) FROM inbox_deliveries")
        .fetch_one(&pool)
        .await
        .unwrap();

    // One transaction, which holds its ACCESS EXCLUSIVE locks throughout.
    let started = Instant::now();
    let report = hookbox::db::migrate(&db.url).await.unwrap();
    let held = started.elapsed();
    // Later versions come with it (they replace functions: moments).
    assert!(
        report.applied[0].starts_with(&format!("V{PARTITIONED_VERSION}__")),
        "{:?}",
        report.applied
    );
    eprintln!(
        "V{PARTITIONED_VERSION} on a filled V{} database: {held:?} in one transaction \
         (the locks are held that long)",
        PARTITIONED_VERSION - 1
    );
    let after = everything_operators_read(&pool).await;
    for ((name, was), (_, is)) in before.iter().zip(&after) {
        assert_eq!(was, is, "{name} reads the same");
    }

    // Receiving, processing and pruning go on where the previous version left off.
    let text = config_with("1d", 2);
    let app = TestApp::spawn_on(db, &text, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    let late = app.post_signed("begini", &done_body).await;
    assert_eq!(
        (late.body["status"].as_str(), late.event_id()),
        (Some("duplicate"), done)
    );
    let new_id: i64 =
        sqlx::query_scalar("SELECT id FROM inbox_deliveries WHERE outcome = 'duplicate'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        new_id,
        last_delivery + 1,
        "delivery ids go on from the last one"
    );
    sqlx::query(
        "CREATE TABLE seen (event_id uuid, body jsonb, at timestamptz NOT NULL DEFAULT clock_timestamp())",
    )
    .execute(&pool)
    .await
    .unwrap();
    let text = text.replace("SELECT 1", "INSERT INTO seen VALUES ($3, $1)");
    let worker = worker_for(&app.db.url, &text);
    worker.process_next().await.unwrap();
    let seen: (Uuid, serde_json::Value) =
        sqlx::query_as("SELECT event_id, body FROM seen WHERE event_id = $1")
            .bind(open)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        seen.0, open,
        "the pending event ran, with the payload it came with"
    );
    assert_eq!(
        seen.1,
        serde_json::from_slice::<serde_json::Value>(&open_body).unwrap()
    );
    // The ordered key runs in order, the events set aside before the
    // migration made due by the completions (not by their minute running out).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM inbox_events WHERE id = ANY($1) AND status = 'succeeded'",
        )
        .bind(&hot)
        .fetch_one(&pool)
        .await
        .unwrap();
        if done == hot.len() as i64 {
            break;
        }
        // Set aside for a minute: only their key's completions make them due
        // in time.
        assert!(Instant::now() < deadline, "{done} of the key's events done");
        if worker.process_next().await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let order: Vec<Uuid> =
        sqlx::query_scalar("SELECT event_id FROM seen WHERE event_id = ANY($1) ORDER BY at")
            .bind(&hot)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(order, hot, "the key's events ran in order");
    let request = hookbox::ops::prune::PruneRequest {
        payloads_older_than: Some(Duration::from_secs(86_400)),
        include_dead: false,
        deliveries_older_than: None,
        attempts_older_than: None,
        keys_older_than: None,
        dry_run: false,
        actor: "test".into(),
        reason: None,
        batch_size: 100,
    };
    let pruned = hookbox::ops::prune::prune(&pool, &request, |_| {})
        .await
        .unwrap();
    assert_eq!(pruned.payloads, 1, "the payload finished three days ago");
    let payloads: Vec<(Uuid, bool)> = sqlx::query_as(
        "SELECT id, payload IS NOT NULL FROM inbox_events WHERE id = ANY($1) ORDER BY id",
    )
    .bind([done, open, dead])
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(payloads, [(done, false), (open, true), (dead, true)]);
}
