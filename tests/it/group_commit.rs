//! Group commit: concurrent deliveries share a transaction, each answered only
//! after it commits; duplicates inside a batch, a refused row and a full queue.

use std::time::Duration;

use futures_util::future::join_all;
use hookbox::{
    event_key::sha256_hex,
    store::{self, IngestOutcome, NewDelivery, Origin},
};

use crate::support::*;

fn begini_with(receiver: &str) -> String {
    BEGINI_CONFIG.replace("[receiver]\n", &format!("[receiver]\n{receiver}\n"))
}

async fn spawn_begini_with(receiver: &str) -> TestApp {
    TestApp::spawn(&begini_with(receiver), &[("BEGINI_API_KEY", BEGINI_KEY)]).await
}

/// Every write to `table` waits until the returned transaction ends.
async fn block_writes_to(app: &TestApp, table: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut blocker = app.db.pool.begin().await.unwrap();
    sqlx::query(&format!("LOCK TABLE {table} IN EXCLUSIVE MODE"))
        .execute(&mut *blocker)
        .await
        .unwrap();
    blocker
}

async fn release_after(blocker: sqlx::Transaction<'static, sqlx::Postgres>, wait: Duration) {
    tokio::time::sleep(wait).await;
    blocker.rollback().await.unwrap();
}

fn fresh_bodies(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|_| begini_payload(&unique_uid(), "psychometric_score.complete"))
        .collect()
}

/// One gathering window long enough for every concurrent request to join.
const ONE_BATCH: &str = "http_workers = 1\nbatch_committers = 1\nbatch_max_wait = \"300ms\"";

#[tokio::test]
async fn concurrent_deliveries_of_one_event_share_a_batch_and_store_it_once() {
    let app = spawn_begini_with(ONE_BATCH).await;
    let body = begini_payload(&unique_uid(), "psychometric_score.complete");

    let answers = join_all((0..24).map(|_| app.post_signed("begini", &body))).await;

    let mut statuses: Vec<&str> = answers
        .iter()
        .map(|a| {
            assert_eq!(a.status, 200);
            a.body["status"].as_str().unwrap()
        })
        .collect();
    statuses.sort();
    assert_eq!(statuses[0], "accepted");
    assert_eq!(statuses[1..], ["duplicate"; 23]);
    let event_ids: std::collections::HashSet<_> = answers.iter().map(|a| a.event_id()).collect();
    assert_eq!(
        event_ids.len(),
        1,
        "every answer names the one stored event"
    );
    assert_eq!(app.count("SELECT count(*) FROM inbox_events").await, 1);
    assert_eq!(
        app.count(
            "SELECT count(*) FROM inbox_deliveries WHERE outcome IN ('accepted', 'duplicate')"
        )
        .await,
        24
    );
    assert!(
        app.count(
            "SELECT max(n) FROM (SELECT count(*) AS n FROM inbox_deliveries GROUP BY xmin::text) t"
        )
        .await
            > 1,
        "deliveries were committed together"
    );
}

#[tokio::test]
async fn a_key_repeated_within_one_batch_is_stored_once_then_duplicate_then_conflict() {
    let db = database().await;
    let delivery = |key: &str, body: &[u8]| NewDelivery {
        ordering: None,
        source: "begini".into(),
        environment: "sandbox".into(),
        event_key: key.into(),
        event_type: None,
        payload_is_json: false,
        payload: body.to_vec(),
        headers: serde_json::json!({}),
        payload_sha256: sha256_hex(body),
        remote_addr: None,
    };
    let batch = [
        delivery("k1", b"first"),
        delivery("k2", b"other"),
        delivery("k1", b"first"),
        delivery("k1", b"changed"),
    ];

    let mut connection = db.pool.acquire().await.unwrap();
    let outcomes = store::ingest_batch(&mut connection, &batch, Origin::Http)
        .await
        .unwrap();

    let kinds: Vec<IngestOutcome> = outcomes.iter().map(|(kind, _)| *kind).collect();
    assert_eq!(
        kinds,
        [
            IngestOutcome::Accepted,
            IngestOutcome::Accepted,
            IngestOutcome::Duplicate,
            IngestOutcome::Conflict
        ]
    );
    assert_eq!(outcomes[0].1, outcomes[2].1);
    assert_eq!(outcomes[0].1, outcomes[3].1);
    let stored: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT event_key, payload FROM inbox_events ORDER BY event_key")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        stored,
        [
            ("k1".into(), b"first".to_vec()),
            ("k2".into(), b"other".to_vec())
        ],
        "the first delivery of a key is the one stored"
    );
    let rows: Vec<String> = sqlx::query_scalar("SELECT outcome FROM inbox_deliveries ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, ["accepted", "accepted", "duplicate", "conflict"]);
}

