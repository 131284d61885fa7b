//! Nothing acknowledged is ever lost: receivers killed, PostgreSQL restarted or
//! absent or stalled, floods. Each scenario uses its own cluster or database
//! and its own processes, bounded in time.

use std::{
    collections::HashMap,
    path::PathBuf,
    process::Child,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use hookbox::{
    event_key::sha256_hex,
    pgcluster::{Cluster, StopMode},
    signature::Scheme,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::*;

const SIDE_EFFECTS: &str = "CREATE TABLE side_effects (event_id uuid NOT NULL)";

fn fault_config(port: u16) -> String {
    format!(
        r#"
[database]
max_connections = 8
acquire_timeout = "1s"

[receiver]
listen = "127.0.0.1:{port}"
admin_listen = ""
request_timeout = "2s"

[worker]
admin_listen = ""
concurrency = 8
lease = "3s"
poll_interval = "200ms"
shutdown_grace = "5s"
retry = {{ max_attempts = 100, initial = "100ms", max = "1s", multiplier = 2.0, jitter = 0.2 }}

[[source]]
name = "begini"
environment = "sandbox"
scheme = "begini"
secrets_env = ["BEGINI_API_KEY"]

[[route]]
source = "begini"
handler = "h"

[handler.h]
kind = "sql"
statement = "INSERT INTO side_effects (event_id) VALUES ($3)"
"#
    )
}

/// A private cluster and a config file for processes that talk to it.
struct Stage {
    cluster: Arc<Cluster>,
    url: String,
    config: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

async fn stage() -> Stage {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, url) = private_cluster(None).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(SIDE_EFFECTS).execute(&pool).await.unwrap();
    pool.close().await;
    let port = free_port();
    let config = dir.path().join("hookbox.toml");
    std::fs::write(&config, fault_config(port)).unwrap();
    Stage {
        cluster: Arc::new(cluster),
        url,
        config,
        port,
        _dir: dir,
    }
}

impl Stage {
    fn spawn(&self, binary: &str) -> Child {
        spawn_service(binary, &self.config, &self.url)
    }

    async fn cluster_do(&self, work: impl FnOnce(&Cluster) + Send + 'static) {
        let cluster = self.cluster.clone();
        tokio::task::spawn_blocking(move || work(&cluster))
            .await
            .unwrap();
    }

    async fn pool(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.url).await.unwrap()
    }
}

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn wait_for(url: &str, status: u16, limit: Duration) -> bool {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if client
            .get(url)
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
            == Some(status)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// What a webhook provider sees: every status and every failed attempt.
#[derive(Default)]
struct SenderLog {
    statuses: Vec<u16>,
    connection_errors: usize,
    timeouts: usize,
}

/// A sender that behaves like a real provider: retries any non-200 and any
/// connection error with backoff until it gets a 200; returns the event id.
async fn deliver_until_acknowledged(
    client: &reqwest::Client,
    url: &str,
    body: &[u8],
    log: &Mutex<SenderLog>,
) -> Option<Uuid> {
    let key = Scheme::Begini.key_from_secret(BEGINI_KEY).unwrap();
    let signature = Scheme::Begini.sign(&key, body, 0, "").remove(0).1;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut wait = Duration::from_millis(20);
    while Instant::now() < deadline {
        match client
            .post(url)
            .header("X-Signature", &signature)
            .body(body.to_vec())
            .send()
            .await
        {
            Ok(response) => {
                let status = response.status().as_u16();
                log.lock().unwrap().statuses.push(status);
                if status == 200 {
                    let answer: serde_json::Value =
                        serde_json::from_slice(&response.bytes().await.ok()?).ok()?;
                    return answer["event_id"].as_str()?.parse().ok();
                }
            }
            Err(error) if error.is_timeout() => log.lock().unwrap().timeouts += 1,
            Err(_) => log.lock().unwrap().connection_errors += 1,
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(500));
    }
    None
}

/// One event as the sender saw it: the bytes it sent and the id of the `200`
/// it finally got (none if it gave up).
struct Delivered {
    sha256: String,
    event_id: Option<Uuid>,
}

/// Sends `bodies` with `lanes` concurrent senders until they run out or `stop`
/// is cancelled; every body started is delivered until acknowledged.
async fn send_all(
    port: u16,
    bodies: impl Iterator<Item = Vec<u8>> + Send + 'static,
    lanes: usize,
    pace: Duration,
    log: Arc<Mutex<SenderLog>>,
    stop: CancellationToken,
) -> Vec<Delivered> {
    // The timeout is past request_timeout: hitting it means the receiver hung.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(6))
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/webhooks/begini");
    futures_util::stream::iter(bodies)
        .take_until(stop.cancelled_owned())
        .map(|body| {
            let (client, url, log) = (client.clone(), url.clone(), log.clone());
            async move {
                tokio::time::sleep(pace).await;
                let event_id = deliver_until_acknowledged(&client, &url, &body, &log).await;
                Delivered {
                    sha256: sha256_hex(&body),
                    event_id,
                }
            }
        })
        .buffer_unordered(lanes)
        .collect()
        .await
}

/// Fresh Begini events, `n` of them (as many as are asked for if `None`).
fn bodies(n: Option<usize>) -> impl Iterator<Item = Vec<u8>> + Send + 'static {
    std::iter::repeat_with(|| begini_payload(&unique_uid(), "psychometric_score.complete"))
        .take(n.unwrap_or(usize::MAX))
}

/// Every event the sender started was acknowledged, and every acknowledged
/// event is stored, once, with the bytes that were sent.
async fn assert_acknowledged_events_stored(pool: &sqlx::PgPool, sent: &[Delivered]) {
    assert!(
        sent.iter().all(|d| d.event_id.is_some()),
        "the sender got every event acknowledged eventually"
    );
    let stored: HashMap<Uuid, String> =
        sqlx::query_as::<_, (Uuid, String)>("SELECT id, payload_sha256 FROM inbox_events")
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(
        stored.len(),
        sent.len(),
        "one event per body sent, no more, no fewer"
    );
    for delivered in sent {
        let id = delivered.event_id.unwrap();
        assert_eq!(
            stored.get(&id),
            Some(&delivered.sha256),
            "acknowledged event {id} is stored with its bytes"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_a_receiver_killed_at_random_under_load() {
    let stage = stage().await;
    kill_the_receiver_while_sending(&stage, 8, Duration::from_millis(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_a_receiver_killed_in_the_middle_of_group_commits() {
    let stage = stage().await;
    // One committer and a long gathering wait: most deliveries share a
    // transaction, so most kills land while a batch is gathering or committing.
    let config = fault_config(stage.port).replace(
        "request_timeout = \"2s\"",
        "request_timeout = \"2s\"\nbatch_committers = 1\nbatch_max_wait = \"20ms\"\nbatch_max_size = 64",
    );
    std::fs::write(&stage.config, config).unwrap();
    kill_the_receiver_while_sending(&stage, 64, Duration::ZERO).await;

    let shared: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT xmin FROM inbox_event_state GROUP BY xmin HAVING count(*) > 1) t",
    )
    .fetch_one(&stage.pool().await)
    .await
    .unwrap();
    assert!(
        shared > 10,
        "deliveries were committed in shared transactions ({shared} seen)"
    );
}

/// Kills the receiver 10-15 times while a provider-like sender delivers
/// events, stops sending once the receiver has run undisturbed for a moment,
/// then checks every acknowledged event is stored, once.
async fn kill_the_receiver_while_sending(stage: &Stage, lanes: usize, pace: Duration) {
    let mut receiver = Killed(vec![stage.spawn("hookbox-receiver")]);
    let health = format!("http://127.0.0.1:{}/healthz", stage.port);
    assert!(wait_for(&health, 200, Duration::from_secs(20)).await);

    let log = Arc::new(Mutex::new(SenderLog::default()));
    let stop = CancellationToken::new();
    let sending = tokio::spawn(send_all(
        stage.port,
        bodies(None),
        lanes,
        pace,
        log.clone(),
        stop.clone(),
    ));
    for _ in 0..rand::random_range(10..=15) {
        tokio::time::sleep(Duration::from_millis(100 + rand::random_range(0..150))).await;
        receiver.0[0].kill().unwrap();
        receiver.0[0].wait().unwrap();
        receiver.0[0] = stage.spawn("hookbox-receiver");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let sent = sending.await.unwrap();
    assert!(
        sent.len() > 100,
        "events were sent throughout ({} in all)",
        sent.len()
    );
    assert!(
        log.lock().unwrap().connection_errors > 0,
        "the kills were seen by the sender"
    );
    assert_acknowledged_events_stored(&stage.pool().await, &sent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_under_load_give_503_never_500_and_lose_nothing() {
    let stage = stage().await;
    let _services = Killed(vec![
        stage.spawn("hookbox-receiver"),
        stage.spawn("hookbox-worker"),
    ]);
    assert!(
        wait_for(
            &format!("http://127.0.0.1:{}/readyz", stage.port),
            200,
            Duration::from_secs(20)
        )
        .await
    );

    let log = Arc::new(Mutex::new(SenderLog::default()));
    let sending = tokio::spawn(send_all(
        stage.port,
        bodies(Some(1500)),
        8,
        Duration::from_millis(10),
        log.clone(),
        CancellationToken::new(),
    ));
    for mode in [StopMode::Fast, StopMode::Immediate] {
        tokio::time::sleep(Duration::from_millis(700)).await;
        stage.cluster_do(move |c| c.stop(mode).unwrap()).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stage.cluster_do(|c| c.restart(false).unwrap()).await;
    }
    let sent = sending.await.unwrap();
    assert_eq!(sent.len(), 1500);

    let pool = stage.pool().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let open: i64 =
            sqlx::query_scalar("SELECT count(*) FROM inbox_events WHERE status <> 'succeeded'")
                .fetch_one(&pool)
                .await
                .unwrap();
        if open == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (statuses, timeouts) = {
        let log = log.lock().unwrap();
        (log.statuses.clone(), log.timeouts)
    };
    let unexpected: Vec<&u16> = statuses
        .iter()
        .filter(|s| **s != 200 && **s != 503)
        .collect();
    assert!(unexpected.is_empty(), "only 200 and 503: {unexpected:?}");
    assert!(statuses.contains(&503), "the outages were seen as 503");
    assert_eq!(timeouts, 0, "no request hung past request_timeout");
    assert_acknowledged_events_stored(&pool, &sent).await;
    let (effects, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT event_id) FROM side_effects")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (effects, distinct),
        (sent.len() as i64, sent.len() as i64),
        "every event's effect applied exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_started_before_the_database_work_as_soon_as_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let (pg_port, port) = (free_port(), free_port());
    let url = format!("postgres://postgres@127.0.0.1:{pg_port}/postgres");
    let config = dir.path().join("hookbox.toml");
    std::fs::write(&config, fault_config(port)).unwrap();
    let _services = Killed(vec![
        spawn_service("hookbox-receiver", &config, &url),
        spawn_service("hookbox-worker", &config, &url),
    ]);

    let base = format!("http://127.0.0.1:{port}");
    assert!(
        wait_for(&format!("{base}/healthz"), 200, Duration::from_secs(20)).await,
        "alive without a database"
    );
    assert!(
        wait_for(&format!("{base}/readyz"), 503, Duration::from_secs(5)).await,
        "not ready without a database"
    );

    let (cluster, _) = private_cluster(Some(pg_port)).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(SIDE_EFFECTS).execute(&pool).await.unwrap();

    assert!(
        wait_for(&format!("{base}/readyz"), 200, Duration::from_secs(20)).await,
        "ready once the database answers"
    );
    let log = Mutex::new(SenderLog::default());
    let client = reqwest::Client::new();
    let id = deliver_until_acknowledged(
        &client,
        &format!("{base}/webhooks/begini"),
        &begini_payload(&unique_uid(), "x.y"),
        &log,
    )
    .await
    .expect("accepted");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut status = String::new();
    while Instant::now() < deadline {
        status = sqlx::query_scalar("SELECT status FROM inbox_events WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
        if status == "succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        status, "succeeded",
        "the worker that started first processed it"
    );
    drop(cluster);
}

#[tokio::test]
async fn a_lock_on_the_inbox_gets_503_within_the_request_timeout_and_writes_nothing() {
    let app = TestApp::begini().await;
    let mut lock = app.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE inbox_events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();

    let body = begini_payload(&unique_uid(), "application.complete");
    let started = Instant::now();
    let answer = app.post_signed("begini", &body).await;
    let took = started.elapsed();
    assert_eq!(answer.status, 503);
    assert_eq!(
        answer.body,
        serde_json::json!({"detail": "Service Unavailable"})
    );
    // request_timeout is 2s; the margin is generous on purpose (no timing target).
    assert!(
        took < Duration::from_secs(5),
        "answered within the request timeout, took {took:?}"
    );

    lock.rollback().await.unwrap();
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_events").await,
        0,
        "nothing half-written"
    );
    assert_eq!(app.count("SELECT count(*) FROM inbox_deliveries").await, 0);
    assert_eq!(
        app.post_signed("begini", &body).await.body["status"],
        "accepted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_while_the_database_stalls_gets_503_and_health_keeps_answering() {
    let db = database().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("hookbox.toml");
    std::fs::write(
        &config,
        fault_config(port).replace("max_connections = 8", "max_connections = 2"),
    )
    .unwrap();
    let receiver = Killed(vec![spawn_service("hookbox-receiver", &config, &db.url)]);
    let base = format!("http://127.0.0.1:{port}");
    assert!(wait_for(&format!("{base}/readyz"), 200, Duration::from_secs(20)).await);
    let mut lock = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE inbox_events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();

    // Slow clients that never finish their headers, and a flood of deliveries.
    let slow: Vec<std::net::TcpStream> = (0..100)
        .filter_map(|_| {
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            std::io::Write::write_all(
                &mut stream,
                b"POST /webhooks/begini HTTP/1.1\r\nHost: x\r\n",
            )
            .ok()?;
            Some(stream)
        })
        .collect();
    let flood_done = Arc::new(AtomicBool::new(false));
    let probes = {
        let (base, done) = (base.clone(), flood_done.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()
                .unwrap();
            let mut answers = Vec::new();
            while !done.load(Ordering::SeqCst) {
                let health = client
                    .get(format!("{base}/healthz"))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .ok();
                let ready = client
                    .get(format!("{base}/readyz"))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .ok();
                answers.push((health, ready));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answers
        })
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let key = Scheme::Begini.key_from_secret(BEGINI_KEY).unwrap();
    let statuses: Vec<Option<u16>> = futures_util::stream::iter(0..400)
        .map(|_| {
            let body = begini_payload(&unique_uid(), "application.complete");
            let signature = Scheme::Begini.sign(&key, &body, 0, "").remove(0).1;
            let request = client
                .post(format!("{base}/webhooks/begini"))
                .header("X-Signature", signature)
                .body(body);
            async move { request.send().await.map(|r| r.status().as_u16()).ok() }
        })
        .buffer_unordered(200)
        .collect()
        .await;
    flood_done.store(true, Ordering::SeqCst);
    let answers = probes.await.unwrap();
    let rss_kib = std::fs::read_to_string(format!("/proc/{}/status", receiver.0[0].id()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap();
    lock.rollback().await.unwrap();
    drop(slow);

    assert!(
        statuses.iter().all(|s| matches!(s, Some(503) | Some(429))),
        "the flood gets 503 or 429: {statuses:?}"
    );
    assert!(!answers.is_empty());
    assert!(
        answers.iter().all(|(health, _)| *health == Some(200)),
        "health answered throughout: {answers:?}"
    );
    assert!(
        answers.iter().all(|(_, ready)| ready.is_some()),
        "readiness answered throughout: {answers:?}"
    );
    assert!(
        rss_kib < 200 * 1024,
        "the receiver's memory stayed bounded: {rss_kib} KiB"
    );
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM inbox_events")
            .fetch_one(&db.pool)
            .await
            .unwrap(),
        0
    );
}
