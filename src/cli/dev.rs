//! `hookbox dev`: a whole inbox on one machine, from nothing but Rust and the
//! PostgreSQL server binaries.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use clap::Args;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    db,
    pgcluster::{Cluster, ClusterOptions, StopMode},
    receiver, worker,
};

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Where the private cluster, the generated config and the development secret live.
    #[arg(long, default_value = ".hookbox")]
    pub data_dir: PathBuf,
    /// The receiver's port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The web console's port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 8088)]
    pub console_port: u16,
}

pub async fn run(args: DevArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let data_dir = args.data_dir.canonicalize()?;
    let config_path = write_dev_config(&data_dir, args.port)?;
    let mut config = Config::load(&config_path)?;
    config.receiver.listen = std::net::SocketAddr::from(([127, 0, 0, 1], args.port));
    let console_token = dev_console(&mut config, &data_dir, args.console_port)?;

    let url_file = data_dir.join("database-url");
    let (url, cluster) = match std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) {
        Some(url) => {
            // Other commands then need DATABASE_URL too: a stale file would
            // point them at a cluster that is not running.
            let _ = std::fs::remove_file(&url_file);
            (url, None)
        }
        None => {
            let options = ClusterOptions {
                durable: true,
                remove_on_exit: false,
                port: None,
            };
            let cluster = tokio::task::spawn_blocking({
                let dir = data_dir.join("postgres");
                move || Cluster::start(&dir, &options)
            })
            .await??;
            create_database(&cluster.url("postgres"), "hookbox").await?;
            // Trust authentication on loopback: the URL holds no password,
            // and other commands find it through `[database] url_file`.
            write_private(&url_file, &cluster.url("hookbox"))?;
            (cluster.url("hookbox"), Some(cluster))
        }
    };
    db::migrate(&url).await?;

    let shutdown = CancellationToken::new();
    let receiver_pool = db::pool(&url, &db::PoolSettings::receiver(&config))?;
    let app = receiver::Application::build(&config, receiver_pool).await?;
    let server = app.handle();
    let worker_pool = db::pool(&url, &db::PoolSettings::worker(&config))?;
    let worker = worker::Worker::from_config(&config, worker_pool, Default::default())?;
    let worker_task = tokio::spawn(worker.run(shutdown.clone()));
    let console = crate::console::Console::build(&config, crate::console::pool(&url)?)?;
    let console_server = console.handle();
    let console_port = console.port();
    let console_task = tokio::spawn(console.run_until_stopped());

    let private = cluster.is_some();
    println!("hookbox dev is running");
    if private {
        println!("  database:  {url} (private cluster, trust on loopback)");
    } else {
        println!("  database:  $DATABASE_URL ({})", without_password(&url));
    }
    println!(
        "  receiver:  http://127.0.0.1:{}/webhooks/begini",
        app.port()
    );
    println!("  config:    {}", config_path.display());
    println!("  console:   http://127.0.0.1:{console_port}/  (token: {console_token})");
    println!();
    println!("Send a signed test event from another terminal:");
    println!(
        "  cargo run -- --config {} send --source begini --url http://127.0.0.1:{}/webhooks/begini",
        config_path.display(),
        app.port()
    );
    println!(
        "Then look at the inbox{}:",
        if private {
            ""
        } else {
            " (with DATABASE_URL set there too)"
        }
    );
    println!("  cargo run -- --config {} status", config_path.display());
    println!(
        "  cargo run -- --config {} events list",
        config_path.display()
    );
    println!("Press Ctrl-C to stop.");

    let server_task = tokio::spawn(app.run_until_stopped());
    crate::shutdown_on_signal(shutdown.clone()).await;
    println!("stopping...");
    server.stop(true).await;
    console_server.stop(true).await;
    let _ = server_task.await;
    let _ = console_task.await;
    let _ = worker_task.await;
    if let Some(cluster) = cluster {
        tokio::task::spawn_blocking(move || cluster.stop(StopMode::Fast)).await??;
    }
    Ok(ExitCode::SUCCESS)
}

