//! The worker: exactly-once effects, retries, dead events, leases, handlers.

use std::{
    process::Child,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use futures_util::StreamExt;
use hookbox::{
    store::{self, NewDelivery, Origin},
    worker::{Event, Handler, HandlerError, LibraryHandlers, Processed, Worker},
};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::support::*;

const SIDE_EFFECTS: &str = "CREATE TABLE side_effects (event_id uuid NOT NULL, attempt int, at timestamptz NOT NULL DEFAULT now())";

fn worker_config(extra: &str) -> String {
    format!(
        "{BEGINI_CONFIG}\n[worker]\nconcurrency = 4\nlease = \"30s\"\npoll_interval = \"100ms\"\n\
         retry = {{ max_attempts = 3, initial = \"200ms\", max = \"5s\", multiplier = 2.0, jitter = 0.0 }}\n{extra}"
    )
}

struct Setup {
    db: TestDb,
    worker: Worker,
}

async fn setup(extra: &str) -> Setup {
    setup_with(extra, LibraryHandlers::default()).await
}

async fn setup_with(extra: &str, library: LibraryHandlers) -> Setup {
    setup_from(&worker_config(extra), library).await
}

/// Like `setup`, with leases this long.
async fn setup_with_lease(extra: &str, lease: &str) -> Setup {
    let text = worker_config(extra).replace("lease = \"30s\"", &format!("lease = \"{lease}\""));
    setup_from(&text, LibraryHandlers::default()).await
}

async fn setup_from(text: &str, library: LibraryHandlers) -> Setup {
    setup_on(database().await, text, library).await
}

/// A worker on a database made beforehand (an older schema, say).
async fn setup_on(db: TestDb, text: &str, library: LibraryHandlers) -> Setup {
    sqlx::query(SIDE_EFFECTS).execute(&db.pool).await.unwrap();
    let env = [
        ("BEGINI_API_KEY", BEGINI_KEY),
        (
            "DOWNSTREAM_KEY",
            "whsec_c2VjcmV0LWtleS1mb3ItZG93bnN0cmVhbQ==",
        ),
    ];
    let config = config(text, &env);
    let pool = hookbox::db::pool(&db.url, &hookbox::db::PoolSettings::worker(&config)).unwrap();
    let worker = Worker::from_config(&config, pool, library).unwrap();
    Setup { db, worker }
}

async fn store_event(db: &TestDb, event_type: &str) -> Uuid {
    store_body(db, event_type, begini_payload(&unique_uid(), event_type)).await
}

async fn store_body(db: &TestDb, event_type: &str, body: Vec<u8>) -> Uuid {
    let sha = hookbox::event_key::sha256_hex(&body);
    let delivery = NewDelivery {
        ordering: None,
        source: "begini".into(),
        environment: "sandbox".into(),
        event_key: sha.clone(),
        event_type: Some(event_type.into()),
        payload_is_json: true,
        payload: body,
        headers: serde_json::json!({}),
        payload_sha256: sha,
        remote_addr: None,
    };
    let stored = store::ingest_batch(
        &mut db.pool.acquire().await.unwrap(),
        std::slice::from_ref(&delivery),
        Origin::Http,
    )
    .await
    .unwrap();
    stored[0].1
}

async fn status_of(db: &TestDb, id: Uuid) -> String {
    sqlx::query_scalar!(
        r#"SELECT status AS "status!" FROM inbox_events WHERE id = $1"#,
        id
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

async fn attempt_outcomes(db: &TestDb, id: Uuid) -> Vec<String> {
    sqlx::query_scalar!(
        r#"SELECT outcome AS "outcome!" FROM inbox_attempts WHERE event_id = $1 ORDER BY attempt"#,
        id
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// Drives the worker until the event leaves the queue (bounded).
async fn drive_until_finished(setup: &Setup, id: Uuid) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        setup.worker.process_next().await.unwrap();
        let status = status_of(&setup.db, id).await;
        if matches!(status.as_str(), "succeeded" | "dead" | "skipped") || Instant::now() > deadline
        {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const ROUTE_ALL_TO: &str = "[[route]]\nsource = \"begini\"\nhandler = \"h\"\n";

#[tokio::test]
async fn a_failing_event_in_a_batch_rolls_back_alone_while_the_rest_commit_together() {
    let setup = setup(&format!(
        "{ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\n\
         statement = \"INSERT INTO side_effects (event_id, attempt, kind) VALUES ($3, $6, $2)\"\n"
    ))
    .await;
    sqlx::query("ALTER TABLE side_effects ADD COLUMN kind text CHECK (kind <> 'bad.type')")
        .execute(&setup.db.pool)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for event_type in [
        "good.one",
        "good.two",
        "bad.type",
        "good.three",
        "good.four",
    ] {
        ids.push(store_event(&setup.db, event_type).await);
    }

    let outcomes = setup.worker.process_next().await.unwrap();

    assert_eq!(outcomes.len(), 5, "one claim took the whole batch");
    let mut statuses = Vec::new();
    for id in &ids {
        statuses.push(status_of(&setup.db, *id).await);
    }
    assert_eq!(
        statuses,
        ["succeeded", "succeeded", "dead", "succeeded", "succeeded"]
    );
    let effects: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM side_effects")
        .fetch_all(&setup.db.pool)
        .await
        .unwrap();
    assert_eq!(effects.len(), 4);
    assert!(
        !effects.contains(&ids[2]),
        "the failed event left no effect"
    );
    let transactions: i64 = sqlx::query_scalar(
        // now() is the transaction's start: one value, one transaction.
        "SELECT count(DISTINCT at) FROM side_effects",
    )
    .fetch_one(&setup.db.pool)
    .await
    .unwrap();
    assert_eq!(
        transactions, 1,
        "the batch's effects committed in one transaction"
    );
    assert_eq!(
        attempt_outcomes(&setup.db, ids[2]).await,
        ["dead"],
        "the failure is recorded on its own event"
    );
}

#[tokio::test]
async fn a_sql_handler_effect_its_status_and_its_attempt_commit_together() {
    let setup = setup(&format!(
        "{ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\nstatement = \"INSERT INTO side_effects (event_id, attempt) VALUES ($3, $6)\"\n"
    ))
    .await;
    let id = store_event(&setup.db, "psychometric_score.complete").await;

    assert_eq!(drive_until_finished(&setup, id).await, "succeeded");

    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM side_effects WHERE event_id = $1")
        .bind(id)
        .fetch_one(&setup.db.pool)
        .await
        .unwrap();
    assert_eq!(effects, 1);
    let attempt = sqlx::query!("SELECT attempt, handler, outcome, worker_id, finished_at FROM inbox_attempts WHERE event_id = $1", id)
        .fetch_one(&setup.db.pool)
        .await
        .unwrap();
    assert_eq!(
        (
            attempt.attempt,
            attempt.handler.as_deref(),
            attempt.outcome.as_deref()
        ),
        (1, Some("h"), Some("succeeded"))
    );
    assert_eq!(attempt.worker_id, setup.worker.id());
    assert!(attempt.finished_at.is_some());
    let event = sqlx::query!(
        r#"SELECT attempts AS "attempts!", processed_at, locked_by FROM inbox_events WHERE id = $1"#,
        id
    )
    .fetch_one(&setup.db.pool)
    .await
    .unwrap();
    assert_eq!(event.attempts, 1);
    assert!(event.processed_at.is_some() && event.locked_by.is_none());
}

#[tokio::test]
async fn a_sql_handler_gets_each_events_own_six_parameters_when_a_batch_runs_together() {
    let setup = setup(&format!(
        "{ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\n\
         statement = \"INSERT INTO handled (payload, event_type, event_id, source, event_key, attempt) VALUES ($1, $2, $3, $4, $5, $6)\"\n"
    ))
    .await;
    sqlx::query(
        "CREATE TABLE handled (payload jsonb, event_type text, event_id uuid, source text, event_key text, attempt int)",
    )
    .execute(&setup.db.pool)
    .await
    .unwrap();
    let mut ids = Vec::new();
    for event_type in ["first.type", "second.type", "third.type"] {
        ids.push(store_event(&setup.db, event_type).await);
    }

    let outcomes = setup.worker.process_next().await.unwrap();

    assert_eq!(outcomes.len(), 3, "one claim took the whole batch");
    // Each effect against its own event's row: (same parameters, status).
    let rows: Vec<(bool, String)> = sqlx::query_as(
        "SELECT h.payload = e.payload_json AND h.event_type = e.event_type AND h.source = e.source
                AND h.event_key = e.event_key AND h.attempt = e.attempts,
                e.status
         FROM handled h JOIN inbox_events e ON e.id = h.event_id ORDER BY e.id",
    )
    .fetch_all(&setup.db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![(true, "succeeded".to_owned()); 3],
        "one effect for each event, with that event's own parameters"
    );
}

#[tokio::test]
async fn a_sql_handler_gets_the_payload_exactly_as_received_alone_or_in_a_batch() {
    let setup = setup(&format!(
        "{ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\n\
         statement = \"INSERT INTO handled (event_id, amount) VALUES ($3, $1 ->> 'amount')\"\n"
    ))
    .await;
    sqlx::query("CREATE TABLE handled (event_id uuid, amount text)")
        .execute(&setup.db.pool)
        .await
        .unwrap();
    // Beyond 64 bits: parsed into a float and written again, it would lose digits.
    let amount = "123456789012345678901234567890";
    let body = |uid: &str| format!(r#"{{"uid":"{uid}","amount":{amount}}}"#).into_bytes();

    let alone = store_body(&setup.db, "payment", body(&unique_uid())).await;
    setup.worker.process_next().await.unwrap();
    let batch = [
        store_body(&setup.db, "payment", body(&unique_uid())).await,
        store_body(&setup.db, "payment", body(&unique_uid())).await,
    ];
    setup.worker.process_next().await.unwrap();

    for id in [alone, batch[0], batch[1]] {
        let stored: String = sqlx::query_scalar("SELECT amount FROM handled WHERE event_id = $1")
            .bind(id)
            .fetch_one(&setup.db.pool)
            .await
            .unwrap();
        assert_eq!(stored, amount);
    }
}

#[tokio::test]
async fn a_statement_that_turns_slow_after_fast_events_still_starts_nothing_past_the_lease() {
    let setup = setup_with_lease(
        &format!(
            "{ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\n\
             statement = \"INSERT INTO side_effects (event_id, attempt, at) \
             SELECT $3, $6, clock_timestamp() FROM pg_sleep(CASE WHEN $2 = 'slow' THEN 0.05 ELSE 0 END)\"\n"
        ),
        "1s",
    )
    .await;
    // Fast events first: the handler's calls grow to take many events each
    // (1 + 2 + ... + 64: the last call took 64).
    for _ in 0..127 {
        store_event(&setup.db, "fast").await;
    }
    setup.worker.process_next().await.unwrap();
    let mut slow = Vec::new();
    for _ in 0..40 {
        slow.push(store_event(&setup.db, "slow").await);
    }

    setup.worker.process_next().await.unwrap();

    // 40 x 50 ms is twice the lease: the handler must stop starting events
    // at 90% of it, whatever the calls before managed.
    let latest: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(s.at - a.started_at))::float8
         FROM side_effects s JOIN inbox_attempts a ON a.event_id = s.event_id
         WHERE s.event_id = ANY($1)",
    )
    .bind(&slow)
    .fetch_one(&setup.db.pool)
    .await
    .unwrap();
    assert!(
        latest < 1.0,
        "a slow event ran {latest:.2} s after its claim, past its 1 s lease"
    );
    let released: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM inbox_attempts WHERE event_id = ANY($1) AND outcome = 'retry' AND error LIKE 'released:%'",
    )
    .bind(&slow)
    .fetch_one(&setup.db.pool)
    .await
    .unwrap();
    assert!(released > 0, "the rest of the batch was handed back");
}

#[tokio::test]
async fn a_statement_of_several_commands_runs_them_all_however_many_events_a_call_takes() {
    let setup = setup(&format!(
        "{ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\n\
         statement = \"INSERT INTO side_effects (event_id) VALUES ($3); INSERT INTO side_effects (event_id) VALUES ($3)\"\n"
    ))
    .await;
    // Batches of growing size, as a handler's calls would grow.
    let mut ids = Vec::new();
    for size in [1, 1, 1, 1, 1, 10] {
        for _ in 0..size {
            ids.push(store_event(&setup.db, "any.type").await);
        }
        setup.worker.process_next().await.unwrap();
    }

    for id in ids {
        assert_eq!(status_of(&setup.db, id).await, "succeeded");
        let effects: i64 =
            sqlx::query_scalar("SELECT count(*) FROM side_effects WHERE event_id = $1")
                .bind(id)
                .fetch_one(&setup.db.pool)
                .await
                .unwrap();
        assert_eq!(effects, 2, "both commands ran, once each");
    }
}

#[tokio::test]
async fn a_statement_that_fails_only_for_one_events_values_fails_that_event_alone() {
    // Planned generically (as a prepared statement is from its sixth run),
    // the division is folded while planning and fails for every event.
    let setup = setup(&format!(
        "{ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\n\
         statement = \"INSERT INTO side_effects (event_id, attempt) SELECT $3, CASE WHEN $2 = 'bad' THEN 1/0 ELSE 1 END\"\n"
    ))
    .await;
    let mut ids = Vec::new();
    for n in 0..12 {
        ids.push(store_event(&setup.db, if n == 2 { "bad" } else { "good" }).await);
    }

    setup.worker.process_next().await.unwrap();

    let mut statuses = Vec::new();
    for id in &ids {
        statuses.push(status_of(&setup.db, *id).await);
    }
    let mut expected = vec!["succeeded"; 12];
    expected[2] = "dead";
    assert_eq!(statuses, expected);
}

const FLAKY: &str = r#"
CREATE FUNCTION flaky(event uuid, attempt int) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO side_effects (event_id, attempt) VALUES (event, attempt);
    IF attempt < 3 THEN RAISE EXCEPTION 'downstream not ready'; END IF;
END $$"#;

#[tokio::test]
async fn a_handler_that_fails_twice_then_succeeds_leaves_three_attempts_with_growing_gaps() {
    let setup = setup(&format!(
        "{ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\nstatement = \"SELECT flaky($3, $6)\"\n"
    ))
    .await;
    sqlx::query(FLAKY).execute(&setup.db.pool).await.unwrap();
    // Three attempts must be allowed to reach the third.
    let id = store_event(&setup.db, "application.complete").await;

    assert_eq!(drive_until_finished(&setup, id).await, "succeeded");

    assert_eq!(
        attempt_outcomes(&setup.db, id).await,
        ["retry", "retry", "succeeded"]
    );
    let starts: Vec<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar!(
        "SELECT started_at FROM inbox_attempts WHERE event_id = $1 ORDER BY attempt",
        id
    )
    .fetch_all(&setup.db.pool)
    .await
    .unwrap();
    let first_gap = starts[1] - starts[0];
    let second_gap = starts[2] - starts[1];
    assert!(
        first_gap >= chrono::Duration::milliseconds(200),
        "{first_gap}"
    );
    assert!(
        second_gap >= chrono::Duration::milliseconds(400),
        "{second_gap}"
    );
    assert!(second_gap > first_gap);
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM side_effects")
        .fetch_one(&setup.db.pool)
        .await
        .unwrap();
    assert_eq!(effects, 1, "failed attempts rolled their effects back");
}

#[tokio::test]
async fn a_handler_that_always_fails_ends_dead_after_max_attempts() {
    let setup = setup(&format!(
        "{ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\nstatement = \"SELECT flaky($3, 0)\"\n"
    ))
    .await;
    sqlx::query(FLAKY).execute(&setup.db.pool).await.unwrap();
    let id = store_event(&setup.db, "application.complete").await;

    assert_eq!(drive_until_finished(&setup, id).await, "dead");

    assert_eq!(
        attempt_outcomes(&setup.db, id).await,
        ["retry", "retry", "dead"]
    );
    let last_error: Option<String> =
        sqlx::query_scalar!("SELECT last_error FROM inbox_events WHERE id = $1", id)
            .fetch_one(&setup.db.pool)
            .await
            .unwrap();
    assert!(last_error.unwrap().contains("gave up after 3 attempts"));
}

#[tokio::test]
async fn a_permanent_failure_ends_dead_after_one_attempt() {
    let setup = setup(&format!(
        "{ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\nstatement = \"INSERT INTO side_effects (event_id, attempt) VALUES ($3, 1 / 0)\"\n"
    ))
    .await;
    let id = store_event(&setup.db, "application.complete").await;

    assert_eq!(drive_until_finished(&setup, id).await, "dead");
    assert_eq!(attempt_outcomes(&setup.db, id).await, ["dead"]);
}

#[tokio::test]
async fn an_event_no_route_matches_is_skipped_with_an_attempt_saying_so() {
    let setup = setup(
        "[[route]]\nsource = \"begini\"\nevent_types = [\"psychometric_score.*\"]\nhandler = \"h\"\n\
         [handler.h]\nkind = \"sql\"\nstatement = \"SELECT 1\"\n",
    )
    .await;
    let id = store_event(&setup.db, "application.expired").await;

    assert_eq!(drive_until_finished(&setup, id).await, "skipped");
    let error: Option<String> = sqlx::query_scalar!(
        "SELECT error FROM inbox_attempts WHERE event_id = $1 AND outcome = 'skipped'",
        id
    )
    .fetch_one(&setup.db.pool)
    .await
    .unwrap();
    assert!(error.unwrap().contains("no route matches"));
}

/// The lease is lost when a handler runs longer than it and a rescue hands the
/// event on: then the late worker records nothing.
#[tokio::test]
async fn a_worker_that_overran_its_lease_records_nothing_and_the_rescue_does() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let script = format!(
        "if [ \"$HOOKBOX_ATTEMPT\" = 1 ]; then sleep 1.5; fi; echo \"$HOOKBOX_ATTEMPT\" >> '{}'",
        runs.display()
    );
    let setup = setup_with_lease(
        &format!(
            "{ROUTE_ALL_TO}[handler.h]\nkind = \"exec\"\ncommand = [\"sh\", \"-c\", {}]\n",
            toml::Value::String(script)
        ),
        "1s",
    )
    .await;
    let id = store_event(&setup.db, "application.complete").await;

    let outcomes = setup.worker.process_next().await.unwrap();
    assert_eq!(outcomes, [Processed::LeaseLost]);
    assert_eq!(
        status_of(&setup.db, id).await,
        "processing",
        "the late worker recorded nothing"
    );

    assert_eq!(setup.worker.rescue_expired_leases().await.unwrap(), 1);
    assert_eq!(drive_until_finished(&setup, id).await, "succeeded");
    assert_eq!(
        attempt_outcomes(&setup.db, id).await,
        ["lease_expired", "succeeded"]
    );
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "1\n2\n",
        "at-least-once, with the attempt visible"
    );
}

/// A sql handler runs before its event's row is locked (the lock comes with
/// the outcome): if it overruns the lease and a rescue hands the event on, its
/// effect is rolled back and the next attempt's is the only one.
#[tokio::test]
async fn a_sql_handler_that_overran_its_lease_leaves_no_effect_and_the_next_attempt_does() {
    let setup = setup_with_lease(
        &format!(
            "{ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\nstatement = \"INSERT INTO side_effects (event_id, attempt) \
             SELECT $3, $6 FROM pg_sleep(CASE WHEN $6 = 1 THEN 1.5 ELSE 0 END)\"\n"
        ),
        "1s",
    )
    .await;
    let id = store_event(&setup.db, "application.complete").await;

    let late = setup.worker.process_next();
    let rescue = async {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        setup.worker.rescue_expired_leases().await.unwrap()
    };
    let (outcomes, rescued) = tokio::join!(late, rescue);
    assert_eq!(rescued, 1, "the rescue took the event mid-handler");
    assert_eq!(outcomes.unwrap(), [Processed::LeaseLost]);
    assert_eq!(status_of(&setup.db, id).await, "retrying");

    assert_eq!(drive_until_finished(&setup, id).await, "succeeded");
    assert_eq!(
        attempt_outcomes(&setup.db, id).await,
        ["lease_expired", "succeeded"]
    );
    let effects: Vec<i32> =
        sqlx::query_scalar("SELECT attempt FROM side_effects WHERE event_id = $1")
            .bind(id)
            .fetch_all(&setup.db.pool)
            .await
            .unwrap();
    assert_eq!(effects, [2], "only the second attempt's effect exists");
}

#[tokio::test]
async fn an_event_that_keeps_killing_its_worker_ends_dead() {
    let setup = setup(&format!(
        "{ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\nstatement = \"SELECT 1\"\n"
    ))
    .await;
    let id = store_event(&setup.db, "application.complete").await;
    // Three claims whose workers never come back (max_attempts = 3).
    for _ in 0..3 {
        sqlx::query!(
            "UPDATE inbox_events SET status = 'processing', attempts = attempts + 1, locked_by = 'gone',
                    locked_until = now() - interval '1s' WHERE id = $1",
            id
        )
        .execute(&setup.db.pool)
        .await
        .unwrap();
        sqlx::query!(
            "INSERT INTO inbox_attempts (event_id, attempt, worker_id) SELECT id, attempts, 'gone' FROM inbox_events WHERE id = $1",
            id
        )
        .execute(&setup.db.pool)
        .await
        .unwrap();
        setup.worker.rescue_expired_leases().await.unwrap();
    }
    assert_eq!(status_of(&setup.db, id).await, "dead");
    assert_eq!(
        attempt_outcomes(&setup.db, id).await,
        ["lease_expired", "lease_expired", "lease_expired"]
    );
}

struct RecordingHandler(Arc<Mutex<Vec<Uuid>>>);

#[async_trait]
impl Handler for RecordingHandler {
    async fn handle(
        &self,
        event: &Event,
        transaction: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO side_effects (event_id, attempt) VALUES ($1, $2)")
            .bind(event.id)
            .bind(event.attempt)
            .execute(transaction)
            .await
            .map_err(|e| HandlerError::retryable(e.to_string()))?;
        self.0.lock().unwrap().push(event.id);
        Ok(())
    }
}

#[tokio::test]
async fn a_library_handler_gets_the_event_and_the_transaction() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let library = LibraryHandlers::default().with("mine", RecordingHandler(seen.clone()));
    let setup = setup_with(
        "[[route]]\nsource = \"begini\"\nhandler = \"mine\"\n[handler.mine]\nkind = \"library\"\n",
        library,
    )
    .await;
    let id = store_event(&setup.db, "application.complete").await;

    assert_eq!(drive_until_finished(&setup, id).await, "succeeded");
    assert_eq!(*seen.lock().unwrap(), [id]);
}

#[tokio::test]
async fn an_exec_handler_gets_the_payload_and_metadata_and_exit_65_is_permanent() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = format!(
        "cat > '{out}.payload'; echo \"$HOOKBOX_EVENT_ID $HOOKBOX_SOURCE $HOOKBOX_EVENT_TYPE $HOOKBOX_ATTEMPT\" > '{out}.env'; \
         echo 'cannot use this score' >&2; exit 65",
        out = out.display()
    );
    let setup = setup(&format!(
        "{ROUTE_ALL_TO}[handler.h]\nkind = \"exec\"\ncommand = [\"sh\", \"-c\", {}]\ntimeout = \"10s\"\n",
        toml::Value::String(script)
    ))
    .await;
    let id = store_event(&setup.db, "android_score.complete").await;

    assert_eq!(drive_until_finished(&setup, id).await, "dead");

    let payload: Vec<u8> =
        sqlx::query_scalar!("SELECT payload FROM inbox_events WHERE id = $1", id)
            .fetch_one(&setup.db.pool)
            .await
            .unwrap()
            .unwrap();
    assert_eq!(
        std::fs::read(format!("{}.payload", out.display())).unwrap(),
        payload
    );
    let env = std::fs::read_to_string(format!("{}.env", out.display())).unwrap();
    assert_eq!(env.trim(), format!("{id} begini android_score.complete 1"));
    let error: Option<String> =
        sqlx::query_scalar!("SELECT error FROM inbox_attempts WHERE event_id = $1", id)
            .fetch_one(&setup.db.pool)
            .await
            .unwrap();
    assert!(error.unwrap().contains("cannot use this score"));
}

