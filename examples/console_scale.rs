//! Benchmark: the web console over 1,000,000 stored events. Times the events
//! page filtered by status and paged 50 at a time (following each page's
//! "older" link), and the overview.
//!
//! `cargo build --release --examples && target/release/examples/console_scale [EVENTS]`
//! Uses DATABASE_URL's server if set (in a new database), else a private
//! cluster (fsync on).

use std::{collections::BTreeMap, path::Path, time::Duration};

use hookbox::{config::Config, console, pgcluster::Server};
use tokio::time::Instant;

const TOKEN: &str = "bench-console-token-0123456789";

const CONFIG: &str = r#"
[receiver]
listen = "127.0.0.1:0"
admin_listen = ""
[[source]]
name = "begini"
environment = "sandbox"
scheme = "begini"
secrets_env = ["BEGINI_API_KEY"]
[[source]]
name = "partner"
environment = "sandbox"
scheme = "github"
secrets_env = ["PARTNER_SECRET"]
[console]
listen = "127.0.0.1:0"
tokens = [{ name = "bench", token_env = "CONSOLE_TOKEN", role = "operator" }]
"#;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1000.0
}

fn report(what: &str, mut times: Vec<Duration>) {
    times.sort();
    println!(
        "{what}: {} requests, p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms",
        times.len(),
        percentile(&times, 0.5),
        percentile(&times, 0.95),
        times.last().unwrap().as_secs_f64() * 1000.0
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events: i64 = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let server = Server::from_env_or_private(true)?;
    let url = server.create_database("hookbox_bench").await?;
    let pool = sqlx::PgPool::connect(&url).await?;

    // Thirty days of traffic: ids time-ordered like the receiver's UUIDv7,
    // 90% succeeded, 4% dead, 3% retrying, 2% skipped, 1% pending; one
    // delivery and one attempt per event.
    let seeded = Instant::now();
    sqlx::query(
        r#"
        WITH seed AS MATERIALIZED (
            SELECT (lpad(to_hex((extract(epoch FROM t) * 1000)::bigint), 12, '0') || substr(md5(g::text), 1, 20))::uuid AS id,
                   g, t, s, p
            FROM generate_series(1, $1) g,
                 LATERAL (SELECT now() - make_interval(secs => ($1 - g) * 2592000.0 / $1) AS t,
                                 CASE WHEN g % 100 < 90 THEN 'succeeded' WHEN g % 100 < 94 THEN 'dead'
                                      WHEN g % 100 < 97 THEN 'retrying' WHEN g % 100 < 99 THEN 'skipped'
                                      ELSE 'pending' END AS s,
                                 format('{"uid":"U%s","integration_id":"I%s","event":{"type":"application.complete"}}', g, g % 1000) AS p) x
        ), event AS (
            INSERT INTO inbox_event_state (id, source, environment, event_key, event_type, status, attempts, received_at,
                                           next_attempt_at, payload_sha256, processed_at, last_error)
            SELECT id, CASE WHEN g % 5 = 0 THEN 'partner' ELSE 'begini' END, 'sandbox', 'seed-' || g, 'application.complete',
                   s, 1, t, t, md5(p),
                   CASE WHEN s IN ('succeeded', 'dead', 'skipped') THEN t END,
                   CASE WHEN s IN ('dead', 'retrying') THEN 'downstream answered HTTP 503' END
            FROM seed
        )
        INSERT INTO inbox_payloads (event_id, payload, payload_is_json, headers)
        SELECT id, convert_to(p, 'UTF8'), true, '{}' FROM seed
        "#,
    )
    .bind(events)
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO inbox_deliveries (received_at, source, remote_addr, outcome, event_id, payload_sha256, status_code)
         SELECT received_at, source, '127.0.0.1', 'accepted', id, payload_sha256, 200 FROM inbox_events",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO inbox_attempts (event_id, attempt, worker_id, handler, started_at, finished_at, outcome, error)
         SELECT id, 1, 'bench', 'scores', received_at, received_at + interval '5 ms',
                CASE status WHEN 'succeeded' THEN 'succeeded' WHEN 'dead' THEN 'dead' WHEN 'skipped' THEN 'skipped' ELSE 'retry' END,
                last_error
         FROM inbox_events WHERE status <> 'pending'",
    )
    .execute(&pool)
    .await?;
    for table in [
        "inbox_event_state",
        "inbox_payloads",
        "inbox_deliveries",
        "inbox_attempts",
    ] {
        sqlx::query(&format!("VACUUM ANALYZE {table}"))
            .execute(&pool)
            .await?;
    }
    println!(
        "seeded {events} events (with deliveries and attempts) in {:.1}s",
        seeded.elapsed().as_secs_f64()
    );

    let env: BTreeMap<String, String> = [
        (
            "BEGINI_API_KEY".to_string(),
            "bench-key-for-the-benchmark".to_string(),
        ),
        (
            "PARTNER_SECRET".to_string(),
            "partner-key-for-the-benchmark".to_string(),
        ),
        ("CONSOLE_TOKEN".to_string(), TOKEN.to_string()),
    ]
    .into();
    let config = Config::parse(CONFIG, Path::new("bench.toml"), &env)?;
    let app = console::Console::build(&config, console::pool(&url)?)?;
    let base = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::new();
    let get = |path: String| {
        let client = client.clone();
        let url = format!("{base}{path}");
        async move {
            let started = Instant::now();
            let response = client.get(&url).bearer_auth(TOKEN).send().await?;
            anyhow::ensure!(response.status() == 200, "{url}: {}", response.status());
            let body = response.text().await?;
            Ok::<_, anyhow::Error>((started.elapsed(), body))
        }
    };

    // Warm the caches once, as a console in use would be.
    get("/".into()).await?;
    let mut pages = Vec::new();
    for status in ["succeeded", "dead", "retrying", "skipped", "pending"] {
        let mut path = format!("/events?status={status}");
        for _ in 0..20 {
            let (took, body) = get(path.clone()).await?;
            pages.push(took);
            let Some(older) = body.split(r#"id="older" href=""#).nth(1) else {
                break;
            };
            path = older.split('"').next().unwrap().replace("&amp;", "&");
        }
    }
    report(
        "events page (status filter, 50 per page, 20 pages deep)",
        pages,
    );

    let mut with_source = Vec::new();
    for status in ["dead", "retrying"] {
        for _ in 0..10 {
            with_source.push(
                get(format!("/events?status={status}&source=partner"))
                    .await?
                    .0,
            );
        }
    }
    report("events page (status and source filter)", with_source);

    let mut searches = Vec::new();
    for n in [17, 999_000, 523_456] {
        searches.push(get(format!("/events?q=uid+%3D+U{n}")).await?.0);
    }
    report(
        "payload search (uid = …, no index: a scan bounded by the page)",
        searches,
    );

    let mut overview = Vec::new();
    for _ in 0..20 {
        overview.push(get("/".into()).await?.0);
    }
    report("overview", overview);
    Ok(())
}
