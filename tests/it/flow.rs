//! Flow control: one event of a key at a time and in order (under crashes),
//! poison events and skip, the sender's time and stale events, pause and
//! resume, limits shared by every worker, and circuits.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use hookbox::{
    ops::flow::{self, PauseTarget},
    worker::{LibraryHandlers, Worker},
};
use uuid::Uuid;

use crate::{support::*, worker::WorkerProcesses};

/// A begini source whose events are ordered by `/uid`; `extra` adds source
/// keys (order_by, stale, on_dead) and the rest of the file.
fn ordered_config(source_keys: &str, rest: &str) -> String {
    format!(
        r#"
[receiver]
listen = "127.0.0.1:0"
admin_listen = ""
request_timeout = "5s"

[worker]
admin_listen = ""
concurrency = 8
batch_size = 20
lease = "2s"
poll_interval = "100ms"
shutdown_grace = "5s"
retry = {{ max_attempts = 100, initial = "100ms", max = "500ms", multiplier = 2.0, jitter = 0.2 }}

[[source]]
name = "begini"
environment = "sandbox"
scheme = "begini"
secrets_env = ["BEGINI_API_KEY"]
event_key = {{ json = ["/uid", "/seq"] }}
ordering_key = {{ json = ["/uid"] }}
{source_keys}

[[route]]
source = "begini"
handler = "h"
{rest}"#
    )
}

/// Records every run of the handler in commit order (no unique constraint:
/// a second run of an event would show as a second row).
const RECORDED: &str = r#"
CREATE TABLE recorded (id bigserial PRIMARY KEY, uid text NOT NULL, seq int NOT NULL, event_id uuid NOT NULL);
CREATE FUNCTION record_event(payload jsonb, event_id uuid, attempt int, fail_first double precision)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF payload ? 'poison' THEN
        RAISE EXCEPTION 'poison event' USING ERRCODE = '22023';
    END IF;
    IF attempt = 1 AND random() < fail_first THEN
        RAISE EXCEPTION 'first attempt failed on purpose';
    END IF;
    INSERT INTO recorded (uid, seq, event_id) VALUES (payload->>'uid', (payload->>'seq')::int, event_id);
END;
$$;
"#;

const SQL_HANDLER: &str =
    "[handler.h]\nkind = \"sql\"\nstatement = \"SELECT record_event($1, $3, $6, 0)\"\n";

fn event(uid: &str, seq: i64, extra: &str) -> Vec<u8> {
    format!(
        r#"{{"uid":"{uid}","seq":{seq}{extra},"integration_id":"1","event":{{"type":"application.complete","details":{{}},"reasons":[]}}}}"#
    )
    .into_bytes()
}