/// What the downstream test server saw: headers and body.
type ReceivedRequest = (Vec<(String, String)>, Vec<u8>);

#[tokio::test]
async fn an_http_handler_sends_the_headers_and_honours_retry_after() {
    use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
    let received: Arc<Mutex<Vec<ReceivedRequest>>> = Arc::default();
    let log = received.clone();
    let server = HttpServer::new(move || {
        let log = log.clone();
        App::new().default_service(web::to(move |request: HttpRequest, body: web::Bytes| {
            let log = log.clone();
            async move {
                let headers = request
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                    .collect();
                let mut log = log.lock().unwrap();
                log.push((headers, body.to_vec()));
                if log.len() == 1 {
                    HttpResponse::ServiceUnavailable()
                        .insert_header(("Retry-After", "2"))
                        .finish()
                } else {
                    HttpResponse::Ok().finish()
                }
            }
        }))
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .unwrap();
    let port = server.addrs()[0].port();
    tokio::spawn(server.run());
    let setup = setup(&format!(
        "{ROUTE_ALL_TO}[handler.h]\nkind = \"http\"\nurl = \"http://127.0.0.1:{port}/hook\"\ntimeout = \"5s\"\nsigning_secret_env = \"DOWNSTREAM_KEY\"\n"
    ))
    .await;
    let id = store_event(&setup.db, "ios_score.complete").await;

    setup.worker.process_next().await.unwrap();
    let retry = sqlx::query!(
        r#"SELECT e.next_attempt_at AS "next_attempt_at!", a.finished_at AS "finished_at!" FROM inbox_events e
           JOIN inbox_attempts a ON a.event_id = e.id WHERE e.id = $1"#,
        id
    )
    .fetch_one(&setup.db.pool)
    .await
    .unwrap();
    assert!(
        retry.next_attempt_at - retry.finished_at >= chrono::Duration::milliseconds(1990),
        "Retry-After: 2 honoured"
    );
    assert_eq!(drive_until_finished(&setup, id).await, "succeeded");

    let (headers, body) = {
        let received = received.lock().unwrap();
        assert_eq!(received.len(), 2);
        received[1].clone()
    };
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header("idempotency-key"), Some(id.to_string()));
    assert_eq!(header("hookbox-event-id"), Some(id.to_string()));
    assert_eq!(
        header("hookbox-event-type").as_deref(),
        Some("ios_score.complete")
    );
    assert_eq!(header("hookbox-attempt").as_deref(), Some("2"));
    assert!(header("webhook-signature").unwrap().starts_with("v1,"));
    let stored: Vec<u8> = sqlx::query_scalar!("SELECT payload FROM inbox_events WHERE id = $1", id)
        .fetch_one(&setup.db.pool)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(body, stored, "the raw payload is posted");
}

// ---- processes: crashes and graceful stops --------------------------------

pub(crate) struct WorkerProcesses {
    config_path: std::path::PathBuf,
    url: String,
    pub(crate) children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl WorkerProcesses {
    pub(crate) fn start(url: &str, config_text: &str, count: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("hookbox.toml");
        std::fs::write(&config_path, config_text).unwrap();
        let mut processes = Self {
            config_path,
            url: url.to_owned(),
            children: Vec::new(),
            _dir: dir,
        };
        for _ in 0..count {
            let child = processes.spawn();
            processes.children.push(child);
        }
        processes
    }

    pub(crate) fn spawn(&self) -> Child {
        spawn_service("hookbox-worker", &self.config_path, &self.url)
    }

    pub(crate) fn terminate_all(&mut self) -> Vec<Option<i32>> {
        for child in &self.children {
            // SAFETY: plain kill(2) on a child we own.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        self.children
            .iter_mut()
            .map(|child| loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status.code();
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break None;
                }
                std::thread::sleep(Duration::from_millis(50));
            })
            .collect()
    }
}

impl Drop for WorkerProcesses {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn scalar(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_holds_while_workers_are_killed_at_random() {
    const EVENTS: usize = 5000;
    let app = TestApp::begini().await;
    sqlx::query(SIDE_EFFECTS)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let worker_text = format!(
        "{BEGINI_CONFIG}\n[worker]\nadmin_listen = \"\"\nconcurrency = 8\nbatch_size = 5\nlease = \"2s\"\npoll_interval = \"200ms\"\nshutdown_grace = \"5s\"\n\
         retry = {{ max_attempts = 100, initial = \"100ms\", max = \"1s\", multiplier = 2.0, jitter = 0.2 }}\n\
         {ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\n\
         statement = \"INSERT INTO side_effects (event_id, attempt) SELECT $3, $6 FROM pg_sleep(0.05)\"\n"
    );

    // 5,000 events, a fifth of them delivered twice.
    let bodies: Vec<Vec<u8>> = (0..EVENTS)
        .map(|_| begini_payload(&unique_uid(), "psychometric_score.complete"))
        .collect();
    let deliveries = bodies.iter().chain(bodies.iter().take(EVENTS / 5));
    let statuses: Vec<u16> = futures_util::stream::iter(deliveries)
        .map(|body| app.deliver_as_sender("begini", body))
        .buffer_unordered(32)
        .map(|answer| answer.status)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 200));
    assert_eq!(
        scalar(&app.db, "SELECT count(*) FROM inbox_events").await,
        EVENTS as i64
    );

    let url = app.db.url.clone();
    let mut workers =
        tokio::task::spawn_blocking(move || WorkerProcesses::start(&url, &worker_text, 4))
            .await
            .unwrap();
    let mut killed_pids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while killed_pids.len() < 12 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300 + rand::random_range(0..300))).await;
        if scalar(
            &app.db,
            "SELECT count(*) FROM inbox_events WHERE status IN ('pending', 'retrying')",
        )
        .await
            < 300
        {
            break;
        }
        let index = rand::random_range(0..workers.children.len());
        let pid = workers.children[index].id();
        // Kill only a worker that holds work right now, so the kill must show.
        let holding = scalar(
            &app.db,
            &format!("SELECT count(*) FROM inbox_events WHERE status = 'processing' AND locked_by LIKE '%:{pid}:%'"),
        )
        .await;
        if holding == 0 {
            continue;
        }
        workers.children[index].kill().unwrap();
        workers.children[index].wait().unwrap();
        killed_pids.push(pid);
        workers.children[index] = workers.spawn();
    }
    assert!(
        killed_pids.len() >= 10,
        "only {} kills happened",
        killed_pids.len()
    );

    // Late re-deliveries of processed events: acknowledged, never run again.
    let wait_all = Instant::now() + Duration::from_secs(180);
    while scalar(
        &app.db,
        "SELECT count(*) FROM inbox_events WHERE status <> 'succeeded'",
    )
    .await
        > 0
        && Instant::now() < wait_all
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for body in bodies.iter().take(100) {
        let answer = app.post_signed("begini", body).await;
        assert_eq!(
            (answer.status, answer.body["status"].as_str()),
            (200, Some("duplicate"))
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let exits = tokio::task::spawn_blocking(move || workers.terminate_all())
        .await
        .unwrap();
    assert!(
        exits.iter().all(|code| *code == Some(0)),
        "graceful exits: {exits:?}"
    );

    let db = &app.db;
    assert_eq!(
        scalar(
            db,
            "SELECT count(*) FROM inbox_events WHERE status = 'succeeded'"
        )
        .await,
        EVENTS as i64
    );
    assert_eq!(
        scalar(db, "SELECT count(*) FROM side_effects").await,
        EVENTS as i64,
        "one effect per event"
    );
    assert_eq!(
        scalar(db, "SELECT count(DISTINCT event_id) FROM side_effects").await,
        EVENTS as i64
    );
    for pid in killed_pids {
        let expired = scalar(
            db,
            &format!("SELECT count(*) FROM inbox_attempts WHERE outcome = 'lease_expired' AND worker_id LIKE '%:{pid}:%'"),
        )
        .await;
        assert!(
            expired >= 1,
            "the kill of worker {pid} shows as a lease_expired attempt"
        );
    }
    assert_eq!(
        scalar(
            db,
            "SELECT count(*) FROM inbox_attempts WHERE finished_at IS NULL"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_claiming_finishes_the_running_handler_and_releases_the_rest_of_its_batch() {
    let app = TestApp::begini().await;
    sqlx::query(SIDE_EFFECTS)
        .execute(&app.db.pool)
        .await
        .unwrap();
    for _ in 0..40 {
        app.post_signed(
            "begini",
            &begini_payload(&unique_uid(), "application.complete"),
        )
        .await;
    }
    let text = format!(
        "{BEGINI_CONFIG}\n[worker]\nadmin_listen = \"\"\nconcurrency = 2\nbatch_size = 10\nlease = \"30s\"\npoll_interval = \"200ms\"\nshutdown_grace = \"10s\"\n\
         {ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\nstatement = \"INSERT INTO side_effects (event_id) SELECT $3 FROM pg_sleep(0.3)\"\n"
    );
    let url = app.db.url.clone();
    let mut workers = tokio::task::spawn_blocking(move || WorkerProcesses::start(&url, &text, 1))
        .await
        .unwrap();
    while scalar(
        &app.db,
        "SELECT count(*) FROM inbox_events WHERE status = 'processing'",
    )
    .await
        == 0
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exits = tokio::task::spawn_blocking(move || workers.terminate_all())
        .await
        .unwrap();

    assert_eq!(exits, [Some(0)]);
    assert_eq!(
        scalar(
            &app.db,
            "SELECT count(*) FROM inbox_events WHERE status = 'processing'"
        )
        .await,
        0
    );
    assert_eq!(
        scalar(
            &app.db,
            "SELECT count(*) FROM inbox_attempts WHERE outcome = 'lease_expired'"
        )
        .await,
        0
    );
    assert!(
        scalar(
            &app.db,
            "SELECT count(*) FROM inbox_events WHERE status = 'pending'"
        )
        .await
            > 0,
        "claiming stopped"
    );
    // The rest of a claimed batch does not start once SIGTERM arrives: it is
    // handed back in the same commit as the work that finished.
    assert!(
        scalar(
            &app.db,
            "SELECT count(*) FROM inbox_attempts WHERE outcome = 'retry' AND error LIKE 'released:%'"
        )
        .await
            > 0,
        "the unstarted part of a batch was released"
    );
    assert_eq!(
        scalar(&app.db, "SELECT count(*) FROM side_effects").await,
        scalar(
            &app.db,
            "SELECT count(*) FROM inbox_events WHERE status = 'succeeded'"
        )
        .await
    );
}

/// Sleeps on its first call longer than on its second.
struct SlowThenFaster(std::sync::atomic::AtomicUsize);

#[async_trait]
impl Handler for SlowThenFaster {
    async fn handle(
        &self,
        event: &Event,
        transaction: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        let call = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let pause = if call == 0 { 2500 } else { 1000 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        sqlx::query("INSERT INTO side_effects (event_id, attempt) VALUES ($1, $2)")
            .bind(event.id)
            .bind(event.attempt)
            .execute(transaction)
            .await
            .map_err(|e| HandlerError::retryable(e.to_string()))?;
        Ok(())
    }
}

/// After a rescue and a replay, the same worker claims the event again with
/// the same attempt number; the first claim's late completion must not finish
/// the second claim (nor rewrite its own `lease_expired` attempt row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_completion_after_a_replay_does_not_finish_the_newer_claim() {
    let library = LibraryHandlers::default().with("mine", SlowThenFaster(Default::default()));
    let text = worker_config(
        "[[route]]\nsource = \"begini\"\nhandler = \"mine\"\n[handler.mine]\nkind = \"library\"\n",
    )
    .replace("lease = \"30s\"", "lease = \"2s\"");
    let setup = setup_from(&text, library).await;
    let id = store_event(&setup.db, "application.complete").await;

    let first = setup.worker.process_next();
    let second = async {
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(setup.worker.rescue_expired_leases().await.unwrap(), 1);
        let request = hookbox::ops::replay::ReplayRequest {
            ids: vec![id],
            filter: Default::default(),
            include_succeeded: false,
            reason: "downstream fixed".into(),
            actor: "ops".into(),
            batch_size: 10,
        };
        hookbox::ops::replay::replay(&setup.db.pool, &request, |_| {})
            .await
            .unwrap();
        setup.worker.process_next().await.unwrap()
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first.unwrap(), [Processed::LeaseLost]);
    assert_eq!(
        second,
        [Processed::Recorded(hookbox::AttemptOutcome::Succeeded)]
    );
    assert_eq!(status_of(&setup.db, id).await, "succeeded");
    assert_eq!(
        attempt_outcomes(&setup.db, id).await,
        ["lease_expired", "succeeded"]
    );
    assert_eq!(
        scalar(
            &setup.db,
            "SELECT count(*) FROM inbox_attempts WHERE finished_at IS NULL"
        )
        .await,
        0
    );
}

/// A worker whose handler takes 0.3 s per event, and a batch of two: a good
/// event and one its statement refuses, so the first pass fails after 0.6 s
/// and the careful path runs.
async fn a_slow_good_event_and_a_failing_one() -> (Setup, Uuid, Uuid) {
    let setup = setup(&format!(
        "{ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\n\
         statement = \"INSERT INTO side_effects (event_id, attempt, kind) SELECT $3, $6, $2 FROM pg_sleep(0.3)\"\n"
    ))
    .await;
    sqlx::query("ALTER TABLE side_effects ADD COLUMN kind text CHECK (kind <> 'bad.type')")
        .execute(&setup.db.pool)
        .await
        .unwrap();
    let good = store_event(&setup.db, "good.one").await;
    let failing = store_event(&setup.db, "bad.type").await;
    (setup, good, failing)
}

/// A claim locks a candidate before it rechecks it, and keeps the lock of
/// one another worker claimed meanwhile until it commits: for that moment
/// the owner finds its own event's row locked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_careful_path_records_an_event_whose_row_a_claim_held_for_a_moment() {
    let (setup, good, failing) = a_slow_good_event_and_a_failing_one().await;

    let mut claim = setup.db.pool.begin().await.unwrap();
    let processing = setup.worker.process_next();
    let held_for_a_moment = async {
        // While the first pass runs its handlers (0.6 s), another worker's
        // claim locks the row without taking it, and commits a little after
        // the careful pass has begun.
        tokio::time::sleep(Duration::from_millis(150)).await;
        sqlx::query("SELECT 1 FROM inbox_event_state WHERE id = $1 FOR UPDATE")
            .bind(good)
            .execute(&mut *claim)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(550)).await;
        claim.commit().await.unwrap();
    };
    let (outcomes, ()) = tokio::join!(processing, held_for_a_moment);

    assert!(
        !outcomes.unwrap().contains(&Processed::LeaseLost),
        "the lease was never lost"
    );
    assert_eq!(status_of(&setup.db, good).await, "succeeded");
    assert_eq!(status_of(&setup.db, failing).await, "dead");
}

/// The careful path locks only the events whose lease still holds: an event
/// another worker has taken over (and holds locked) does not make it wait for
/// that worker. (Here the takeover is not committed, so the row still shows
/// as this worker's, as when a claim holds it for a moment: the careful path
/// tries it again for at most two seconds, then gives it up.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_careful_path_does_not_wait_on_an_event_whose_lease_was_lost() {
    let (setup, taken, failing) = a_slow_good_event_and_a_failing_one().await;

    let mut other = setup.db.pool.begin().await.unwrap();
    let processing = setup.worker.process_next();
    let take_over = async {
        // While the handlers run, another worker takes `taken` and holds its row.
        tokio::time::sleep(Duration::from_millis(150)).await;
        sqlx::query("UPDATE inbox_events SET locked_by = 'another-worker' WHERE id = $1")
            .bind(taken)
            .execute(&mut *other)
            .await
            .unwrap();
    };
    let (outcomes, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(20), processing),
        take_over
    );
    let outcomes = outcomes
        .expect("the careful path did not wait for the other worker's lock")
        .unwrap();
    other.rollback().await.unwrap();
    assert!(outcomes.contains(&Processed::LeaseLost), "{outcomes:?}");
    assert_eq!(status_of(&setup.db, failing).await, "dead");
}

