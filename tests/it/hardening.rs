//! Hardening from review (issue 15): hostile keys, batches that must not sink
//! their neighbours, refusal floods, exec isolation, readiness, deployment
//! defaults and the commands a newcomer types.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures_util::future::join_all;
use hookbox::{
    ops::prune::{prune, PruneRequest},
    store::{self, NewDelivery, Origin},
    worker::{LibraryHandlers, Worker},
};
use uuid::Uuid;

use crate::support::*;

/// Concurrent requests within 300 ms share one batch.
const ONE_BATCH: &str = "http_workers = 1\nbatch_committers = 1\nbatch_max_wait = \"300ms\"";

fn begini_with(receiver: &str) -> String {
    BEGINI_CONFIG.replace("[receiver]\n", &format!("[receiver]\n{receiver}\n"))
}

/// The Begini source keyed by uid, so a test controls the key's bytes.
fn keyed_by_uid(receiver: &str) -> String {
    format!(
        "{}event_key = {{ json = [\"/uid\"] }}\n",
        begini_with(&format!("{receiver}\nmax_body_bytes = 16384"))
            .replace("max_body_bytes = 4096\n", "")
    )
}

fn with_uid(uid: &str) -> Vec<u8> {
    begini_payload(uid, "application.complete")
}

#[tokio::test]
async fn an_over_long_event_key_is_a_bad_request_and_its_batch_neighbours_are_stored() {
    let app = TestApp::spawn(&keyed_by_uid(ONE_BATCH), &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    let long = "X".repeat(3000);
    let bodies = [
        with_uid(&unique_uid()),
        with_uid(&long),
        with_uid(&unique_uid()),
    ];

    let answers = join_all(bodies.iter().map(|body| app.post_signed("begini", body))).await;

    assert_eq!(answers[1].status, 400, "{}", answers[1].body);
    assert!(answers[1].body["detail"]
        .as_str()
        .unwrap()
        .contains("event key"));
    assert!(!answers[1].body.to_string().contains(&long));
    assert_eq!(answers[0].status, 200, "{}", answers[0].body);
    assert_eq!(answers[2].status, 200, "{}", answers[2].body);
    assert_eq!(app.count("SELECT count(*) FROM inbox_events").await, 2);
    // The same key sent again is refused the same way, never a 503.
    assert_eq!(app.post_signed("begini", &bodies[1]).await.status, 400);
}

#[tokio::test]
async fn a_nul_in_the_json_key_or_type_is_a_bad_request_not_a_503() {
    let app = TestApp::spawn(&keyed_by_uid(""), &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    let nul_in_key = br#"{"uid":"a\u0000b","event":{"type":"application.complete"}}"#;
    let nul_in_type = br#"{"uid":"nul-type","event":{"type":"application\u0000complete"}}"#;

    for body in [&nul_in_key[..], &nul_in_type[..]] {
        let answer = app.post_signed("begini", body).await;
        assert_eq!(answer.status, 400, "{}", answer.body);
        assert_eq!(app.post_signed("begini", body).await.status, 400);
    }
    assert_eq!(app.count("SELECT count(*) FROM inbox_events").await, 0);
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_deliveries WHERE outcome = 'rejected_payload'")
            .await,
        4
    );
}

/// A batch takes two statements when one of its keys is being inserted by
/// another transaction. Between them, an exclusive lock request queued on the
/// table stops the second statement: before the batch was one transaction, the
/// first statement's event was committed and then answered 503.
#[tokio::test]
async fn a_batch_is_one_transaction_so_a_503_never_hides_a_stored_event() {
    let app = TestApp::spawn(&keyed_by_uid(ONE_BATCH), &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    let racing_uid = unique_uid();
    let racing = with_uid(&racing_uid);
    let fresh = with_uid(&unique_uid());

    // Another writer is inserting the racing key, not yet committed.
    let mut other_writer = app.db.pool.begin().await.unwrap();
    store::ingest_batch(
        &mut other_writer,
        &[delivery_of(&racing, &racing_uid)],
        Origin::Http,
    )
    .await
    .unwrap();

    let sends = {
        let (racing, fresh) = (racing.clone(), fresh.clone());
        let app = &app;
        async move {
            join_all([
                app.post_signed("begini", &fresh),
                app.post_signed("begini", &racing),
            ])
            .await
        }
    };
    let interfere = async {
        // The batch is now waiting for the other writer's key.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let mut locker = app.db.pool.begin().await.unwrap();
        let lock =
            sqlx::query("LOCK TABLE inbox_events IN ACCESS EXCLUSIVE MODE").execute(&mut *locker);
        let commit_other = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            other_writer.commit().await.unwrap();
        };
        let (locked, ()) = tokio::join!(lock, commit_other);
        locked.unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        locker.rollback().await.unwrap();
    };
    let (answers, ()) = tokio::join!(sends, interfere);

    let stored_fresh = app
        .count(&format!(
            "SELECT count(*) FROM inbox_events WHERE payload_sha256 = '{}'",
            hookbox::event_key::sha256_hex(&fresh)
        ))
        .await;
    match answers[0].status {
        200 => assert_eq!(stored_fresh, 1),
        503 => assert_eq!(stored_fresh, 0, "a 503 was answered for a stored event"),
        other => panic!("unexpected status {other}"),
    }
    assert!(matches!(answers[1].status, 200 | 503));
}

fn delivery_of(body: &[u8], key: &str) -> NewDelivery {
    let sha = hookbox::event_key::sha256_hex(body);
    NewDelivery {
        ordering: None,
        source: "begini".into(),
        environment: "sandbox".into(),
        event_key: key.into(),
        event_type: Some("application.complete".into()),
        payload_is_json: true,
        payload: body.to_vec(),
        headers: serde_json::json!({}),
        payload_sha256: sha,
        remote_addr: None,
    }
}

/// Two writers insert overlapping keys given in opposite orders. Each insert
/// is slowed down so that both hold their first key while asking for their
/// second: in the order given, that is a deadlock and one batch fails.
#[tokio::test]
async fn batches_with_overlapping_keys_in_opposite_orders_do_not_deadlock() {
    let db = database().await;
    sqlx::raw_sql(
        "CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(0.3); RETURN NEW; END $$;
         CREATE TRIGGER slow_insert BEFORE INSERT ON inbox_event_state
             FOR EACH ROW EXECUTE FUNCTION slow_insert();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let (body_a, body_b) = (with_uid("A"), with_uid("B"));
    let (a, b) = (delivery_of(&body_a, "key-a"), delivery_of(&body_b, "key-b"));
    let forward = [a.clone(), b.clone()];
    let backward = [b, a];

    let (mut one, mut two) = (
        db.pool.acquire().await.unwrap(),
        db.pool.acquire().await.unwrap(),
    );
    let (first, second) = tokio::join!(
        store::ingest_batch(&mut one, &forward, Origin::Http),
        store::ingest_batch(&mut two, &backward, Origin::Http),
    );

    let first = first.expect("the first batch is stored");
    let second = second.expect("the second batch is stored");
    assert_eq!(first.len() + second.len(), 4);
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM inbox_events")
            .fetch_one(&db.pool)
            .await
            .unwrap(),
        2
    );
}

/// Someone floods the source with forged deliveries from one address while
/// the real sender keeps delivering from another.
#[tokio::test]
async fn a_refusal_flood_writes_a_bounded_number_of_rows_while_the_real_sender_gets_200() {
    let config = r#"
[database]
max_connections = 3

[receiver]
listen = "127.0.0.1:0"
admin_listen = ""
request_timeout = "5s"
max_body_bytes = 4096
trusted_proxies = ["127.0.0.1"]
refusal_rate_limit = { per_second = 5, burst = 50 }
refusals_detailed_per_minute = 20

[[source]]
name = "begini"
environment = "sandbox"
scheme = "begini"
secrets_env = ["BEGINI_API_KEY"]
"#;
    let app = TestApp::spawn(config, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    let attacker = async {
        let mut statuses = Vec::new();
        for round in 0..40 {
            let junk = (0..15).map(|i| {
                app.post(
                    "begini",
                    format!("{{\"junk\":{round}{i}}}"),
                    &[("X-Signature", "00ff"), ("X-Forwarded-For", "198.51.100.7")],
                )
            });
            statuses.extend(join_all(junk).await.into_iter().map(|a| a.status));
        }
        statuses
    };
    let sender = async {
        let mut statuses = Vec::new();
        for _ in 0..30 {
            let body = begini_payload(&unique_uid(), "application.complete");
            let mut headers = app.sign("begini", &body);
            headers.push(("X-Forwarded-For".into(), "203.0.113.5".into()));
            let pairs: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            statuses.push(app.post("begini", body, &pairs).await.status);
        }
        statuses
    };
    let (junk, real) = tokio::join!(attacker, sender);

    assert!(
        real.iter().all(|s| *s == 200),
        "the real sender got {real:?}"
    );
    assert!(junk.iter().all(|s| matches!(s, 403 | 429)));
    assert!(junk.contains(&429), "the flooding address is throttled");
    let detailed = app
        .count("SELECT count(*) FROM inbox_deliveries WHERE outcome <> 'accepted'")
        .await;
    assert!(
        detailed <= 40,
        "{detailed} refusal rows for a {}-request flood",
        junk.len()
    );
    // Every refusal is still visible in SQL, as per-minute counts.
    let counted = "SELECT coalesce(sum(refused), 0)::bigint FROM inbox_refusal_counts WHERE source = 'begini'";
    let deadline = Instant::now() + Duration::from_secs(15);
    while app.count(counted).await < junk.len() as i64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.count(counted).await, junk.len() as i64);
    assert!(app.count("SELECT count(*) FROM inbox_refusal_counts").await <= 8);
}

fn worker_config(extra: &str) -> String {
    format!(
        "{BEGINI_CONFIG}\n[worker]\nconcurrency = 2\nlease = \"30s\"\npoll_interval = \"100ms\"\n\
         retry = {{ max_attempts = 2, initial = \"200ms\", max = \"1s\", multiplier = 2.0, jitter = 0.0 }}\n\
         [[route]]\nsource = \"begini\"\nhandler = \"h\"\n{extra}"
    )
}

async fn worker_for(db: &TestDb, extra: &str) -> Worker {
    let config = config(&worker_config(extra), &[("BEGINI_API_KEY", BEGINI_KEY)]);
    let pool = hookbox::db::pool(&db.url, &hookbox::db::PoolSettings::worker(&config)).unwrap();
    Worker::from_config(&config, pool, LibraryHandlers::default()).unwrap()
}

async fn store_event(db: &TestDb, uid: &str) -> Uuid {
    let body = begini_payload(uid, "application.complete");
    let key = hookbox::event_key::sha256_hex(&body);
    store::ingest_batch(
        &mut db.pool.acquire().await.unwrap(),
        &[delivery_of(&body, &key)],
        Origin::Http,
    )
    .await
    .unwrap()[0]
        .1
}

async fn first_attempt(db: &TestDb, worker: &Worker, id: Uuid) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        worker.process_next().await.unwrap();
        let row: Option<(Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT outcome, error FROM inbox_attempts WHERE event_id = $1 AND finished_at IS NOT NULL",
        )
        .bind(id)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        if let Some((outcome, error)) = row {
            return (outcome.unwrap(), error.unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "the attempt never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn exec_handler(script: &str, extra: &str) -> String {
    format!(
        "[handler.h]\nkind = \"exec\"\ncommand = [\"sh\", \"-c\", {}]\n{extra}\n",
        toml::Value::String(script.into())
    )
}

#[tokio::test]
async fn an_exec_handler_sees_only_path_its_metadata_and_the_allowed_variables() {
    let db = database().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("env");
    let worker = worker_for(
        &db,
        &exec_handler(
            &format!("env > '{}'", out.display()),
            "timeout = \"10s\"\nenv = [\"HOME\"]",
        ),
    )
    .await;
    let id = store_event(&db, &unique_uid()).await;

    assert_eq!(first_attempt(&db, &worker, id).await.0, "succeeded");

    let seen = std::fs::read_to_string(&out).unwrap();
    let names: Vec<&str> = seen.lines().filter_map(|l| l.split('=').next()).collect();
    assert!(names.contains(&"PATH"));
    assert!(
        names.contains(&"HOME"),
        "the allow-listed variable is passed"
    );
    assert!(names.contains(&"HOOKBOX_EVENT_ID"));
    assert!(
        !names.contains(&"DATABASE_URL"),
        "the database URL never reaches a handler"
    );
    for name in &names {
        assert!(
            matches!(*name, "PATH" | "HOME" | "PWD" | "SHLVL" | "_")
                || name.starts_with("HOOKBOX_"),
            "{name} reached the handler"
        );
    }
}

#[tokio::test]
async fn an_exec_timeout_kills_the_whole_process_group() {
    let db = database().await;
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let worker = worker_for(
        &db,
        &exec_handler(
            &format!("sleep 100 & echo $! > '{}'; sleep 100", pid_file.display()),
            "timeout = \"1s\"",
        ),
    )
    .await;
    let id = store_event(&db, &unique_uid()).await;

    let (outcome, error) = first_attempt(&db, &worker, id).await;
    assert_eq!(outcome, "retry");
    assert!(error.contains("timed out"), "{error}");

    let background: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_running(background) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !is_running(background),
        "the handler's background child survived"
    );
}

/// Alive and not a zombie waiting to be reaped.
fn is_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test]
async fn handler_errors_carrying_payload_text_reach_the_attempt_row_but_never_the_log() {
    let db = database().await;
    let marker = format!("PAYLOADFRAGMENT{}", Uuid::now_v7().simple());
    let sql_worker = worker_for(
        &db,
        "[handler.h]\nkind = \"sql\"\nstatement = \"SELECT ($1->>'uid')::int\"\n",
    )
    .await;
    let id = store_event(&db, &format!("{marker}sql")).await;
    let (_, error) = first_attempt(&db, &sql_worker, id).await;
    assert!(error.contains(&marker), "the attempt row keeps the detail");

    let exec_db = database().await;
    let exec_worker = worker_for(
        &exec_db,
        &exec_handler("cat >&2; exit 1", "timeout = \"10s\""),
    )
    .await;
    let id = store_event(&exec_db, &format!("{marker}exec")).await;
    let (_, error) = first_attempt(&exec_db, &exec_worker, id).await;
    assert!(error.contains(&marker));

    assert_logs_never_contain(&[&marker]);
}