async fn ordered_app(source_keys: &str, rest: &str) -> (TestApp, String) {
    let text = ordered_config(source_keys, rest);
    let app = TestApp::spawn(&text, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    sqlx::raw_sql(RECORDED).execute(&app.db.pool).await.unwrap();
    (app, text)
}

fn in_process_worker(app: &TestApp, text: &str) -> Worker {
    let config = config(text, &[("BEGINI_API_KEY", BEGINI_KEY)]);
    let pool = hookbox::db::pool(&app.db.url, &hookbox::db::PoolSettings::worker(&config)).unwrap();
    Worker::from_config(&config, pool, LibraryHandlers::default()).unwrap()
}

/// Runs the worker step by step until a step starts nothing.
async fn drain(worker: &Worker) {
    for _ in 0..100 {
        if worker.process_next().await.unwrap().is_empty() {
            return;
        }
    }
}

async fn deliver(app: &TestApp, body: &[u8]) -> Uuid {
    let answer = app.deliver_as_sender("begini", body).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.event_id()
}

async fn status_of(app: &TestApp, id: Uuid) -> String {
    sqlx::query_scalar!(
        r#"SELECT status AS "status!" FROM inbox_events WHERE id = $1"#,
        id
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap()
}

async fn recorded_seqs(app: &TestApp, uid: &str) -> Vec<i32> {
    sqlx::query_scalar("SELECT seq FROM recorded WHERE uid = $1 ORDER BY id")
        .bind(uid)
        .fetch_all(&app.db.pool)
        .await
        .unwrap()
}

async fn scalar(app: &TestApp, sql: &str) -> i64 {
    app.count(sql).await
}

async fn wait_until(app: &TestApp, sql: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if scalar(app, sql).await > 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_keys_events_run_once_and_in_order_while_workers_are_killed() {
    const KEYS: usize = 300;
    const PER_KEY: i64 = 10;
    // A fifth of first attempts fail; each run takes 10 ms, so the drain
    // lasts long enough for the kills to land in it.
    let handler = SQL_HANDLER.replace("$6, 0)", "$6, 0.2) FROM pg_sleep(0.01)");
    let (app, text) = ordered_app("", &handler).await;
    let url = app.db.url.clone();
    let mut workers = tokio::task::spawn_blocking(move || WorkerProcesses::start(&url, &text, 4))
        .await
        .unwrap();

    // Each key's events in sequence (the next after the last one's 200),
    // the keys interleaved, while workers are killed at random.
    let keys: Vec<String> = (0..KEYS).map(|_| unique_uid()).collect();
    let delivering = futures_util::stream::iter(keys.iter()).for_each_concurrent(48, |uid| {
        let app = &app;
        async move {
            for seq in 0..PER_KEY {
                deliver(app, &event(uid, seq, "")).await;
            }
        }
    });
    let delivered = Arc::new(AtomicBool::new(false));
    let killing = async {
        let mut kills = 0;
        let deadline = Instant::now() + Duration::from_secs(240);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(300 + rand::random_range(0..400))).await;
            let open = scalar(
                &app,
                "SELECT count(*) FROM inbox_events WHERE status IN ('pending', 'retrying', 'processing')",
            )
            .await;
            if kills >= 10 && (delivered.load(Ordering::SeqCst) || open < 50) {
                break;
            }
            if open == 0 {
                continue;
            }
            let index = rand::random_range(0..workers.children.len());
            workers.children[index].kill().unwrap();
            workers.children[index].wait().unwrap();
            kills += 1;
            workers.children[index] = workers.spawn();
        }
        kills
    };
    let (_, kills) = tokio::join!(
        async {
            delivering.await;
            delivered.store(true, Ordering::SeqCst);
        },
        killing
    );
    assert!(kills >= 10, "only {kills} kills happened");

    let total = KEYS as i64 * PER_KEY;
    let done = format!(
        "SELECT (count(*) = {total})::int::int8 FROM inbox_events WHERE status = 'succeeded'"
    );
    assert!(
        wait_until(&app, &done, Duration::from_secs(240)).await,
        "every event succeeded"
    );
    let exits = tokio::task::spawn_blocking(move || workers.terminate_all())
        .await
        .unwrap();
    assert!(exits.iter().all(|code| *code == Some(0)), "{exits:?}");

    assert_eq!(scalar(&app, "SELECT count(*) FROM recorded").await, total);
    let expected: Vec<i32> = (0..PER_KEY as i32).collect();
    for uid in &keys {
        assert_eq!(recorded_seqs(&app, uid).await, expected, "key {uid}");
    }
    assert!(
        scalar(
            &app,
            "SELECT count(*) FROM inbox_attempts WHERE outcome IN ('retry', 'lease_expired')"
        )
        .await
            > 0,
        "failures and kills happened"
    );
}

#[tokio::test]
async fn a_poison_event_holds_back_its_key_until_skipped_while_other_keys_flow() {
    let (app, text) = ordered_app("", SQL_HANDLER).await;
    let worker = in_process_worker(&app, &text);
    let (held, free) = (unique_uid(), unique_uid());
    let poison = deliver(&app, &event(&held, 0, r#","poison":true"#)).await;
    let second = deliver(&app, &event(&held, 1, "")).await;
    let third = deliver(&app, &event(&held, 2, "")).await;
    for seq in 0..3 {
        deliver(&app, &event(&free, seq, "")).await;
    }
    drain(&worker).await;

    assert_eq!(status_of(&app, poison).await, "dead");
    assert_eq!(status_of(&app, second).await, "pending");
    assert_eq!(status_of(&app, third).await, "pending");
    assert_eq!(recorded_seqs(&app, &free).await, [0, 1, 2]);
    let blocked = flow::blocked(&app.db.pool, Some("begini"), 10)
        .await
        .unwrap();
    let holders: Vec<(Uuid, Uuid)> = blocked.iter().map(|b| (b.id, b.blocked_by)).collect();
    assert_eq!(holders, [(second, poison), (third, poison)]);

    let report = flow::skip(
        &app.db.pool,
        &[poison],
        "ops",
        "bad payload, sender fixing it",
    )
    .await
    .unwrap();
    assert_eq!(report.skipped, 1);
    drain(&worker).await;
    assert_eq!(recorded_seqs(&app, &held).await, [1, 2]);
    assert_eq!(status_of(&app, poison).await, "skipped");
    assert_eq!(
        scalar(
            &app,
            "SELECT count(*) FROM inbox_actions WHERE action = 'skip' AND affected = 1 AND actor = 'ops'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn with_on_dead_continue_a_dead_event_does_not_hold_back_its_key() {
    let (app, text) = ordered_app("on_dead = \"continue\"", SQL_HANDLER).await;
    let worker = in_process_worker(&app, &text);
    let uid = unique_uid();
    let poison = deliver(&app, &event(&uid, 0, r#","poison":true"#)).await;
    deliver(&app, &event(&uid, 1, "")).await;
    deliver(&app, &event(&uid, 2, "")).await;
    drain(&worker).await;
    assert_eq!(status_of(&app, poison).await, "dead");
    assert_eq!(recorded_seqs(&app, &uid).await, [1, 2]);
}

#[tokio::test]
async fn events_run_in_the_senders_order_and_a_stale_one_is_skipped() {
    let (app, text) = ordered_app(
        "order_by = { json = \"/created\" }\nstale = \"skip\"",
        SQL_HANDLER,
    )
    .await;
    let worker = in_process_worker(&app, &text);
    let handler = PauseTarget::Handler("h".into());
    assert!(
        flow::pause(&app.db.pool, &handler, "ops", "deploying downstream")
            .await
            .unwrap()
    );
    let uid = unique_uid();
    deliver(&app, &event(&uid, 3, r#","created":1700000003"#)).await;
    deliver(&app, &event(&uid, 1, r#","created":1700000001"#)).await;
    drain(&worker).await;
    assert_eq!(
        scalar(&app, "SELECT count(*) FROM inbox_attempts").await,
        0,
        "nothing starts while the handler is paused"
    );

    assert!(flow::resume(&app.db.pool, &handler, "ops", "deployed")
        .await
        .unwrap());
    drain(&worker).await;
    assert_eq!(recorded_seqs(&app, &uid).await, [1, 3]);

    let late = deliver(&app, &event(&uid, 2, r#","created":1700000002"#)).await;
    drain(&worker).await;
    assert_eq!(status_of(&app, late).await, "skipped");
    let reason: Option<String> =
        sqlx::query_scalar!("SELECT last_error FROM inbox_events WHERE id = $1", late)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert!(reason.unwrap().starts_with("stale"));
    assert_eq!(recorded_seqs(&app, &uid).await, [1, 3]);
}

#[tokio::test]
async fn a_delivery_without_its_ordering_key_is_refused_with_400() {
    let text = ordered_config("", SQL_HANDLER)
        .replace("event_key = { json = [\"/uid\", \"/seq\"] }\n", "");
    let app = TestApp::spawn(&text, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    let body = br#"{"seq":1,"event":{"type":"application.complete"}}"#;
    let answer = app.post_signed("begini", body).await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.body["detail"], "ordering key field /uid is missing");
}

#[tokio::test]
async fn a_paused_source_starts_nothing_on_any_worker_while_deliveries_are_accepted() {
    let (app, text) = ordered_app("", SQL_HANDLER).await;
    let url = app.db.url.clone();
    let mut workers = tokio::task::spawn_blocking(move || WorkerProcesses::start(&url, &text, 2))
        .await
        .unwrap();
    let source = PauseTarget::Source("begini".into());
    flow::pause(&app.db.pool, &source, "ops", "provider incident")
        .await
        .unwrap();
    // Within one poll interval every worker has seen it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for seq in 0..20 {
        deliver(&app, &event(&unique_uid(), seq, "")).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(scalar(&app, "SELECT count(*) FROM inbox_attempts").await, 0);

    flow::resume(&app.db.pool, &source, "ops", "incident over")
        .await
        .unwrap();
    let all_done = "SELECT (count(*) = 20)::int::int8 FROM inbox_events WHERE status = 'succeeded'";
    assert!(wait_until(&app, all_done, Duration::from_secs(30)).await);
    tokio::task::spawn_blocking(move || workers.terminate_all())
        .await
        .unwrap();
    let actions: Vec<String> = sqlx::query_scalar!("SELECT action FROM inbox_actions ORDER BY id")
        .fetch_all(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(actions, ["pause", "resume"]);
}

/// A downstream that counts the requests it is serving at once and answers
/// 503 until `healthy` is set.
struct Downstream {
    url: String,
    max_seen: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    healthy: Arc<AtomicBool>,
}

fn downstream(delay: Duration, healthy: bool) -> Downstream {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let current = Arc::new(AtomicUsize::new(0));
    let max_seen = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let healthy = Arc::new(AtomicBool::new(healthy));
    let state = (current, max_seen.clone(), requests.clone(), healthy.clone());
    let server = HttpServer::new(move || {
        let (current, max_seen, requests, healthy) = state.clone();
        App::new().default_service(web::to(move || {
            let (current, max_seen, requests, healthy) = (
                current.clone(),
                max_seen.clone(),
                requests.clone(),
                healthy.clone(),
            );
            async move {
                requests.fetch_add(1, Ordering::SeqCst);
                let now = current.fetch_add(1, Ordering::SeqCst) + 1;
                max_seen.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                current.fetch_sub(1, Ordering::SeqCst);
                if healthy.load(Ordering::SeqCst) {
                    HttpResponse::Ok().finish()
                } else {
                    HttpResponse::ServiceUnavailable().finish()
                }
            }
        }))
    })
    .workers(2)
    .bind("127.0.0.1:0")
    .unwrap();
    let port = server.addrs()[0].port();
    tokio::spawn(server.run());
    Downstream {
        url: format!("http://127.0.0.1:{port}/hook"),
        max_seen,
        requests,
        healthy,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_in_flight_holds_across_three_worker_processes() {
    let downstream = downstream(Duration::from_millis(100), true);
    let handler = format!(
        "[handler.h]\nkind = \"http\"\nurl = \"{}\"\nmax_in_flight = 2\n",
        downstream.url
    );
    // Unordered: every event could run at once but for the limit.
    let text = ordered_config("", &handler).replace("ordering_key = { json = [\"/uid\"] }\n", "");
    let app = TestApp::spawn(&text, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    for seq in 0..40 {
        deliver(&app, &event(&unique_uid(), seq, "")).await;
    }
    let url = app.db.url.clone();
    let mut workers = tokio::task::spawn_blocking(move || WorkerProcesses::start(&url, &text, 3))
        .await
        .unwrap();
    let all_done = "SELECT (count(*) = 40)::int::int8 FROM inbox_events WHERE status = 'succeeded'";
    assert!(wait_until(&app, all_done, Duration::from_secs(60)).await);
    tokio::task::spawn_blocking(move || workers.terminate_all())
        .await
        .unwrap();
    let max_seen = downstream.max_seen.load(Ordering::SeqCst);
    assert!(max_seen <= 2, "{max_seen} requests ran at once");
    assert_eq!(downstream.requests.load(Ordering::SeqCst), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limit_holds_across_three_worker_processes() {
    let handler = format!("{SQL_HANDLER}rate_limit = {{ per_second = 20, burst = 20 }}\n");
    let text = ordered_config("", &handler).replace("ordering_key = { json = [\"/uid\"] }\n", "");
    let app = TestApp::spawn(&text, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    sqlx::raw_sql(RECORDED).execute(&app.db.pool).await.unwrap();
    let bodies: Vec<Vec<u8>> = (0..200).map(|seq| event(&unique_uid(), seq, "")).collect();
    futures_util::stream::iter(bodies.iter())
        .for_each_concurrent(16, |body| {
            let app = &app;
            async move {
                deliver(app, body).await;
            }
        })
        .await;
    let url = app.db.url.clone();
    let mut workers = tokio::task::spawn_blocking(move || WorkerProcesses::start(&url, &text, 3))
        .await
        .unwrap();
    let all_done =
        "SELECT (count(*) = 200)::int::int8 FROM inbox_events WHERE status = 'succeeded'";
    assert!(wait_until(&app, all_done, Duration::from_secs(60)).await);
    tokio::task::spawn_blocking(move || workers.terminate_all())
        .await
        .unwrap();
    // 20 at once, then 20 a second: the last of 200 starts 9 s after the first.
    let span: f64 = sqlx::query_scalar!(
        r#"SELECT extract(epoch FROM max(started_at) - min(started_at))::float8 AS "span!" FROM inbox_attempts"#
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert!(span >= 8.5, "200 attempts started within {span:.1} s");
}

#[tokio::test]
async fn an_open_circuit_spends_no_attempts_and_a_probe_closes_it() {
    let downstream = downstream(Duration::ZERO, false);
    let handler = format!(
        "[handler.h]\nkind = \"http\"\nurl = \"{}\"\ncircuit = {{ failures = 3, cool_down = \"2s\" }}\n",
        downstream.url
    );
    let text = ordered_config("", &handler)
        .replace("ordering_key = { json = [\"/uid\"] }\n", "")
        .replace("batch_size = 20", "batch_size = 1")
        .replace("concurrency = 8", "concurrency = 1");
    let app = TestApp::spawn(&text, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    for seq in 0..6 {
        deliver(&app, &event(&unique_uid(), seq, "")).await;
    }
    let worker = in_process_worker(&app, &text);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(worker.run(shutdown.clone()));

    let opened = "SELECT count(*) FROM inbox_circuit_events WHERE change = 'opened'";
    assert!(wait_until(&app, opened, Duration::from_secs(20)).await);
    let attempts_when_opened = scalar(&app, "SELECT count(*) FROM inbox_attempts").await;
    assert_eq!(attempts_when_opened, 3, "the third failure opened it");
    // During the cool-down, due retries start nothing and spend nothing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        scalar(&app, "SELECT count(*) FROM inbox_attempts").await,
        attempts_when_opened
    );
    downstream.healthy.store(true, Ordering::SeqCst);
    let closed = "SELECT count(*) FROM inbox_circuit_events WHERE change = 'closed'";
    assert!(wait_until(&app, closed, Duration::from_secs(20)).await);
    let all_done = "SELECT (count(*) = 6)::int::int8 FROM inbox_events WHERE status = 'succeeded'";
    assert!(wait_until(&app, all_done, Duration::from_secs(20)).await);
    shutdown.cancel();
    running.await.unwrap().unwrap();

    let changes: Vec<String> =
        sqlx::query_scalar!("SELECT change FROM inbox_circuit_events ORDER BY id")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(changes, ["opened", "probe", "closed"]);
    // 3 failures, the probe, and the 5 events that had not yet succeeded.
    assert_eq!(
        scalar(&app, "SELECT count(*) FROM inbox_attempts").await,
        3 + 6
    );
}

/// During a rolling deploy that adds a source, a worker still on the old
/// configuration leaves the new source's events alone (it used to claim them
/// and end them `skipped` for want of a route).
#[tokio::test]
async fn a_worker_whose_configuration_lacks_a_source_leaves_its_events_for_one_that_has_it() {
    let both = ordered_config("", SQL_HANDLER).replace(
        "[[route]]",
        "[[source]]\nname = \"partner\"\nenvironment = \"sandbox\"\nscheme = \"begini\"\n\
         secrets_env = [\"BEGINI_API_KEY\"]\n\n[[route]]\nsource = \"partner\"\nhandler = \"h\"\n\n[[route]]",
    );
    let app = TestApp::spawn(&both, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    sqlx::raw_sql(RECORDED).execute(&app.db.pool).await.unwrap();
    let uid = unique_uid();
    let answer = app.deliver_as_sender("partner", &event(&uid, 0, "")).await;
    assert_eq!(answer.status, 200);
    let id = answer.event_id();

    let old = in_process_worker(&app, &ordered_config("", SQL_HANDLER));
    drain(&old).await;
    assert_eq!(status_of(&app, id).await, "pending");
    assert_eq!(scalar(&app, "SELECT count(*) FROM inbox_attempts").await, 0);

    let new = in_process_worker(&app, &both);
    drain(&new).await;
    assert_eq!(status_of(&app, id).await, "succeeded");
    assert_eq!(recorded_seqs(&app, &uid).await, [0]);
}

/// A claim that finds fewer events than it asked for sets aside the events
/// waiting behind two others of their key (later claims need not walk them
/// again), and each completion makes its key's next ones due at once.
#[tokio::test]
async fn events_waiting_for_their_key_are_set_aside_and_the_next_is_due_when_the_key_frees() {
    let (app, text) = ordered_app("", SQL_HANDLER).await;
    let worker = in_process_worker(&app, &text);
    let uid = unique_uid();
    let mut ids = Vec::new();
    for seq in 0..4 {
        ids.push(deliver(&app, &event(&uid, seq, "")).await);
    }
    let due = |id: Uuid| {
        let pool = app.db.pool.clone();
        async move {
            sqlx::query_scalar!(
                r#"SELECT next_attempt_at <= now() AS "due!" FROM inbox_events WHERE id = $1"#,
                id
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };

    assert_eq!(worker.process_next().await.unwrap().len(), 1);
    assert_eq!(recorded_seqs(&app, &uid).await, [0]);
    assert!(due(ids[1]).await, "the key's next event is never set aside");
    assert!(
        due(ids[2]).await,
        "the one after it is due once the first is done"
    );
    assert!(!due(ids[3]).await, "the events further back wait aside");

    assert_eq!(worker.process_next().await.unwrap().len(), 1);
    assert!(due(ids[3]).await);
    drain(&worker).await;
    assert_eq!(recorded_seqs(&app, &uid).await, [0, 1, 2, 3]);
}