/// A deferred constraint fails at COMMIT, after every handler has run: the
/// event that broke it ends alone, the rest of the batch commits, and the
/// batch's external events run all the same.
#[tokio::test]
async fn a_failure_at_commit_sinks_only_its_own_event_and_never_the_external_ones() {
    let setup = setup(
        "[[route]]\nsource = \"begini\"\nevent_types = [\"external.*\"]\nhandler = \"ext\"\n\
         [[route]]\nsource = \"begini\"\nhandler = \"h\"\n\
         [handler.h]\nkind = \"sql\"\n\
         statement = \"INSERT INTO children (parent_id, event_id) VALUES (CASE WHEN $2 = 'bad.type' THEN 999 ELSE 1 END, $3)\"\n\
         [handler.ext]\nkind = \"exec\"\ncommand = [\"true\"]\n",
    )
    .await;
    sqlx::raw_sql(
        "CREATE TABLE parents (id int PRIMARY KEY);
         INSERT INTO parents VALUES (1);
         CREATE TABLE children (parent_id int REFERENCES parents DEFERRABLE INITIALLY DEFERRED, event_id uuid);",
    )
    .execute(&setup.db.pool)
    .await
    .unwrap();
    let good = store_event(&setup.db, "good.one").await;
    let bad = store_event(&setup.db, "bad.type").await;
    let also_good = store_event(&setup.db, "good.two").await;
    let external = store_event(&setup.db, "external.call").await;

    let outcomes = setup.worker.process_next().await.unwrap();

    assert_eq!(outcomes.len(), 4);
    assert_eq!(status_of(&setup.db, good).await, "succeeded");
    assert_eq!(status_of(&setup.db, also_good).await, "succeeded");
    assert_eq!(status_of(&setup.db, bad).await, "dead");
    assert_eq!(status_of(&setup.db, external).await, "succeeded");
    assert_eq!(scalar(&setup.db, "SELECT count(*) FROM children").await, 2);
}