#[tokio::test]
async fn readiness_is_cached_so_a_flood_of_probes_runs_few_queries() {
    let app = TestApp::begini().await;
    let commits = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()";
    let settled = || async {
        // A backend reports its statistics when it ends: end the receiver's.
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'hookbox-receiver'",
        )
        .execute(&app.db.pool)
        .await
        .unwrap();
        let others = "SELECT count(*) FROM pg_stat_activity
                      WHERE datname = current_database() AND application_name = 'hookbox-receiver'";
        while app.count(others).await > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The pool tests a connection idle for a second before using it again.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&app.db.pool)
            .await
            .unwrap();
        app.count(commits).await
    };
    assert_eq!(
        app.client
            .get(format!("{}/readyz", app.address))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let before = settled().await;

    for _ in 0..10 {
        let probes = (0..20).map(|_| app.client.get(format!("{}/readyz", app.address)).send());
        for answer in join_all(probes).await {
            assert_eq!(answer.unwrap().status(), 200);
        }
    }

    let queries = settled().await - before;
    assert!(queries < 40, "200 probes ran about {queries} queries");
}

fn repository_file(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_deployment_files_run_unprivileged_and_keep_secrets_out_of_files_and_images() {
    let compose = repository_file("docker-compose.yml");
    for line in compose.lines() {
        let Some((key, value)) = line.trim_start().split_once(": ") else {
            continue;
        };
        if !key.ends_with("PASSWORD") {
            continue;
        }
        let value = value.trim();
        assert!(
            value.starts_with("${"),
            "a password is written in the compose file: {line}"
        );
    }
    assert!(
        !compose.contains("hookbox:hookbox@"),
        "no password in a URL"
    );
    assert!(
        compose.contains("POSTGRES_USER: postgres"),
        "the application is not the superuser"
    );
    for service in ["migrate", "receiver", "worker"] {
        let block = compose_service(&compose, service);
        assert!(block.contains("read_only: true"), "{service}: read_only");
        assert!(block.contains("cap_drop: [ALL]"), "{service}: cap_drop");
        assert!(
            block.contains("no-new-privileges:true"),
            "{service}: no-new-privileges"
        );
        assert!(!block.contains("curl"), "{service}: no curl in the image");
    }
    assert!(compose_service(&compose, "receiver")
        .contains("\"${HOOKBOX_PUBLISH:-127.0.0.1:8080}:8080\""));
    let dockerignore = repository_file(".dockerignore");
    for entry in [".env", "target", ".git", ".hookbox"] {
        assert!(
            dockerignore
                .lines()
                .any(|l| l.trim_start_matches('/') == entry),
            ".dockerignore: {entry}"
        );
    }
    assert!(repository_file(".gitignore")
        .lines()
        .any(|l| l == ".env" || l == "/.env"));
    let dockerfile = repository_file("Dockerfile");
    assert!(!dockerfile.contains("curl"), "no curl in the runtime image");
}

fn compose_service<'a>(compose: &'a str, name: &str) -> &'a str {
    let start = compose
        .find(&format!("\n  {name}:\n"))
        .unwrap_or_else(|| panic!("service {name}"))
        + 1;
    let rest = &compose[start..];
    // The block ends at the next line indented by two spaces or less.
    let end = rest
        .match_indices('\n')
        .map(|(i, _)| i + 1)
        .find(|&i| {
            let line = &rest[i..];
            !line.is_empty() && !line.starts_with("   ") && !line.starts_with('\n')
        })
        .unwrap_or(rest.len());
    &rest[..end]
}

