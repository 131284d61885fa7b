//! Soak: mixed load for a long time, with duplicates, handler failures and a
//! restart of each component, sampling memory, connections and table sizes
//! every 10 seconds. Not part of CI.
//!
//! ```sh
//! cargo build --release --bins --examples
//! target/release/examples/soak 30 docs/soak     # minutes, output directory
//! python3 bench/plot_soak.py docs/soak/samples.csv docs/soak/soak.png
//! ```
//! Needs no DATABASE_URL (it restarts its own private PostgreSQL).
//!
//! `SOAK_RETENTION_MINUTES=10` adds retention: partitions of one minute, and
//! every minute `hookbox prune` of everything older than that many minutes
//! (payloads, deliveries, attempts), as an operator's scheduled job would.
//! `SOAK_KEY_WINDOW_MINUTES=10` (with it) also deletes whole events that
//! finished longer ago than that (`--keys-older-than`): a dedup window.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use hookbox::pgcluster::{Cluster, ClusterOptions, StopMode};

const KEY: &str = "soak-key-for-the-thirty-minutes";

fn main() -> anyhow::Result<()> {
    let minutes: u64 = std::env::args()
        .nth(1)
        .map(|m| m.parse())
        .transpose()?
        .unwrap_or(30);
    let out = PathBuf::from(
        std::env::args()
            .nth(2)
            .unwrap_or_else(|| "docs/soak".into()),
    );
    std::fs::create_dir_all(&out)?;
    let retention: Option<u64> = std::env::var("SOAK_RETENTION_MINUTES")
        .ok()
        .map(|m| m.parse())
        .transpose()?;
    let key_window: Option<u64> = std::env::var("SOAK_KEY_WINDOW_MINUTES")
        .ok()
        .map(|m| m.parse())
        .transpose()?;
    let partitions = if retention.is_some() {
        "partition_interval = \"1m\"\n"
    } else {
        ""
    };
    let bin = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .context("target dir")?
        .to_owned();
    let runtime = tokio::runtime::Runtime::new()?;

    let data = std::env::temp_dir().join(format!("hookbox-soak-{}", std::process::id()));
    let cluster = Cluster::start(
        &data,
        &ClusterOptions {
            durable: true,
            remove_on_exit: true,
            port: None,
        },
    )?;
    let url = cluster.url("postgres");
    let pool = runtime.block_on(async {
        hookbox::db::migrate(&url).await?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await?;
        sqlx::query("CREATE TABLE side_effects (event_id uuid NOT NULL)")
            .execute(&pool)
            .await?;
        // The events a dedup window deleted, to check the books at the end.
        sqlx::raw_sql(
            "CREATE TABLE pruned_events (event_id uuid NOT NULL, status text NOT NULL);
             CREATE FUNCTION soak_note_pruned() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO pruned_events VALUES (OLD.id, OLD.status);
                 RETURN OLD;
             END $$;
             CREATE TRIGGER soak_note_pruned AFTER DELETE ON inbox_event_state
                 FOR EACH ROW EXECUTE FUNCTION soak_note_pruned();",
        )
        .execute(&pool)
        .await?;
        sqlx::query(
            "CREATE FUNCTION soak_handle(event uuid) RETURNS void LANGUAGE plpgsql AS $$
             BEGIN
                 IF random() < 0.05 THEN RAISE EXCEPTION 'simulated downstream failure'; END IF;
                 INSERT INTO side_effects (event_id) VALUES (event);
             END $$",
        )
        .execute(&pool)
        .await?;
        anyhow::Ok(pool)
    })?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = out.join("soak.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nmax_connections = 8\n[receiver]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"\"\n\
             [worker]\nadmin_listen = \"\"\nconcurrency = 8\nlease = \"30s\"\nshutdown_grace = \"10s\"\n{partitions}\
             retry = {{ max_attempts = 12, initial = \"1s\", max = \"30s\", multiplier = 2.0, jitter = 0.2 }}\n\
             [[source]]\nname = \"begini\"\nenvironment = \"sandbox\"\nscheme = \"begini\"\nsecrets_env = [\"BEGINI_API_KEY\"]\n\
             event_key = {{ json = [\"/integration_id\", \"/uid\", \"/event/type\"] }}\n\
             [[route]]\nsource = \"begini\"\nhandler = \"h\"\n[handler.h]\nkind = \"sql\"\nstatement = \"SELECT soak_handle($3)\"\n"
        ),
    )?;
    let spawn = |program: &str, args: &[String]| -> anyhow::Result<Child> {
        Ok(Command::new(bin.join(program))
            .args(args)
            .arg("--config")
            .arg(&config)
            .env("DATABASE_URL", &url)
            .env("BEGINI_API_KEY", KEY)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?)
    };
    let mut receiver = spawn("hookbox-receiver", &[])?;
    let mut worker = spawn("hookbox-worker", &[])?;
    std::thread::sleep(Duration::from_secs(1));
    let load_args: Vec<String> = [
        "loadtest",
        "--source",
        "begini",
        "--url",
        &format!("http://127.0.0.1:{port}/webhooks/begini"),
        "--connections",
        "16",
        "--rate",
        "150",
        "--duplicates",
        "0.2",
        "--duration",
        &format!("{minutes}m"),
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let load = spawn("hookbox", &load_args)?;

    let total = Duration::from_secs(minutes * 60);
    let started = Instant::now();
    let mut last_prune = 0;
    let mut samples = std::fs::File::create(out.join("samples.csv"))?;
    writeln!(samples, "seconds,receiver_rss_mib,worker_rss_mib,db_connections,events_mib,deliveries_mib,attempts_mib,pending,retrying,succeeded,dead,payloads_mib,event")?;
    let mut restarts = vec![
        (0.25, "receiver restarted (SIGTERM)"),
        (0.45, "worker restarted (SIGTERM)"),
        (0.60, "worker killed (SIGKILL)"),
        (0.75, "PostgreSQL restarted (fast)"),
    ];
    while started.elapsed() < total {
        std::thread::sleep(Duration::from_secs(10));
        let progress = started.elapsed().as_secs_f64() / total.as_secs_f64();
        let mut event = String::new();
        if let Some(&(at, what)) = restarts.first() {
            if progress >= at {
                restarts.remove(0);
                event = what.to_owned();
                match what {
                    w if w.starts_with("receiver") => {
                        terminate(&mut receiver);
                        receiver = spawn("hookbox-receiver", &[])?;
                    }
                    w if w.starts_with("worker restarted") => {
                        terminate(&mut worker);
                        worker = spawn("hookbox-worker", &[])?;
                    }
                    w if w.starts_with("worker killed") => {
                        worker.kill()?;
                        worker.wait()?;
                        worker = spawn("hookbox-worker", &[])?;
                    }
                    _ => {
                        cluster.stop(StopMode::Fast)?;
                        std::thread::sleep(Duration::from_secs(3));
                        cluster.restart(true)?;
                    }
                }
            }
        }
        let minute = (started.elapsed().as_secs() / 60) as i64;
        if let Some(minutes) = retention {
            if minute > last_prune {
                last_prune = minute;
                let older = format!("{minutes}m");
                let mut args: Vec<String> = [
                    "prune",
                    "--older-than",
                    &older,
                    "--deliveries-older-than",
                    &older,
                    "--attempts-older-than",
                    &older,
                    "--reason",
                    "soak retention",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                if let Some(window) = key_window {
                    args.extend(["--keys-older-than".to_owned(), format!("{window}m")]);
                }
                // A prune during the database's restart fails; the next one
                // catches up.
                let _ = spawn("hookbox", &args)?.wait_with_output();
                if event.is_empty() {
                    event = format!("pruned (older than {minutes} min)");
                }
            }
        }
        let stats = runtime.block_on(sample(&pool)).unwrap_or_default();
        writeln!(
            samples,
            "{:.0},{:.1},{:.1},{},{:.1},{:.1},{:.1},{},{},{},{},{:.1},{}",
            started.elapsed().as_secs_f64(),
            rss_mib(receiver.id()),
            rss_mib(worker.id()),
            stats.0,
            stats.1,
            stats.2,
            stats.3,
            stats.4,
            stats.5,
            stats.6,
            stats.7,
            stats.8,
            event
        )?;
        samples.flush()?;
    }
    let report = load.wait_with_output()?;
    std::fs::write(out.join("loadtest.json"), &report.stdout)?;
    // Let the queue drain, then check the books.
    let drained = Instant::now();
    let summary = runtime.block_on(async {
        while drained.elapsed() < Duration::from_secs(600) {
            let open: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox_events WHERE status IN ('pending', 'retrying', 'processing')")
                .fetch_one(&pool)
                .await?;
            if open == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let row: (i64, i64, i64, i64, i64, i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM inbox_events),
                    (SELECT count(*) FROM inbox_events WHERE status = 'succeeded')
                    + (SELECT count(*) FROM pruned_events WHERE status = 'succeeded'),
                    (SELECT count(*) FROM inbox_events WHERE status = 'dead'),
                    (SELECT count(*) FROM inbox_deliveries),
                    (SELECT count(*) FROM inbox_deliveries WHERE outcome = 'duplicate'),
                    (SELECT count(*) FROM side_effects),
                    (SELECT count(DISTINCT event_id) FROM side_effects),
                    (SELECT count(*) FROM pruned_events)",
        )
        .fetch_one(&pool)
        .await?;
        anyhow::Ok(row)
    })?;
    terminate(&mut receiver);
    terminate(&mut worker);
    let (events, succeeded, dead, deliveries, duplicates, effects, distinct, pruned) = summary;
    // `succeeded` counts the events a dedup window deleted too.
    let text = serde_json::json!({
        "minutes": minutes, "events": events, "events_pruned_whole": pruned, "succeeded": succeeded, "dead": dead, "deliveries": deliveries,
        "duplicates": duplicates, "side_effects": effects, "distinct_side_effects": distinct,
        "exactly_once": effects == distinct && distinct == succeeded,
    });
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&text)?,
    )?;
    println!("{text}");
    drop(cluster);
    Ok(())
}

fn terminate(child: &mut Child) {
    // SAFETY: plain kill(2) on a child we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Connections, table sizes (MiB), events by status, and the payloads' size
/// (MiB, part of the events' size).
#[allow(clippy::type_complexity)]
async fn sample(
    pool: &sqlx::PgPool,
) -> anyhow::Result<(i64, f64, f64, f64, i64, i64, i64, i64, f64)> {
    let row: (i64, f64, f64, f64, i64, i64, i64, i64, f64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()),
                (pg_total_relation_size('inbox_event_state')
                 + (SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('inbox_payloads'))) / 1048576.0::float8,
                (SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('inbox_deliveries')) / 1048576.0::float8,
                (SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('inbox_attempts')) / 1048576.0::float8,
                count(*) FILTER (WHERE status = 'pending'),
                count(*) FILTER (WHERE status = 'retrying'),
                count(*) FILTER (WHERE status = 'succeeded'),
                count(*) FILTER (WHERE status = 'dead'),
                (SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('inbox_payloads')) / 1048576.0::float8
         FROM inbox_events",
    )
    .fetch_one(pool)
    .await?;
    Ok(row)
}