/// A handler that never started (the worker was stopping) hands its event
/// back without using up one of its attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_never_started_does_not_count_against_max_attempts() {
    let text = worker_config(&format!(
        "{ROUTE_ALL_TO}[handler.h]\nkind = \"exec\"\ncommand = [\"sleep\", \"1\"]\n"
    ))
    .replace("concurrency = 4", "concurrency = 1")
    .replace("max_attempts = 3", "max_attempts = 1");
    let setup = setup_from(&text, LibraryHandlers::default()).await;
    let running = store_event(&setup.db, "application.complete").await;
    let waiting = store_event(&setup.db, "application.complete").await;

    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        stop.cancel();
    });
    setup.worker.run(shutdown).await.unwrap();

    assert_eq!(status_of(&setup.db, running).await, "succeeded");
    assert_eq!(status_of(&setup.db, waiting).await, "retrying");
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM inbox_events WHERE id = $1")
        .bind(waiting)
        .fetch_one(&setup.db.pool)
        .await
        .unwrap();
    assert_eq!(attempts, 0, "the attempt that never started is not counted");
    assert_eq!(attempt_outcomes(&setup.db, waiting).await, ["retry"]);
}

/// Follows a script per event type: on its n-th call for that type, sleeps
/// for the step's milliseconds, then succeeds or fails (retryably).
struct Scripted(
    Mutex<std::collections::HashMap<String, usize>>,
    Vec<(&'static str, Vec<(u64, bool)>)>,
);

impl Scripted {
    fn new(script: Vec<(&'static str, Vec<(u64, bool)>)>) -> Self {
        Self(Mutex::default(), script)
    }
}

#[async_trait]
impl Handler for Scripted {
    async fn handle(&self, event: &Event, _: &mut PgConnection) -> Result<(), HandlerError> {
        let kind = event.event_type.clone().unwrap_or_default();
        let call = {
            let mut calls = self.0.lock().unwrap();
            let call = calls.entry(kind.clone()).or_default();
            *call += 1;
            *call - 1
        };
        let steps = &self.1.iter().find(|(k, _)| *k == kind).unwrap().1;
        let (pause, succeeds) = steps.get(call).copied().unwrap_or((0, true));
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if succeeds {
            Ok(())
        } else {
            Err(HandlerError::retryable("scripted failure"))
        }
    }
}

/// A stale completion of the same worker (its lease on `taken.over` was lost
/// and the event claimed again) must not lock the newer claim's row: the newer
/// claim's careful path would skip it as "lease lost" and drop its outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_careful_completion_never_locks_the_newer_claim_of_its_event() {
    let library = LibraryHandlers::default().with(
        "scripted",
        Scripted::new(vec![
            // 1st: the stale claim's run; 2nd: the newer claim fails first,
            // so it completes the careful way; 3rd: that careful run.
            ("taken.over", vec![(1000, true), (700, false), (0, true)]),
            // Sends the stale batch the careful way, then keeps its
            // transaction open while the newer claim completes.
            ("slow.neighbour", vec![(0, false), (1500, true)]),
        ]),
    );
    let setup = setup_with(
        "[[route]]\nsource = \"begini\"\nhandler = \"scripted\"\n[handler.scripted]\nkind = \"library\"\n",
        library,
    )
    .await;
    let taken = store_event(&setup.db, "taken.over").await;
    let neighbour = store_event(&setup.db, "slow.neighbour").await;

    let stale = setup.worker.process_next();
    let newer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The stale claim's lease on `taken.over` runs out; rescue hands it back.
        sqlx::query(
            "UPDATE inbox_events SET locked_until = now() - interval '1 second' WHERE id = $1",
        )
        .bind(taken)
        .execute(&setup.db.pool)
        .await
        .unwrap();
        assert_eq!(setup.worker.rescue_expired_leases().await.unwrap(), 1);
        sqlx::query("UPDATE inbox_events SET next_attempt_at = now() WHERE id = $1")
            .bind(taken)
            .execute(&setup.db.pool)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        setup.worker.process_next().await.unwrap()
    };
    let (stale, newer) = tokio::join!(stale, newer);

    assert_eq!(
        newer,
        [Processed::Recorded(hookbox::AttemptOutcome::Succeeded)]
    );
    assert_eq!(
        stale.unwrap(),
        [
            Processed::LeaseLost,
            Processed::Recorded(hookbox::AttemptOutcome::Succeeded)
        ]
    );
    assert_eq!(status_of(&setup.db, taken).await, "succeeded");
    assert_eq!(
        attempt_outcomes(&setup.db, taken).await,
        ["lease_expired", "succeeded"]
    );
    assert_eq!(status_of(&setup.db, neighbour).await, "succeeded");
}

