//! Test support: a real PostgreSQL (from DATABASE_URL, else a private
//! throwaway cluster), a fresh database per test, and a running receiver.

use std::{
    collections::BTreeMap,
    io::Write,
    path::Path,
    sync::{Arc, Mutex, OnceLock},
};

use hookbox::{config::Config, db, pgcluster::Server, receiver::Application};
use sqlx::PgPool;

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        Server::from_env_or_private(false).expect("a PostgreSQL server for the tests")
    })
}

/// A migrated database of its own, so tests run in parallel.
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
}

pub async fn database() -> TestDb {
    init_logs();
    let server = tokio::task::spawn_blocking(server).await.unwrap();
    let url = server
        .create_database("hookbox_test")
        .await
        .expect("a test database");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .unwrap();
    TestDb { url, pool }
}

/// A database of its own migrated only up to `version` (`V7__...` is 7), as
/// an older release left it: to test an upgrade.
pub async fn database_at(version: i32) -> TestDb {
    init_logs();
    let server = tokio::task::spawn_blocking(server).await.unwrap();
    let url = server
        .create_empty_database("hookbox_test")
        .await
        .expect("a test database");
    db::migrate_to(&url, version)
        .await
        .expect("the older migrations apply");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .unwrap();
    TestDb { url, pool }
}

/// Runs a docs/audit.md query with psql-style variables filled in; returns
/// its rows as JSON objects.
pub async fn audit_query(
    pool: &PgPool,
    sql: &str,
    vars: &[(&str, String)],
) -> Vec<serde_json::Value> {
    let mut text = sql.to_owned();
    for (name, value) in vars {
        text = text.replace(
            &format!(":'{name}'"),
            &format!("'{}'", value.replace('\'', "''")),
        );
        text = text.replace(&format!(":{name}"), value);
    }
    let wrapped = format!(
        "SELECT coalesce(json_agg(q), '[]'::json) FROM ({}) q",
        text.trim().trim_end_matches(';')
    );
    let rows: serde_json::Value = sqlx::query_scalar(&wrapped)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}: {text}"));
    rows.as_array().unwrap().clone()
}

/// `(heading, sql)` for each numbered query in docs/audit.md.
pub fn audit_queries() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/audit.md")).unwrap();
    let mut queries = Vec::new();
    let mut heading = String::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some(h) = line.strip_prefix("## ") {
            heading = h.to_owned();
        } else if line == "```sql" {
            let sql: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
            queries.push((heading.clone(), sql.join("\n")));
        }
    }
    queries
}

/// The key every test source signs with, unless a test says otherwise.
pub const BEGINI_KEY: &str = "test-begini-api-key-5f2c";

pub fn config(text: &str, env: &[(&str, &str)]) -> Config {
    let env: BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::parse(text, Path::new("test.toml"), &env).expect("test config is valid")
}

/// A begini source (sandbox) keyed by `BEGINI_API_KEY`, receiver on port 0.
pub const BEGINI_CONFIG: &str = r#"
[receiver]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
request_timeout = "2s"
max_body_bytes = 4096

[[source]]
name = "begini"
environment = "sandbox"
scheme = "begini"
secrets_env = ["BEGINI_API_KEY"]
"#;

pub struct TestApp {
    pub address: String,
    pub admin_address: String,
    pub db: TestDb,
    pub config: Config,
    pub client: reqwest::Client,
}

impl TestApp {
    pub async fn spawn(config_text: &str, env: &[(&str, &str)]) -> Self {
        let db = database().await;
        Self::spawn_on(db, config_text, env).await
    }

    pub async fn spawn_on(db: TestDb, config_text: &str, env: &[(&str, &str)]) -> Self {
        let config = config(config_text, env);
        let pool = db::pool(&db.url, &db::PoolSettings::receiver(&config)).unwrap();
        let app = Application::build(&config, pool)
            .await
            .expect("receiver builds");
        let address = format!("http://127.0.0.1:{}", app.port());
        let admin_address = format!("http://127.0.0.1:{}", app.admin_port().unwrap_or(0));
        tokio::spawn(app.run_until_stopped());
        Self {
            address,
            admin_address,
            db,
            config,
            client: reqwest::Client::new(),
        }
    }

    pub async fn begini() -> Self {
        Self::spawn(BEGINI_CONFIG, &[("BEGINI_API_KEY", BEGINI_KEY)]).await
    }

    /// POSTs `body` to `/webhooks/{source}` with exactly these headers.
    pub async fn post(
        &self,
        source: &str,
        body: impl Into<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut request = self
            .client
            .post(format!("{}/webhooks/{source}", self.address))
            .body(body.into());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Answer::from(request.send().await.expect("request sent")).await
    }

    /// The status `GET /readyz` answers.
    pub async fn readiness(&self) -> u16 {
        self.client
            .get(format!("{}/readyz", self.address))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// POSTs `body` signed with the source's first key, as its sender would.
    pub async fn post_signed(&self, source: &str, body: &[u8]) -> Answer {
        let headers = self.sign(source, body);
        let pairs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.post(source, body.to_vec(), &pairs).await
    }

    /// Like a webhook provider: retries a 503 (with backoff) until it is
    /// answered otherwise. Used where a test delivers in bulk on a busy machine.
    pub async fn deliver_as_sender(&self, source: &str, body: &[u8]) -> Answer {
        let mut wait = std::time::Duration::from_millis(50);
        for _ in 0..20 {
            let answer = self.post_signed(source, body).await;
            if answer.status != 503 {
                return answer;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_secs(2));
        }
        self.post_signed(source, body).await
    }

    pub fn sign(&self, source: &str, body: &[u8]) -> Vec<(String, String)> {
        let source = self.config.source(source).expect("source configured");
        let now = chrono::Utc::now().timestamp();
        source.scheme.sign(
            &source.keys[0],
            body,
            now,
            &format!("msg_{}", uuid::Uuid::now_v7().simple()),
        )
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }
}

pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: serde_json::Value,
}