#[tokio::test]
async fn a_row_the_database_refuses_fails_only_its_own_request() {
    let app = spawn_begini_with(ONE_BATCH).await;
    let bodies = fresh_bodies(12);
    let refused = sha256_hex(&bodies[5]);
    sqlx::query(&format!(
        "ALTER TABLE inbox_event_state ADD CONSTRAINT refuse_one CHECK (payload_sha256 <> '{refused}')"
    ))
    .execute(&app.db.pool)
    .await
    .unwrap();

    let answers = join_all(bodies.iter().map(|body| app.post_signed("begini", body))).await;

    for (i, answer) in answers.iter().enumerate() {
        if i == 5 {
            assert_eq!(answer.status, 503);
            assert_eq!(
                answer.body,
                serde_json::json!({ "detail": "Service Unavailable" })
            );
        } else {
            assert_eq!(answer.status, 200, "delivery {i}");
            assert_eq!(answer.body["status"], "accepted");
        }
    }
    assert_eq!(app.count("SELECT count(*) FROM inbox_events").await, 11);
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM inbox_events WHERE payload_sha256 = '{refused}'"
        ))
        .await,
        0
    );
}

/// A batch the database refuses only at its COMMIT (a deferred constraint)
/// fails alone: the one committer's next batches, on the connection it keeps
/// or on another, are stored as usual.
#[tokio::test]
async fn a_batch_refused_at_its_commit_leaves_the_committers_next_batches_stored() {
    let app = spawn_begini_with("http_workers = 1\nbatch_committers = 1").await;
    let bodies = fresh_bodies(3);
    let refused = sha256_hex(&bodies[0]);
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.payload_sha256 = '{refused}' THEN
                 RAISE check_violation USING MESSAGE = 'refused at commit';
             END IF;
             RETURN NULL;
         END $$;
         CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON inbox_event_state
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_at_commit();"
    ))
    .execute(&app.db.pool)
    .await
    .unwrap();

    let mut answers = Vec::new();
    for body in &bodies {
        answers.push(app.post_signed("begini", body).await);
    }

    assert_eq!(answers[0].status, 503);
    for answer in &answers[1..] {
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body["status"], "accepted");
    }
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM inbox_events WHERE payload_sha256 = '{refused}'"
        ))
        .await,
        0
    );
    assert_eq!(app.count("SELECT count(*) FROM inbox_events").await, 2);
}

/// With one database connection the committer and `/readyz` share it: a
/// committer keeps its connection only while deliveries keep coming.
#[tokio::test]
async fn a_receiver_with_one_database_connection_is_ready_again_once_deliveries_stop() {
    let app = TestApp::spawn(
        &format!("[database]\nmax_connections = 1\n{BEGINI_CONFIG}"),
        &[("BEGINI_API_KEY", BEGINI_KEY)],
    )
    .await;
    for body in fresh_bodies(3) {
        assert_eq!(app.post_signed("begini", &body).await.status, 200);
    }

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ready = app.readiness().await;

    assert_eq!(ready, 200);
}