/// Says that it started, then never finishes in time for a shutdown.
struct Hangs(Arc<tokio::sync::Notify>);

#[async_trait]
impl Handler for Hangs {
    async fn handle(&self, _: &Event, _: &mut PgConnection) -> Result<(), HandlerError> {
        self.0.notify_one();
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok(())
    }
}

/// An event released at shutdown on its last attempt has used its attempts:
/// it ends `dead` like a rescued one, never comes back as an attempt beyond
/// `max_attempts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_released_on_its_last_attempt_ends_dead_and_never_exceeds_max_attempts() {
    let started = Arc::new(tokio::sync::Notify::new());
    let library = LibraryHandlers::default().with("hangs", Hangs(started.clone()));
    let text = worker_config(
        "[[route]]\nsource = \"begini\"\nhandler = \"hangs\"\n[handler.hangs]\nkind = \"library\"\n",
    )
    .replace("poll_interval", "shutdown_grace = \"300ms\"\npoll_interval");
    let setup = setup_from(&text, library).await;
    let id = store_event(&setup.db, "application.complete").await;
    // Two attempts already spent (max_attempts = 3).
    sqlx::query("UPDATE inbox_events SET attempts = 2, status = 'retrying' WHERE id = $1")
        .bind(id)
        .execute(&setup.db.pool)
        .await
        .unwrap();

    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(setup.worker.run(shutdown.clone()));
    // The handler has started: the attempt counts (a handler that had not
    // started would be handed back uncounted).
    tokio::time::timeout(Duration::from_secs(20), started.notified())
        .await
        .expect("the handler never started");
    shutdown.cancel();
    running.await.unwrap().unwrap();

    assert_eq!(status_of(&setup.db, id).await, "dead");
    assert_eq!(
        scalar(
            &setup.db,
            &format!("SELECT attempts::int8 FROM inbox_events WHERE id = '{id}'")
        )
        .await,
        3
    );
}

