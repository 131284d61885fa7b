//! Benchmark: how soon an accepted event starts processing on an idle system.
//!
//! Runs a receiver and a worker in-process (polling set to 60 s, so only the
//! LISTEN/NOTIFY path can explain a fast start), sends signed events one at a
//! time, and reads from the tables the gap between each event's insert
//! (`received_at`) and the start of its first attempt (`started_at`), both on
//! the database's clock.
//!
//! `cargo run --release --example notify_latency [EVENTS]`
//! Uses DATABASE_URL's server if set (in a new database), else a private
//! cluster (fsync on).

use std::{collections::BTreeMap, path::Path, time::Duration};

use hookbox::{config::Config, db, pgcluster::Server, receiver, worker};
use tokio_util::sync::CancellationToken;

const KEY: &str = "bench-key-for-the-benchmark";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(500);
    let server = Server::from_env_or_private(true)?;
    let url = server.create_database("hookbox_bench").await?;

    let text = r#"
[receiver]
listen = "127.0.0.1:0"
admin_listen = ""
[worker]
concurrency = 4
poll_interval = "60s"
[[source]]
name = "begini"
environment = "sandbox"
scheme = "begini"
secrets_env = ["KEY"]
[[route]]
source = "begini"
handler = "noop"
[handler.noop]
kind = "sql"
statement = "SELECT $3"
"#;
    let env: BTreeMap<String, String> = [("KEY".to_string(), KEY.to_string())].into();
    let config = Config::parse(text, Path::new("bench.toml"), &env)?;
    let app = receiver::Application::build(
        &config,
        db::pool(&url, &db::PoolSettings::receiver(&config))?,
    )
    .await?;
    let port = app.port();
    tokio::spawn(app.run_until_stopped());
    let shutdown = CancellationToken::new();
    let worker = worker::Worker::from_config(
        &config,
        db::pool(&url, &db::PoolSettings::worker(&config))?,
        Default::default(),
    )?;
    let running = tokio::spawn(worker.run(shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let client = reqwest::Client::new();
    let source = config.source("begini").expect("configured");
    for i in 0..events {
        let body = format!(
            r#"{{"uid":"BENCH-{i}-{}","integration_id":"1","event":{{"type":"psychometric_score.complete","details":{{}}}}}}"#,
            uuid::Uuid::now_v7()
        );
        let mut request = client
            .post(format!("http://127.0.0.1:{port}/webhooks/begini"))
            .body(body.clone());
        for (name, value) in source.scheme.sign(&source.keys[0], body.as_bytes(), 0, "") {
            request = request.header(name, value);
        }
        let status = request.send().await?.status();
        anyhow::ensure!(status == 200, "delivery answered {status}");
        // Idle system: one event at a time, the worker waiting on its notification.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pool = sqlx::PgPool::connect(&url).await?;
    for _ in 0..600 {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM inbox_events WHERE status <> 'succeeded'")
                .fetch_one(&pool)
                .await?;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (p50, p90, p99, max): (f64, f64, f64, f64) = sqlx::query_as(
        "SELECT q[1], q[2], q[3], m FROM (
            SELECT percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY ms) AS q, max(ms) AS m
            FROM (SELECT extract(epoch FROM a.started_at - e.received_at)::float8 * 1000 AS ms
                  FROM inbox_events e JOIN inbox_attempts a ON a.event_id = e.id AND a.attempt = 1) gaps) s",
    )
    .fetch_one(&pool)
    .await?;
    println!("events: {events} (one at a time, 20 ms apart; worker polling every 60 s)");
    println!(
        "stored -> processing started (ms): p50 {p50:.2}  p90 {p90:.2}  p99 {p99:.2}  max {max:.2}"
    );
    shutdown.cancel();
    running.await??;
    pool.close().await;
    server.drop_database(&url).await?;
    Ok(())
}