impl Answer {
    async fn from(response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::json!({ "raw": String::from_utf8_lossy(&bytes) }));
        Self {
            status,
            headers,
            body,
        }
    }

    pub fn event_id(&self) -> uuid::Uuid {
        self.body["event_id"]
            .as_str()
            .expect("an event_id")
            .parse()
            .unwrap()
    }
}

/// A Begini envelope with a unique uid, as Begini sends it (compact JSON).
pub fn begini_payload(uid: &str, event_type: &str) -> Vec<u8> {
    format!(
        r#"{{"uid":"{uid}","integration_id":"12345678901234567890","event":{{"type":"{event_type}","details":{{"scored_at":1644397637}},"reasons":[]}}}}"#
    )
    .into_bytes()
}

pub fn unique_uid() -> String {
    uuid::Uuid::now_v7().simple().to_string().to_uppercase()
}

/// Fails if any captured log line contains one of `needles`.
pub fn assert_logs_never_contain(needles: &[&str]) {
    let logs = captured_logs();
    for needle in needles {
        assert!(!logs.contains(needle), "a log line contains {needle}");
    }
}

/// Every log line the tests produce, to search for leaked secrets and payloads.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&LOGS.get().expect("logs captured").lock().unwrap()).into_owned()
}

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logs() {
    let buffer = LOGS
        .get_or_init(|| Arc::new(Mutex::new(Vec::new())))
        .clone();
    let writer = move || Capture(buffer.clone());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            "debug,sqlx=warn,hyper=info,reqwest=info,actix_server=info,h2=info,rustls=info",
        )
        .with_writer(writer)
        .json()
        .try_init();
}

/// Starts `hookbox-receiver` or `hookbox-worker` as its own process.
pub fn spawn_service(binary: &str, config: &Path, database_url: &str) -> std::process::Child {
    spawn_service_with_env(binary, config, database_url, &[])
}

/// Like `spawn_service`, with more environment variables (alert URLs, tokens).
pub fn spawn_service_with_env(
    binary: &str,
    config: &Path,
    database_url: &str,
    env: &[(&str, &str)],
) -> std::process::Child {
    let program = match binary {
        "hookbox-receiver" => env!("CARGO_BIN_EXE_hookbox-receiver"),
        "hookbox-worker" => env!("CARGO_BIN_EXE_hookbox-worker"),
        other => panic!("no binary {other}"),
    };
    std::process::Command::new(program)
        .arg("--config")
        .arg(config)
        .env("DATABASE_URL", database_url)
        .env("BEGINI_API_KEY", BEGINI_KEY)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{binary} starts: {e}"))
}

/// A free port on 127.0.0.1 for a process that must keep it across restarts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private cluster of the test's own, migrated, for tests that stop or
/// restart PostgreSQL; `port` when the port must be known beforehand.
pub async fn private_cluster(port: Option<u16>) -> (hookbox::pgcluster::Cluster, String) {
    use hookbox::pgcluster::{Cluster, ClusterOptions};
    let data =
        std::env::temp_dir().join(format!("hookbox-private-{}", uuid::Uuid::now_v7().simple()));
    let options = ClusterOptions {
        durable: false,
        remove_on_exit: true,
        port,
    };
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(&data, &options))
        .await
        .unwrap()
        .expect("a private cluster");
    let url = cluster.url("postgres");
    db::migrate(&url).await.expect("migrations apply");
    (cluster, url)
}

/// Whether a service this machine should run (a broker) answers at `address`.
/// Absent, the test is skipped and says so loudly; under `CI=true` it fails.
pub fn service_available(name: &str, address: &str) -> bool {
    let reachable = address
        .parse()
        .ok()
        .and_then(|addr| {
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).ok()
        })
        .is_some();
    if reachable {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{name} is not reachable at {address}, and CI=true requires it");
    }
    eprintln!("SKIPPED: {name} is not reachable at {address}; this test did not run");
    false
}

/// A loopback TCP forwarder in front of a real service, which a test cuts
/// (existing connections dropped, new ones refused) and restores, to play an
/// outage without stopping the machine's shared service.
pub struct Forwarder {
    pub port: u16,
    target: String,
    up: Option<tokio_util::sync::CancellationToken>,
}

impl Forwarder {
    pub async fn start(target: &str) -> Self {
        let mut forwarder = Self {
            port: free_port(),
            target: target.to_owned(),
            up: None,
        };
        forwarder.restore().await;
        forwarder
    }

    /// Drops every forwarded connection and stops listening.
    pub fn cut(&mut self) {
        if let Some(up) = self.up.take() {
            up.cancel();
        }
    }

    /// Listens again on the same port.
    pub async fn restore(&mut self) {
        self.cut();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("the forwarder's port is free again");
        let up = tokio_util::sync::CancellationToken::new();
        let (target, token) = (self.target.clone(), up.clone());
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                let (target, token) = (target.clone(), token.clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        self.up = Some(up);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.cut();
    }
}