/// The console on 127.0.0.1 with one operator token, kept in the data
/// directory (mode 0600) so a browser session survives restarts of `dev`.
/// A `[console]` section in the generated file, if the user wrote one, wins.
fn dev_console(config: &mut Config, data_dir: &Path, port: u16) -> anyhow::Result<String> {
    let token_file = data_dir.join("dev-console-token");
    if !token_file.exists() {
        let token: [u8; 24] = rand::random();
        std::fs::write(&token_file, hex::encode(token))?;
        std::fs::set_permissions(
            &token_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
    }
    let token = std::fs::read_to_string(&token_file)?.trim().to_owned();
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    match &mut config.console {
        Some(console) => {
            console.listen = listen;
            Ok(format!("as configured in {}", config.path.display()))
        }
        None => {
            config.console = Some(crate::config::ConsoleConfig {
                listen,
                tokens: vec![crate::config::ConsoleToken {
                    name: "dev".into(),
                    token: crate::secret::Secret::new(token.clone().into_bytes()),
                    role: crate::config::Role::Operator,
                }],
                session: Duration::from_secs(8 * 3600),
            });
            // A development token on a loopback port, printed on purpose.
            Ok(token)
        }
    }
}

/// A database URL fit to print: its password, if any, replaced.
fn without_password(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "not shown".into(),
    }
}

/// Writes `text` to a file only its owner can read.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

/// The example configuration, written once so users can edit it.
fn write_dev_config(data_dir: &Path, port: u16) -> anyhow::Result<PathBuf> {
    let secret_file = data_dir.join("dev-secret");
    if !secret_file.exists() {
        let secret: [u8; 24] = rand::random();
        write_private(&secret_file, &hex::encode(secret))?;
    }
    let config_path = data_dir.join("hookbox.toml");
    if !config_path.exists() {
        let text = format!(
            r#"# Generated by `hookbox dev`; edit freely.
[database]
# $DATABASE_URL when set, else the private cluster's URL, which dev writes
# to this file each time it starts.
url_file = "{url_file}"

[receiver]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:0"

[worker]
concurrency = 4
poll_interval = "1s"
retry = {{ max_attempts = 5, initial = "1s", max = "30s", multiplier = 2.0, jitter = 0.2 }}

[[source]]
name = "begini"
environment = "sandbox"
scheme = "begini"
secrets_file = ["{secret}"]
event_key = {{ json = ["/integration_id", "/uid", "/event/type"] }}
event_type = {{ json = "/event/type" }}

[[route]]
source = "begini"
handler = "announce"

# Every event is announced on the PostgreSQL channel `hookbox_dev`
# (try `LISTEN hookbox_dev;` in psql).
[handler.announce]
kind = "sql"
statement = "SELECT pg_notify('hookbox_dev', $4 || ' ' || coalesce($2, '') || ' ' || $3::text)"
"#,
            secret = secret_file.display(),
            url_file = data_dir.join("database-url").display()
        );
        std::fs::write(&config_path, text)?;
    }
    Ok(config_path)
}

async fn create_database(maintenance_url: &str, name: &str) -> anyhow::Result<()> {
    let mut connection = connect_with_retry(maintenance_url).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut connection)
            .await?;
    if !exists {
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut connection)
            .await?;
    }
    Ok(())
}

async fn connect_with_retry(url: &str) -> anyhow::Result<sqlx::PgConnection> {
    let mut last_error = None;
    for _ in 0..50 {
        match sqlx::PgConnection::connect(url).await {
            Ok(connection) => return Ok(connection),
            Err(error) => last_error = Some(error),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last_error.expect("at least one attempt")).context("cannot connect to the private cluster")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_printed_database_url_never_shows_its_password() {
        let shown = without_password("postgres://app:s3cret@db.internal:5432/hookbox");
        assert_eq!(shown, "postgres://app:***@db.internal:5432/hookbox");
        assert_eq!(
            without_password("postgres://postgres@127.0.0.1:5432/hookbox"),
            "postgres://postgres@127.0.0.1:5432/hookbox"
        );
    }
}