/// A burst after a quiet spell: the statistics say nothing is pending, then
/// thousands of events are. A claim of 500 must still look its candidates up
/// by primary key, not walk every pending event (the cached generic plan of
/// schema V12 did: 3.4 s per claim over 100,000 pending events, until
/// autovacuum analyzed the table). Counted, not timed: the heap rows the
/// claim's transaction fetched through indexes.
#[tokio::test]
async fn a_claim_after_a_burst_the_statistics_have_not_seen_reads_only_its_candidates() {
    let db = database().await;
    let insert = |status: &'static str, n: i32| {
        format!(
            "INSERT INTO inbox_event_state (id, source, environment, event_key, event_type, payload_sha256, status, processed_at)
             SELECT gen_random_uuid(), 'begini', 'sandbox', '{status}-' || g, 't', md5(g::text), '{status}',
                    CASE WHEN '{status}' = 'succeeded' THEN now() END
             FROM generate_series(1, {n}) g"
        )
    };
    // Finished events analyzed, autovacuum off, then a burst of pending ones.
    for statement in [
        "ALTER TABLE inbox_event_state SET (autovacuum_enabled = false)".to_owned(),
        insert("succeeded", 20_000),
        "ANALYZE inbox_event_state".to_owned(),
        insert("pending", 10_000),
    ] {
        sqlx::query(&statement).execute(&db.pool).await.unwrap();
    }

    let mut transaction = db.pool.begin().await.unwrap();
    let claimed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM inbox_claim('w1', 500, 60, '{begini}', '{1}', '{begini}', '{NULL}', '{h}',
                                          '{}', '{}', '{}', '{}', '{}')",
    )
    .fetch_one(&mut *transaction)
    .await
    .unwrap();
    let fetched: i64 = sqlx::query_scalar(
        "SELECT idx_tup_fetch FROM pg_stat_xact_user_tables WHERE relname = 'inbox_event_state'",
    )
    .fetch_one(&mut *transaction)
    .await
    .unwrap();
    transaction.commit().await.unwrap();

    assert_eq!(claimed, 500);
    assert!(
        fetched < 5_000,
        "the claim fetched {fetched} event rows through indexes for 500 candidates"
    );
}

#[tokio::test]
async fn completing_a_batch_while_thousands_of_attempts_are_in_flight_reads_only_its_own_attempts()
{
    let setup = setup(&format!(
        "{ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\nstatement = \"INSERT INTO side_effects (event_id, attempt) VALUES ($3, $6)\"\n"
    ))
    .await;
    let events = |status: &str, n: i32| {
        format!(
            "WITH event AS (
                 INSERT INTO inbox_event_state (id, source, environment, event_key, event_type, payload_sha256,
                                                status, attempts, processed_at, locked_by, locked_until,
                                                attempt_id, attempt_started_at, attempt_handler)
                 SELECT gen_random_uuid(), 'begini', 'sandbox', '{status}-' || g, 't', md5(g::text), '{status}', 1,
                        CASE WHEN '{status}' = 'succeeded' THEN now() END,
                        CASE WHEN '{status}' = 'processing' THEN 'another-worker' END,
                        CASE WHEN '{status}' = 'processing' THEN now() + interval '1 hour' END,
                        CASE WHEN '{status}' = 'processing' THEN nextval('inbox_attempts_id_seq') END,
                        CASE WHEN '{status}' = 'processing' THEN now() END,
                        CASE WHEN '{status}' = 'processing' THEN 'h' END
                 FROM generate_series(1, {n}) g
                 RETURNING id
             )
             -- An attempt in flight has no row yet (schema V17).
             INSERT INTO inbox_attempts (event_id, attempt, worker_id, handler, finished_at, outcome)
             SELECT id, 1, 'another-worker', 'h', now(), 'succeeded'
             FROM event WHERE '{status}' = 'succeeded'"
        )
    };
    // A day's finished attempts as the statistics last saw them (almost none
    // in flight), then, before autovacuum looks again, another worker's
    // thousands of open attempts.
    for statement in [
        events("succeeded", 20_000),
        "ANALYZE inbox_event_state, inbox_attempts".to_owned(),
        "DO $$ DECLARE p regclass; BEGIN
             FOR p IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'inbox_attempts'::regclass LOOP
                 EXECUTE format('ALTER TABLE %s SET (autovacuum_enabled = false)', p);
             END LOOP;
         END $$"
            .to_owned(),
        events("processing", 3_000),
    ] {
        sqlx::query(&statement).execute(&setup.db.pool).await.unwrap();
    }
    let mut ids = Vec::new();
    for _ in 0..100 {
        ids.push(store_event(&setup.db, "psychometric_score.complete").await);
    }

    let mut finished = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while finished < ids.len() && Instant::now() < deadline {
        finished += setup.worker.process_next().await.unwrap().len();
    }

    assert_eq!(finished, ids.len());
    for id in &ids {
        assert_eq!(status_of(&setup.db, *id).await, "succeeded");
    }
    // The worker's backends report their reads when they go idle; its
    // attempt rows, written with their outcomes, arrive in the same report.
    let reports = "SELECT coalesce(sum(t.n_tup_ins), 0)::int8 FROM pg_stat_user_tables t
                   JOIN pg_inherits i ON i.inhrelid = t.relid
                   WHERE i.inhparent = 'inbox_attempts'::regclass";
    let expected = 20_000 + ids.len() as i64;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut reported = scalar(&setup.db, reports).await;
    while reported < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        reported = scalar(&setup.db, reports).await;
    }
    assert!(
        reported >= expected,
        "the worker's reads were never reported, so none could be counted"
    );
    // The events in flight are the lease index's entries: a completion that
    // walked it for each outcome would read 3,000 entries per event.
    let in_flight_reads = scalar(
        &setup.db,
        "SELECT coalesce(sum(idx_tup_read), 0)::int8 FROM pg_stat_user_indexes
         WHERE indexrelname = 'inbox_events_lease_idx'",
    )
    .await;
    assert!(
        in_flight_reads < 3_000,
        "completing 100 events read {in_flight_reads} entries of the lease index"
    );
}

/// A later migration that redefines the claim with `CREATE OR REPLACE` sets
/// its settings anew: this keeps the three that its speed rests on (no JIT
/// since migration V9, cached generic plans since V11, costs for pages in
/// memory since V14; BENCHMARKS.md).
#[tokio::test]
async fn the_claim_runs_cached_generic_plans_without_jit_costed_for_pages_in_memory() {
    let db = database().await;
    let settings: Vec<String> = sqlx::query_scalar(
        "SELECT unnest(proconfig) FROM pg_proc WHERE proname = 'inbox_claim' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        settings,
        [
            "jit=off",
            "plan_cache_mode=force_generic_plan",
            "random_page_cost=1.1"
        ]
    );
}

