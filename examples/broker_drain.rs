//! Benchmark: how fast a worker forwards stored events to each broker, from
//! `pending` to confirmed by the broker (the JetStream ack, the AMQP publisher
//! confirm, the XADD reply) and recorded `succeeded`.
//!
//! `cargo build --release --examples && target/release/examples/broker_drain [EVENTS] [KINDS]`
//! EVENTS defaults to 20,000; KINDS to `nats,amqp,redis`. Brokers at the
//! machine's usual addresses (NATS 4222, RabbitMQ 5672 guest/guest, Redis
//! 6379); a broker that does not answer is skipped with a message. Uses
//! DATABASE_URL's server if set (in a new database), else a private cluster
//! (fsync on). One worker in this process, the default `concurrency = 16`
//! and `batch_size = 500`.

use std::{collections::BTreeMap, path::Path, time::Duration};

use hookbox::{
    config::Config,
    pgcluster::Server,
    worker::{LibraryHandlers, Worker},
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events: i64 = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(20_000);
    let kinds = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "nats,amqp,redis".into());
    let server = Server::from_env_or_private(true)?;
    println!(
        "== broker drain: {events} stored events (about 1 KB each) per kind, one worker process"
    );
    for kind in kinds.split(',') {
        let address = match kind {
            "nats" => "127.0.0.1:4222",
            "amqp" => "127.0.0.1:5672",
            "redis" => "127.0.0.1:6379",
            other => anyhow::bail!("unknown kind {other}: nats, amqp or redis"),
        };
        if tokio::net::TcpStream::connect(address).await.is_err() {
            println!("{kind}: SKIPPED, nothing answers at {address}");
            continue;
        }
        let url = server.create_database("hookbox_bench").await?;
        let rate = drain(kind, &url, events).await?;
        println!("{kind}: {rate:.0} events/s");
    }
    Ok(())
}

/// Seeds `events` pending events, runs a worker until they have all
/// succeeded, checks the broker holds them, and returns events per second.
async fn drain(kind: &str, url: &str, events: i64) -> anyhow::Result<f64> {
    let pool = sqlx::PgPool::connect(url).await?;
    sqlx::query(
        // Ids time-ordered like the receiver's UUIDv7; the state row and
        // the payload where the receiver writes them.
        "WITH seed AS MATERIALIZED (
             SELECT (left(inbox_uuid_at(clock_timestamp())::text, 14) || right(gen_random_uuid()::text, 22))::uuid AS id,
                    g, p
             FROM generate_series(1, $1) g,
                  LATERAL (SELECT format('{\"uid\":\"U%s\",\"integration_id\":\"1\",\"event\":{\"type\":\"psychometric_score.complete\",\"details\":{\"score\":700,\"notes\":\"%s\"}}}', g, repeat('x', 900)) AS p) x
         ), event AS (
             INSERT INTO inbox_event_state (id, source, environment, event_key, event_type, payload_sha256)
             SELECT id, 'begini', 'sandbox', 'bench-' || g, 'psychometric_score.complete', md5(p) FROM seed
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

    let name = format!("hookbox_bench_{}", uuid::Uuid::now_v7().simple());
    let handler = match kind {
        "nats" => {
            nats_stream(&name, true).await?;
            format!("kind = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nsubject = \"{name}.events\"")
        }
        "amqp" => {
            amqp_queue(&name, true).await?;
            format!("kind = \"amqp\"\nurl_env = \"BENCH_AMQP_URL\"\nexchange = \"{name}\"\nrouting_key = \"events\"")
        }
        _ => format!("kind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\nstream = \"{name}\""),
    };
    let text = format!(
        r#"
[worker]
admin_listen = ""
[[source]]
name = "begini"
environment = "sandbox"
scheme = "begini"
secrets_env = ["BEGINI_API_KEY"]
[[route]]
source = "begini"
handler = "out"
[handler.out]
{handler}
"#
    );
    let env: BTreeMap<String, String> = [
        (
            "BEGINI_API_KEY".to_string(),
            "bench-key-for-the-benchmark".to_string(),
        ),
        ("BENCH_AMQP_URL".to_string(), AMQP_URL.to_string()),
    ]
    .into();
    let config = Config::parse(&text, Path::new("bench.toml"), &env)?;
    let worker_pool = hookbox::db::pool(url, &hookbox::db::PoolSettings::worker(&config))?;
    let worker = Worker::from_config(&config, worker_pool, LibraryHandlers::default())?;
    let shutdown = CancellationToken::new();

    let started = Instant::now();
    let running = tokio::spawn(worker.run(shutdown.clone()));
    loop {
        let open: i64 =
            sqlx::query_scalar("SELECT count(*) FROM inbox_events WHERE status <> 'succeeded'")
                .fetch_one(&pool)
                .await?;
        if open == 0 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "{open} events still open after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    shutdown.cancel();
    running.await??;

    let held = match kind {
        "nats" => nats_stream(&name, false).await?,
        "amqp" => amqp_queue(&name, false).await?,
        _ => redis_stream(&name).await?,
    };
    anyhow::ensure!(
        held >= events as u64,
        "the broker holds {held} messages for {events} events"
    );
    Ok(events as f64 / elapsed.as_secs_f64())
}

/// Creates the stream (`create`), or counts its messages and deletes it.
async fn nats_stream(name: &str, create: bool) -> anyhow::Result<u64> {
    use async_nats::jetstream::{self, stream};
    let jetstream = jetstream::new(async_nats::connect("127.0.0.1:4222").await?);
    if create {
        jetstream
            .create_stream(stream::Config {
                name: name.to_owned(),
                subjects: vec![format!("{name}.events")],
                storage: stream::StorageType::File,
                max_age: Duration::from_secs(3600),
                ..Default::default()
            })
            .await?;
        return Ok(0);
    }
    let mut stream = jetstream.get_stream(name).await?;
    let held = stream.info().await?.state.messages;
    jetstream.delete_stream(name).await?;
    Ok(held)
}

/// Creates the exchange and a durable queue bound to it (`create`), or counts
/// the queue's messages and deletes both.
async fn amqp_queue(name: &str, create: bool) -> anyhow::Result<u64> {
    use lapin::{options::*, types::FieldTable, ExchangeKind};
    let connection =
        lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    if create {
        channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                name.into(),
                name.into(),
                "events".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        return Ok(0);
    }
    let held = channel
        .queue_delete(name.into(), QueueDeleteOptions::default())
        .await?;
    channel
        .exchange_delete(name.into(), ExchangeDeleteOptions::default())
        .await?;
    Ok(u64::from(held))
}

/// Counts the stream's entries and deletes it.
async fn redis_stream(name: &str) -> anyhow::Result<u64> {
    let mut redis = redis::Client::open("redis://127.0.0.1:6379")?
        .get_multiplexed_async_connection()
        .await?;
    let held: u64 = redis::cmd("XLEN").arg(name).query_async(&mut redis).await?;
    let _: i64 = redis::cmd("DEL").arg(name).query_async(&mut redis).await?;
    Ok(held)
}