#[tokio::test]
async fn a_full_queue_answers_503_at_once_instead_of_growing() {
    let app = spawn_begini_with(
        "http_workers = 1\nbatch_committers = 1\nbatch_max_size = 1\nqueue_capacity = 2",
    )
    .await;
    // The one committer blocks on this lock, so the queue fills.
    let blocker = block_writes_to(&app, "inbox_deliveries").await;

    let bodies = fresh_bodies(10);
    let sending = join_all(bodies.iter().map(|body| app.post_signed("begini", body)));
    let release = release_after(blocker, Duration::from_millis(700));
    let (answers, ()) = tokio::join!(sending, release);

    let refused: Vec<_> = answers.iter().filter(|a| a.status == 503).collect();
    let accepted = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!(refused.len() + accepted, 10, "only 200 or 503");
    assert!(
        refused.len() >= 5,
        "at most one committing and two queued; {} refused",
        refused.len()
    );
    for answer in refused {
        assert!(answer.headers.contains_key("retry-after"));
    }
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_events").await,
        accepted as i64,
        "every 200 is stored, nothing else is"
    );
}

#[tokio::test]
async fn a_503_means_nothing_was_stored_even_when_the_database_recovers_mid_batch() {
    // request_timeout is 2s (statements 1.6s): the first batch times out on the
    // lock, the next starts close to its requests' deadlines, and the lock goes
    // away after those deadlines but before 1.6s more have passed.
    let app = spawn_begini_with(
        "http_workers = 1\nbatch_committers = 1\nbatch_max_size = 8\nbatch_max_wait = \"0ms\"",
    )
    .await;
    let blocker = block_writes_to(&app, "inbox_events").await;

    let bodies = fresh_bodies(70);
    let app = &app;
    let sending = join_all(bodies.iter().enumerate().map(|(i, body)| async move {
        tokio::time::sleep(Duration::from_millis(50 * i as u64)).await;
        app.post_signed("begini", body).await
    }));
    let release = release_after(blocker, Duration::from_millis(2500));
    let (answers, ()) = tokio::join!(sending, release);

    let stored: std::collections::HashMap<String, uuid::Uuid> =
        sqlx::query_as::<_, (String, uuid::Uuid)>("SELECT payload_sha256, id FROM inbox_events")
            .fetch_all(&app.db.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    for (body, answer) in bodies.iter().zip(&answers) {
        let sha = sha256_hex(body);
        match answer.status {
            200 => assert_eq!(stored.get(&sha), Some(&answer.event_id())),
            503 => assert_eq!(stored.get(&sha), None, "a 503 was stored anyway"),
            other => panic!("only 200 or 503, got {other}"),
        }
    }
    let accepted = answers.iter().filter(|a| a.status == 200).count();
    assert!(
        accepted > 0 && accepted < answers.len(),
        "both answers seen"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_deliveries").await,
        accepted as i64,
        "a 503 leaves no delivery row"
    );
}

/// `pg_stat_user_tables` for the event rows, once the receiver's sessions have
/// reported at least `inserted` new rows (they report a moment after going idle).
async fn event_table_scans_once_reported(app: &TestApp, inserted: i64) -> (i64, i64) {
    let read = || async {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT seq_scan, n_tup_ins FROM pg_stat_user_tables WHERE relname = 'inbox_event_state'",
        )
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
    };
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (seq_scans, rows_inserted) = read().await;
        if rows_inserted >= inserted || tokio::time::Instant::now() > give_up {
            return (seq_scans, rows_inserted);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn deliveries_to_an_inbox_analyzed_while_nearly_empty_look_their_events_up_by_key() {
    // An inbox whose statistics were taken when it held one row: a fresh
    // install, or one emptied by retention. A plan made now would read the
    // whole table for every key it checks, and keep doing so as it grows.
    let db = database().await;
    sqlx::query(
        "INSERT INTO inbox_event_state (id, source, environment, event_key, payload_sha256)
         VALUES (gen_random_uuid(), 'begini', 'sandbox', 'seed', 'seed')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE inbox_event_state")
        .execute(&db.pool)
        .await
        .unwrap();
    let app = TestApp::spawn_on(db, &begini_with(""), &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    let (scans_before, inserted_before) = event_table_scans_once_reported(&app, 1).await;

    for body in fresh_bodies(20) {
        assert_eq!(app.post_signed("begini", &body).await.status, 200);
    }

    let (scans_after, inserted_after) =
        event_table_scans_once_reported(&app, inserted_before + 20).await;
    assert_eq!(
        inserted_after,
        inserted_before + 20,
        "the sessions reported their rows"
    );
    assert_eq!(
        scans_after - scans_before,
        0,
        "no delivery read the event table whole"
    );
}