fn hookbox() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hookbox"))
}

/// Reads a child's lines until one contains `needle`; returns every line read.
fn lines_until(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    needle: &str,
) -> Vec<String> {
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let done = line.contains(needle);
        seen.push(line);
        if done {
            return seen;
        }
    }
    panic!("the output ended before `{needle}`: {seen:?}");
}

fn interrupt(mut child: Child) {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();
}

/// The newcomer's path: `hookbox dev` in one terminal, then in another the
/// commands it prints and the README shows, typed as printed.
#[test]
fn while_dev_runs_the_commands_it_prints_and_the_readme_shows_work_as_printed() {
    let dir = tempfile::Builder::new()
        .prefix("hookbox-dev-")
        .tempdir()
        .unwrap();
    let mut dev = hookbox()
        .args(["dev", "--port", "0", "--data-dir"])
        .arg(dir.path())
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(dev.stdout.take().unwrap()).lines();
    let printed = lines_until(&mut lines, "Press Ctrl-C");
    let config = dir.path().join("hookbox.toml");
    let config = config.to_str().unwrap();

    let mut commands: Vec<Vec<String>> = printed
        .iter()
        .filter(|line| line.trim_start().starts_with("cargo run -- "))
        .map(|line| line.split_whitespace().skip(3).map(String::from).collect())
        .collect();
    assert!(commands.len() >= 2, "dev prints what to try: {printed:?}");
    for readme in [
        vec!["--config", config, "status"],
        vec!["--config", config, "events", "list"],
    ] {
        commands.push(readme.into_iter().map(String::from).collect());
    }
    for args in &commands {
        let output = hookbox()
            .args(args)
            .env_remove("DATABASE_URL")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "hookbox {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    interrupt(dev);
}

#[tokio::test]
async fn dev_never_prints_the_database_password() {
    let db = database().await;
    let with_password = db.url.replacen("postgres@", "postgres:s3cret-pw@", 1);
    assert_ne!(with_password, db.url);
    let dir = tempfile::tempdir().unwrap();
    let mut dev = hookbox()
        .args(["dev", "--port", "0", "--data-dir"])
        .arg(dir.path())
        .env("DATABASE_URL", &with_password)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(dev.stdout.take().unwrap()).lines();
    let printed = tokio::task::spawn_blocking(move || lines_until(&mut lines, "Press Ctrl-C"))
        .await
        .unwrap();
    interrupt(dev);
    assert!(!printed.join("\n").contains("s3cret-pw"), "{printed:?}");
}

/// `hookbox-worker` twice on one host, the configuration as shipped.
#[tokio::test]
async fn two_workers_with_the_default_metrics_address_run_on_one_host() {
    let db = database().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hookbox.toml");
    std::fs::write(
        &path,
        worker_config("[handler.h]\nkind = \"sql\"\nstatement = \"SELECT 1\"\n"),
    )
    .unwrap();
    let start = || {
        Command::new(env!("CARGO_BIN_EXE_hookbox-worker"))
            .arg("--config")
            .arg(&path)
            .args(["--log-format", "json"])
            .env("DATABASE_URL", &db.url)
            .env("BEGINI_API_KEY", BEGINI_KEY)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut ports = Vec::new();
    let mut workers = Vec::new();
    for _ in 0..2 {
        let mut worker = start();
        let stderr = worker.stderr.take().unwrap();
        let seen = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stderr).lines();
            let seen = lines_until(&mut lines, "worker started");
            std::thread::spawn(move || lines.for_each(drop));
            seen
        })
        .await;
        let seen = seen.unwrap_or_default();
        let port = seen
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|l| l["admin_port"].as_u64());
        ports.push(port);
        workers.push(worker);
    }
    let alive: Vec<bool> = workers
        .iter_mut()
        .map(|w| w.try_wait().unwrap().is_none())
        .collect();
    for worker in workers {
        interrupt(worker);
    }
    assert_eq!(alive, [true, true]);
    assert!(ports.iter().all(Option::is_some), "{ports:?}");
    assert_ne!(ports[0], ports[1]);
}