/// Outcomes are recorded by primary key from a connection's first batch on:
/// sent as a plain statement, the first five plans on each connection read
/// the whole state table to record a batch of 500 (V15; BENCHMARKS.md).
#[tokio::test]
async fn recording_the_first_outcomes_on_a_connection_does_not_read_the_whole_state_table() {
    let setup = setup(&format!(
        "{ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\nstatement = \"INSERT INTO side_effects (event_id, attempt) VALUES ($3, $6)\"\n"
    ))
    .await;
    // A day's history, as the statistics know it, and a backlog of 500.
    for statement in [
        store_events("succeeded", 20_000, "now() - interval '2 days'"),
        store_events("pending", 500, "now()"),
        "ANALYZE inbox_event_state, inbox_attempts".to_owned(),
    ] {
        sqlx::query(&statement)
            .execute(&setup.db.pool)
            .await
            .unwrap();
    }
    let read_in_full = "SELECT coalesce(seq_tup_read, 0)::int8 FROM pg_stat_user_tables
                        WHERE relid = 'inbox_event_state'::regclass";
    let before = scalar(&setup.db, read_in_full).await;

    let mut finished = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while finished < 500 && Instant::now() < deadline {
        finished += setup.worker.process_next().await.unwrap().len();
    }

    assert_eq!(finished, 500);
    assert_eq!(
        scalar(&setup.db, "SELECT count(*) FROM side_effects").await,
        500
    );
    // The worker's backends report their reads when they go idle, with their
    // updates: one at the claim and one at the outcome, for each event.
    let reports =
        "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relid = 'inbox_event_state'::regclass";
    let deadline = Instant::now() + Duration::from_secs(20);
    while scalar(&setup.db, reports).await < 1_000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        scalar(&setup.db, reports).await >= 1_000,
        "the worker's updates were never reported"
    );
    let read = scalar(&setup.db, read_in_full).await - before;
    assert!(
        read < 20_000,
        "completing 500 events read {read} state rows in sequential scans"
    );
}

/// A completion whose statement began before a rescue, a replay and a new
/// claim of one of its events by the same worker (same attempt number) must
/// not count that event as recorded: the worker would commit the stale
/// outcome over the new claim and leave the new claim's attempt row open for
/// ever. Found by interleaving sessions on a real server; the optimistic path
/// completes without locking its events first, so the database decides.
#[tokio::test]
async fn a_completion_that_outlived_a_rescue_replay_and_new_claim_records_nothing_for_that_event() {
    let setup = setup(&format!(
        "{ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\nstatement = \"INSERT INTO side_effects (event_id) VALUES ($3)\"\n"
    ))
    .await;
    let pool = &setup.db.pool;
    let rescued = store_event(&setup.db, "psychometric_score.complete").await;
    let held = store_event(&setup.db, "psychometric_score.complete").await;
    // The batch lists the held event first, so the completion waits there
    // while the other is rescued, replayed and claimed again.
    sqlx::query(&format!(
        "CREATE TABLE stale_claim AS SELECT c.*, CASE WHEN c.id = '{held}' THEN 1 ELSE 2 END AS position FROM ({}) c",
        claim_as_w1(10)
    ))
    .execute(pool)
    .await
    .unwrap();
    let first_attempt: i64 = sqlx::query_scalar(&format!(
        "SELECT attempt_id FROM stale_claim WHERE id = '{rescued}'"
    ))
    .fetch_one(pool)
    .await
    .unwrap();

    let mut locker = pool.acquire().await.unwrap();
    sqlx::query("BEGIN").execute(&mut *locker).await.unwrap();
    sqlx::query(&format!(
        "SELECT 1 FROM inbox_event_state WHERE id = '{held}' FOR NO KEY UPDATE"
    ))
    .execute(&mut *locker)
    .await
    .unwrap();
    let completion = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut transaction = pool.begin().await.unwrap();
            let recorded: i64 = sqlx::query_scalar(&finish_as_w1("stale_claim", "position"))
                .fetch_one(&mut *transaction)
                .await
                .unwrap();
            // What the worker does: commit only if every outcome was recorded.
            if recorded == 2 {
                transaction.commit().await.unwrap();
            } else {
                transaction.rollback().await.unwrap();
            }
            recorded
        })
    };
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%inbox_finish%'";
    let deadline = Instant::now() + Duration::from_secs(20);
    while scalar(&setup.db, waiting).await == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        scalar(&setup.db, waiting).await,
        1,
        "the completion never waited for the held event"
    );
    sqlx::query(&format!(
        "UPDATE inbox_event_state SET locked_until = now() - interval '1 second' WHERE id = '{rescued}'"
    ))
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(setup.worker.rescue_expired_leases().await.unwrap(), 1);
    // A replay: back to pending, the attempt count restarted.
    sqlx::query(&format!(
        "UPDATE inbox_event_state SET status = 'pending', attempts = 0, next_attempt_at = now(), processed_at = NULL
         WHERE id = '{rescued}'"
    ))
    .execute(pool)
    .await
    .unwrap();
    let new_attempt: i64 =
        sqlx::query_scalar(&format!("SELECT attempt_id FROM ({}) c", claim_as_w1(1)))
            .fetch_one(pool)
            .await
            .unwrap();
    sqlx::query("COMMIT").execute(&mut *locker).await.unwrap();

    assert_eq!(
        completion.await.unwrap(),
        1,
        "the stale outcome was counted as recorded"
    );
    let state: (String, String, i32) = sqlx::query_as(&format!(
        "SELECT status, locked_by, attempts FROM inbox_event_state WHERE id = '{rescued}'"
    ))
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(state, ("processing".into(), "w1".into(), 1));
    let attempts: Vec<(i64, Option<String>)> = sqlx::query_as(&format!(
        "SELECT id, outcome FROM inbox_attempts WHERE event_id = '{rescued}' ORDER BY id"
    ))
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(attempts, [(first_attempt, Some("lease_expired".into()))]);
    // The new claim's attempt is in flight: on the event row, its own row
    // written when it ends (schema V17).
    let in_flight: Option<i64> = sqlx::query_scalar(&format!(
        "SELECT attempt_id FROM inbox_event_state WHERE id = '{rescued}'"
    ))
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(in_flight, Some(new_attempt));
}

/// A connection's cached plan for recording outcomes was made while the
/// attempts partition now being written was empty (after a VACUUM, or a
/// partition made ahead of the day it serves): a sequential scan of an
/// empty table looked free, so the plan read that partition once per
/// outcome. Once the day's attempts fill it, each batch read it 500 times
/// over, until something invalidated the plan (V15 sets enable_seqscan off
/// for the function: every row it reads has a primary key to reach it by).
#[tokio::test]
async fn outcomes_recorded_on_a_plan_made_while_the_attempts_partition_was_empty_read_it_by_index()
{
    let (attempts_read, _) = rows_read_recording_500_outcomes_on_a_plan_cached_over(5_000).await;
    assert!(
        attempts_read < 100_000,
        "recording 500 outcomes read {attempts_read} attempt rows"
    );
}

/// The same on a new installation: a plan made while every table was tiny
/// read whole tables into hash joins (or a materialized scan), once per
/// batch, and kept doing so as they grew (V15 sets hash joins, merge joins
/// and materialization off for the function: each outcome reaches its rows
/// by key whatever the tables' size).
#[tokio::test]
async fn outcomes_recorded_on_a_plan_made_while_the_tables_were_tiny_reach_their_rows_by_key() {
    let (attempts_read, events_read) =
        rows_read_recording_500_outcomes_on_a_plan_cached_over(50).await;
    assert!(
        attempts_read < 10_000 && events_read < 10_000,
        "recording 500 outcomes read {attempts_read} attempt rows and {events_read} event rows"
    );
}

/// Stores `history` finished events (their attempts two days old), caches the
/// outcome function's plan on one connection while today's attempts
/// partition is empty and vacuumed, lets the day fill it with 20,000
/// attempts, claims 500 events (on another connection) and records their
/// outcomes on the first one. Returns the rows the outcomes read from
/// today's attempts partition and from the event state table (sequential
/// and index reads).
async fn rows_read_recording_500_outcomes_on_a_plan_cached_over(history: i32) -> (i64, i64) {
    let setup = setup(&format!(
        "{ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\nstatement = \"INSERT INTO side_effects (event_id) VALUES ($3)\"\n"
    ))
    .await;
    let pool = &setup.db.pool;
    let finish_all = finish_as_w1("claimed", "id");
    // Yesterday's history (in the partition before today's), and today's
    // attempts partition empty and vacuumed. Autovacuum stays away, so
    // nothing invalidates the plan behind the test's back.
    for statement in [
        store_events("succeeded", history, "now() - interval '2 days'"),
        "ALTER TABLE inbox_attempts_default SET (autovacuum_enabled = false)".to_owned(),
        "ALTER TABLE inbox_event_state SET (autovacuum_enabled = false)".to_owned(),
        "VACUUM ANALYZE inbox_event_state, inbox_attempts, inbox_attempts_default".to_owned(),
        store_events("pending", 1, "now()"),
    ] {
        sqlx::query(&statement).execute(pool).await.unwrap();
    }
    // The claims go through other connections: only the outcome function's
    // plan, cached on this one, is measured.
    let mut worker = pool.acquire().await.unwrap();
    sqlx::query(&format!("CREATE TABLE claimed AS {}", claim_as_w1(1)))
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(&finish_all)
        .execute(&mut *worker)
        .await
        .unwrap();
    // The day goes on: its attempts fill the partition, and a backlog waits.
    for statement in [
        store_events("succeeded", 20_000, "now()"),
        store_events("pending", 500, "now()"),
    ] {
        sqlx::query(&statement).execute(pool).await.unwrap();
    }
    for statement in [
        "DROP TABLE claimed".to_owned(),
        format!("CREATE TABLE claimed AS {}", claim_as_w1(500)),
    ] {
        sqlx::query(&statement).execute(pool).await.unwrap();
    }
    // Backends report their reads when they go idle, with their writes to
    // today's attempts: 1 + 20,000 + 500 rows inserted before the outcomes,
    // and 1 + 500 updated once they are recorded.
    async fn reported(db: &TestDb, n: i64) {
        let written = "SELECT (n_tup_ins + n_tup_upd)::int8 FROM pg_stat_user_tables
                       WHERE relid = 'inbox_attempts_default'::regclass";
        let deadline = Instant::now() + Duration::from_secs(20);
        while scalar(db, written).await < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    reported(&setup.db, 1 + 20_000 + 500 + 1).await;
    let rows_read = |table: &str| {
        format!(
            "SELECT (coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0))::int8 FROM pg_stat_user_tables
             WHERE relid = '{table}'::regclass"
        )
    };
    let attempts_before = scalar(&setup.db, &rows_read("inbox_attempts_default")).await;
    let events_before = scalar(&setup.db, &rows_read("inbox_event_state")).await;

    let recorded: i64 = sqlx::query_scalar(&finish_all)
        .fetch_one(&mut *worker)
        .await
        .unwrap();
    drop(worker);
    reported(&setup.db, 1 + 20_000 + 500 + 1 + 500).await;

    assert_eq!(recorded, 500);
    (
        scalar(&setup.db, &rows_read("inbox_attempts_default")).await - attempts_before,
        scalar(&setup.db, &rows_read("inbox_event_state")).await - events_before,
    )
}

/// Stores `n` events of `status` straight into the tables, each with a
/// payload and, when `succeeded`, its finished attempt started at the SQL
/// expression `attempt_started`.
fn store_events(status: &str, n: i32, attempt_started: &str) -> String {
    format!(
        "WITH event AS (
             INSERT INTO inbox_event_state (id, source, environment, event_key, event_type, payload_sha256,
                                            status, attempts, processed_at)
             SELECT gen_random_uuid(), 'begini', 'sandbox', '{status}-' || g || '-' || gen_random_uuid(),
                    'psychometric_score.complete', md5(g::text), '{status}',
                    CASE WHEN '{status}' = 'succeeded' THEN 1 ELSE 0 END,
                    CASE WHEN '{status}' = 'succeeded' THEN now() END
             FROM generate_series(1, {n}) g
             RETURNING id
         ), payload AS (
             INSERT INTO inbox_payloads (event_id, payload, payload_is_json, headers)
             SELECT id, convert_to('{{}}', 'UTF8'), true, '{{}}' FROM event
         )
         INSERT INTO inbox_attempts (event_id, attempt, worker_id, handler, started_at, finished_at, outcome)
         SELECT id, 1, 'another-worker', 'h', {attempt_started}, {attempt_started}, 'succeeded'
         FROM event WHERE '{status}' = 'succeeded'"
    )
}

