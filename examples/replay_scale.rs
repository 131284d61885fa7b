//! Benchmark: `hookbox replay` of 200,000 dead events, its peak memory, and
//! the receiver's delivery latency before and during the replay.
//!
//! `cargo build --release --bins --examples && target/release/examples/replay_scale [EVENTS]`
//! Uses DATABASE_URL's server if set (in a new database), else a private
//! cluster (fsync on).

use std::{collections::BTreeMap, path::Path, time::Duration};

use hookbox::{config::Config, db, pgcluster::Server, receiver};
use tokio::time::Instant;

const KEY: &str = "bench-key-for-the-benchmark";

const CONFIG: &str = r#"
[receiver]
listen = "127.0.0.1:0"
admin_listen = ""
[[source]]
name = "begini"
environment = "sandbox"
scheme = "begini"
secrets_env = ["BEGINI_API_KEY"]
"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events: i64 = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(200_000);
    let hookbox = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("hookbox"));
    let hookbox = hookbox
        .filter(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("build the binaries first: cargo build --release --bins"))?;
    let server = Server::from_env_or_private(true)?;
    let url = server.create_database("hookbox_bench").await?;
    let pool = sqlx::PgPool::connect(&url).await?;

    let seeded = Instant::now();
    sqlx::query(
        "WITH seed AS MATERIALIZED (
             SELECT (left(inbox_uuid_at(clock_timestamp())::text, 14) || right(gen_random_uuid()::text, 22))::uuid AS id,
                    g, p
             FROM generate_series(1, $1) g,
                  LATERAL (SELECT format('{\"uid\":\"U%s\",\"event\":{\"type\":\"application.complete\"}}', g) AS p) x
         ), event AS (
             INSERT INTO inbox_event_state (id, source, environment, event_key, event_type, status, attempts,
                                            payload_sha256, processed_at, last_error)
             SELECT id, 'begini', 'sandbox', 'seed-' || g, 'application.complete', 'dead', 12,
                    md5(p), now(), 'downstream answered HTTP 503'
             FROM seed
         )
         INSERT INTO inbox_payloads (event_id, payload, payload_is_json, headers)
         SELECT id, convert_to(p, 'UTF8'), true, '{}' FROM seed",
    )
    .bind(events)
    .execute(&pool)
    .await?;
    sqlx::query("VACUUM ANALYZE inbox_event_state, inbox_payloads")
        .execute(&pool)
        .await?;
    println!(
        "seeded {events} dead events in {:.1}s",
        seeded.elapsed().as_secs_f64()
    );

    let env: BTreeMap<String, String> = [("BEGINI_API_KEY".to_string(), KEY.to_string())].into();
    let config = Config::parse(CONFIG, Path::new("bench.toml"), &env)?;
    let app = receiver::Application::build(
        &config,
        db::pool(&url, &db::PoolSettings::receiver(&config))?,
    )
    .await?;
    let endpoint = format!("http://127.0.0.1:{}/webhooks/begini", app.port());
    tokio::spawn(app.run_until_stopped());
    let source = config.source("begini").expect("configured").clone();
    let client = reqwest::Client::new();
    let deliver = |n: u64| {
        let (client, endpoint, source) = (client.clone(), endpoint.clone(), source.clone());
        async move {
            let body = format!(
                r#"{{"uid":"LIVE-{n}-{}","event":{{"type":"application.complete"}}}}"#,
                uuid::Uuid::now_v7()
            );
            let mut request = client.post(&endpoint).body(body.clone());
            for (name, value) in source.scheme.sign(&source.keys[0], body.as_bytes(), 0, "") {
                request = request.header(name, value);
            }
            let started = Instant::now();
            let status = request
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            (status, started.elapsed())
        }
    };

    let mut baseline = Vec::new();
    for n in 0..200 {
        baseline.push(deliver(n).await.1);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let started = Instant::now();
    let mut replay = tokio::process::Command::new(&hookbox)
        .args(["replay", "--status", "dead", "--reason", "benchmark"])
        .env("DATABASE_URL", &url)
        .env("BEGINI_API_KEY", KEY)
        .env("HOOKBOX_CONFIG", write_config()?)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let pid = replay.id().expect("the replay is running");
    let mut peak_rss_kib = 0;
    let mut during = Vec::new();
    let mut failures = 0;
    let mut n = 1_000;
    let status = loop {
        tokio::select! {
            status = replay.wait() => break status?,
            (code, took) = deliver(n) => {
                peak_rss_kib = peak_rss_kib.max(high_water_mark_kib(pid));
                if code != 200 { failures += 1; }
                during.push(took);
                n += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let took = started.elapsed();
    anyhow::ensure!(status.success(), "hookbox replay failed");
    let replayed: i64 =
        sqlx::query_scalar("SELECT affected FROM inbox_actions WHERE action = 'replay'")
            .fetch_one(&pool)
            .await?;

    println!(
        "replayed {replayed} events in {:.1}s ({:.0} events/s), peak RSS of hookbox replay {} MiB",
        took.as_secs_f64(),
        replayed as f64 / took.as_secs_f64(),
        peak_rss_kib / 1024
    );
    println!(
        "delivery latency before the replay: {}",
        summary(&mut baseline)
    );
    println!(
        "delivery latency during the replay: {} ({} deliveries, {failures} not 200)",
        summary(&mut during),
        during.len()
    );
    pool.close().await;
    server.drop_database(&url).await?;
    Ok(())
}

fn write_config() -> anyhow::Result<std::path::PathBuf> {
    let path = std::env::temp_dir().join(format!("hookbox-bench-{}.toml", std::process::id()));
    std::fs::write(&path, CONFIG)?;
    Ok(path)
}

fn summary(samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |q: f64| {
        samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64() * 1000.0
    };
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

/// The process's peak resident set so far (`VmHWM`), in KiB.
fn high_water_mark_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}