/// A worker needs no source secret, a receiver no handler secret: each
/// process holds only the secrets of its own job.
#[tokio::test]
async fn a_worker_starts_without_the_sources_secrets_and_a_receiver_without_the_handlers() {
    let db = database().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hookbox.toml");
    let text = format!(
        "{}\n[handler.h]\nkind = \"http\"\nurl = \"http://127.0.0.1:9/\"\nsigning_secret_env = \"DOWNSTREAM_SIGNING_KEY\"\n",
        worker_config("")
    )
    .replace("admin_listen = \"127.0.0.1:0\"", "admin_listen = \"\"");
    std::fs::write(&path, text).unwrap();
    let start = |binary: &str, secret: (&str, &str)| {
        Command::new(binary)
            .arg("--config")
            .arg(&path)
            .args(["--log-format", "json"])
            .env("DATABASE_URL", &db.url)
            .env_remove("BEGINI_API_KEY")
            .env(secret.0, secret.1)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let worker = start(
        env!("CARGO_BIN_EXE_hookbox-worker"),
        (
            "DOWNSTREAM_SIGNING_KEY",
            "whsec_c2VjcmV0LWtleS1mb3ItZG93bnN0cmVhbQ==",
        ),
    );
    let receiver = start(
        env!("CARGO_BIN_EXE_hookbox-receiver"),
        ("BEGINI_API_KEY", BEGINI_KEY),
    );
    for (mut child, started) in [(worker, "worker started"), (receiver, "receiver listening")] {
        let seen = saw_line_within(&mut child, started, Duration::from_secs(30));
        let _ = child.kill();
        let _ = child.wait();
        assert!(seen.0, "{started}: {:?}", seen.1);
    }
}

/// Whether the child's stderr shows a line containing `needle` within
/// `limit` (a refused configuration ends the output instead), and the lines.
fn saw_line_within(child: &mut Child, needle: &str, limit: Duration) -> (bool, Vec<String>) {
    let stderr = child.stderr.take().unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    while let Ok(line) = received.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let found = line.contains(needle);
        seen.push(line);
        if found {
            return (true, seen);
        }
    }
    (false, seen)
}