/// The claim of up to `limit` due events by worker `w1`, every event routed
/// to handler `h`, as the worker calls it.
fn claim_as_w1(limit: i32) -> String {
    format!(
        "SELECT * FROM inbox_claim('w1', {limit}, 300, '{{begini}}', '{{1}}', '{{begini}}', '{{NULL}}', '{{h}}',
                                   '{{}}', '{{}}', '{{}}', '{{}}', '{{}}')"
    )
}

/// Records every claim saved in `table` (rows of `inbox_claim`) as
/// succeeded for worker `w1`, in the order of `order_by`, as the worker
/// does; returns how many were recorded.
fn finish_as_w1(table: &str, order_by: &str) -> String {
    let column =
        |expression: &str| format!("ARRAY(SELECT {expression} FROM {table} ORDER BY {order_by})");
    format!(
        "SELECT count(*) FROM inbox_finish('w1', {}, {}, {}, {}, {}, {}, {}, {}, {}, {})",
        column("id"),
        column("attempt_id"),
        column("attempt_started_at"),
        column("attempts"),
        column("'succeeded'"),
        column("'succeeded'"),
        column("'h'"),
        column("NULL::text"),
        column("NULL::float8"),
        column("false")
    )
}

/// What an operator sees of an attempt in flight, read while its handler runs.
struct InFlight {
    attempt_id: i64,
    started_at: chrono::DateTime<chrono::Utc>,
    attempt_rows: i64,
    timeline: Vec<String>,
}

async fn watch_in_flight(db: &TestDb, id: Uuid) -> InFlight {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let row: Option<(i64, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
            "SELECT attempt_id, attempt_started_at FROM inbox_event_state
             WHERE id = $1 AND status = 'processing'",
        )
        .bind(id)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        if let Some((attempt_id, started_at)) = row {
            let attempt_rows =
                sqlx::query_scalar("SELECT count(*) FROM inbox_attempts WHERE event_id = $1")
                    .bind(id)
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            let timeline = sqlx::query_scalar(
                "SELECT outcome FROM inbox_event_timeline WHERE event_id = $1 AND kind = 'attempt'",
            )
            .bind(id)
            .fetch_all(&db.pool)
            .await
            .unwrap();
            return InFlight {
                attempt_id,
                started_at,
                attempt_rows,
                timeline,
            };
        }
        assert!(
            Instant::now() < deadline,
            "the event was never seen in flight"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The attempt's row as written: id, start, outcome, whether it has an end.
async fn attempt_rows(
    db: &TestDb,
    id: Uuid,
) -> Vec<(i64, chrono::DateTime<chrono::Utc>, String, bool)> {
    sqlx::query_as(
        "SELECT id, started_at, outcome, finished_at IS NOT NULL FROM inbox_attempts
         WHERE event_id = $1 ORDER BY attempt",
    )
    .bind(id)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_in_flight_shows_on_its_event_and_its_row_is_written_once_with_its_outcome() {
    let setup = setup(&format!(
        "{ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\nstatement = \"INSERT INTO side_effects (event_id) SELECT $3 FROM pg_sleep(0.5)\"\n"
    ))
    .await;
    let id = store_event(&setup.db, "application.complete").await;

    let (processed, in_flight) =
        tokio::join!(setup.worker.process_next(), watch_in_flight(&setup.db, id));
    processed.unwrap();

    assert_eq!(in_flight.attempt_rows, 0, "no attempt row while it runs");
    assert_eq!(in_flight.timeline, ["running"]);
    assert_eq!(status_of(&setup.db, id).await, "succeeded");
    assert_eq!(
        attempt_rows(&setup.db, id).await,
        [(
            in_flight.attempt_id,
            in_flight.started_at,
            "succeeded".to_owned(),
            true
        )],
        "one row, with the id and start the event showed while it ran"
    );
    assert_eq!(
        scalar(
            &setup.db,
            &format!(
                "SELECT count(*) FROM inbox_event_state WHERE id = '{id}' AND attempt_id IS NULL"
            )
        )
        .await,
        1
    );
}

/// The schema version that writes an attempt's row once, when it ends
/// (migrations/V17__attempt_row_written_once.sql).
const ATTEMPT_ROW_AT_OUTCOME_VERSION: i32 = 17;

#[tokio::test]
async fn attempts_in_flight_across_the_upgrade_are_recorded_once_with_the_ids_they_started_with() {
    let db = database_at(ATTEMPT_ROW_AT_OUTCOME_VERSION - 1).await;
    let finishing = store_event(&db, "application.complete").await;
    let abandoned = store_event(&db, "application.complete").await;
    // Claimed by a worker of the previous release, which wrote an open
    // attempt row; the second worker has died (its lease has run out).
    let mut started = Vec::new();
    for (id, lease) in [(finishing, "1 minute"), (abandoned, "-1 second")] {
        let row: (i64, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
            "WITH claimed AS (
                 UPDATE inbox_events SET status = 'processing', attempts = 1, locked_by = 'old-worker',
                                         locked_until = now() + $2::interval
                 WHERE id = $1 RETURNING id)
             INSERT INTO inbox_attempts (event_id, attempt, worker_id, handler)
             SELECT id, 1, 'old-worker', 'h' FROM claimed RETURNING id, started_at",
        )
        .bind(id)
        .bind(lease)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        started.push(row);
    }

    hookbox::db::migrate(&db.url).await.unwrap();
    let handler = format!("{ROUTE_ALL_TO}[handler.h]\nkind = \"sql\"\nstatement = \"SELECT 1\"\n");
    let setup = setup_on(db, &worker_config(&handler), LibraryHandlers::default()).await;

    assert!(attempt_rows(&setup.db, finishing).await.is_empty());
    let timeline: Vec<String> = sqlx::query_scalar(
        "SELECT outcome FROM inbox_event_timeline WHERE event_id = $1 AND kind = 'attempt'",
    )
    .bind(finishing)
    .fetch_all(&setup.db.pool)
    .await
    .unwrap();
    assert_eq!(timeline, ["running"], "still shown as running");
    // The old worker records its outcome (its release calls inbox_finish).
    let recorded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM inbox_finish('old-worker', ARRAY[$1::uuid], ARRAY[$2::int8], ARRAY[$3::timestamptz],
                                           ARRAY[1], ARRAY['succeeded'], ARRAY['succeeded'], ARRAY['h'],
                                           ARRAY[NULL::text], ARRAY[NULL::float8], ARRAY[false])",
    )
    .bind(finishing)
    .bind(started[0].0)
    .bind(started[0].1)
    .fetch_one(&setup.db.pool)
    .await
    .unwrap();
    assert_eq!(recorded, 1);
    setup.worker.rescue_expired_leases().await.unwrap();

    assert_eq!(
        attempt_rows(&setup.db, finishing).await,
        [(started[0].0, started[0].1, "succeeded".to_owned(), true)]
    );
    assert_eq!(
        attempt_rows(&setup.db, abandoned).await,
        [(started[1].0, started[1].1, "lease_expired".to_owned(), true)]
    );
    assert_eq!(status_of(&setup.db, finishing).await, "succeeded");
    assert_eq!(status_of(&setup.db, abandoned).await, "retrying");
}