#[tokio::test]
async fn pruning_reads_each_row_about_once_not_once_per_batch() {
    let db = database().await;
    const ROWS: i64 = 20_000;
    // Half received before schema version 10 (the payload in the event's row),
    // half since (in inbox_payloads; ids that are not UUIDv7, as a script
    // might write them, so that they land in the DEFAULT partition).
    sqlx::query(
        "INSERT INTO inbox_event_state (id, source, environment, event_key, status, processed_at, legacy_payload, payload_sha256)
         SELECT gen_random_uuid(), 'begini', 'sandbox', 'old-' || g, 'succeeded',
                now() - interval '2 days' + g * interval '1 ms', '\\x7b7d', 'x'
         FROM generate_series(1, $1) g",
    )
    .bind(ROWS / 2)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO inbox_events (id, source, environment, event_key, status, processed_at, payload, payload_sha256)
         SELECT gen_random_uuid(), 'begini', 'sandbox', 'new-' || g, 'succeeded',
                now() - interval '2 days' + g * interval '1 ms', '\\x7b7d', 'x'
         FROM generate_series(1, $1) g",
    )
    .bind(ROWS / 2)
    .execute(&db.pool)
    .await
    .unwrap();
    for table in ["inbox_event_state", "inbox_payloads"] {
        sqlx::query(&format!("ANALYZE {table}"))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    // Rows read and changed in the event rows and every payload partition.
    let reads = "SELECT sum(coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0))::bigint,
                        sum(n_tup_upd + n_tup_del)::bigint
                 FROM pg_stat_user_tables
                 WHERE relname = 'inbox_event_state' OR relname LIKE 'inbox_payloads%'";
    let stats = || async {
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&db.pool)
            .await
            .unwrap();
        sqlx::query_as::<_, (i64, i64)>(reads)
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    let (read_before, changed_before) = stats().await;

    let request = PruneRequest {
        payloads_older_than: Some(Duration::from_secs(86_400)),
        include_dead: false,
        deliveries_older_than: None,
        attempts_older_than: None,
        keys_older_than: None,
        dry_run: false,
        actor: "test".into(),
        reason: None,
        batch_size: 200,
    };
    let report = prune(&db.pool, &request, |_| {}).await.unwrap();
    assert_eq!(report.payloads, ROWS);

    let deadline = Instant::now() + Duration::from_secs(20);
    let (read_after, _) = loop {
        let (read, changed) = stats().await;
        // A few payloads may go with a dropped partition, uncounted here.
        if changed - changed_before >= ROWS * 9 / 10 || Instant::now() > deadline {
            break (read, changed);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Each payload is read by its batch's scan, its event by primary key,
    // and again by the statement that drops it: a few reads a row (3 to 4
    // alone, up to 4.06 with the rest of the suite running beside it), never
    // a read of every earlier row per batch (that would be 50 times ROWS).
    let read = read_after - read_before;
    assert!(read < 5 * ROWS, "pruning {ROWS} rows read {read} rows");
}

/// The connection to PostgreSQL breaks while a batch's COMMIT is still being
/// made (here: a deferred trigger takes two seconds). The receiver must not
/// answer 503 for a batch that commits after it asked: it finds out how that
/// transaction ended (ending it first if it is still running).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_during_commit_never_leaves_a_503_for_a_stored_event() {
    let db = database().await;
    sqlx::raw_sql(
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$;
         CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON inbox_event_state
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let options: sqlx::postgres::PgConnectOptions = db.url.parse().unwrap();
    let mut forwarder =
        Forwarder::start(&format!("{}:{}", options.get_host(), options.get_port())).await;
    let through_forwarder = TestDb {
        url: format!(
            "postgres://{}@127.0.0.1:{}/{}",
            options.get_username(),
            forwarder.port,
            options.get_database().unwrap()
        ),
        pool: db.pool.clone(),
    };
    assert_ne!(through_forwarder.url, db.url);
    let app = TestApp::spawn_on(
        through_forwarder,
        &keyed_by_uid(ONE_BATCH).replace("request_timeout = \"2s\"", "request_timeout = \"10s\""),
        &[("BEGINI_API_KEY", BEGINI_KEY)],
    )
    .await;
    let body = with_uid(&unique_uid());

    let send = app.post_signed("begini", &body);
    let cut = async {
        // The COMMIT is now waiting for the deferred trigger.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        forwarder.cut();
        tokio::time::sleep(Duration::from_millis(200)).await;
        forwarder.restore().await;
    };
    let (answer, ()) = tokio::join!(send, cut);
    // Whatever that transaction was going to do, it has done by now.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM inbox_events WHERE payload_sha256 = $1")
            .bind(hookbox::event_key::sha256_hex(&body))
            .fetch_one(&db.pool)
            .await
            .unwrap();
    match answer.status {
        200 => assert_eq!(stored, 1),
        503 => assert_eq!(
            stored, 0,
            "a 503 was answered for an event stored after all"
        ),
        other => panic!("unexpected status {other}"),
    }
}
