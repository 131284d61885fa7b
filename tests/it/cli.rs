//! The `hookbox` command as users run it.

use std::process::Command;

use crate::support::*;

fn hookbox() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hookbox"));
    command.env_remove("HOOKBOX_CONFIG").env("NO_COLOR", "1");
    command
}

/// `hookbox config check` on `text`, written to a file of its own, with `env`.
fn config_check(text: &str, env: &[(&str, &str)]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hookbox.toml");
    std::fs::write(&path, text).unwrap();
    hookbox()
        .args(["config", "check", "--config"])
        .arg(&path)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn assert_success(output: &std::process::Output) {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn config_check_names_the_file_and_the_key_of_a_mistake() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hookbox.toml");
    std::fs::write(&path, "[receiver]\nmax_body_bytes = \"lots\"\n").unwrap();
    let output = hookbox()
        .arg("--config")
        .arg(&path)
        .args(["config", "check"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains(&path.display().to_string()) && stderr.contains("receiver.max_body_bytes"),
        "{stderr}"
    );
}

#[test]
fn config_check_accepts_a_good_file_with_config_after_the_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("custom.toml");
    std::fs::write(&path, BEGINI_CONFIG).unwrap();
    let output = hookbox()
        .args(["config", "check", "--config"])
        .arg(&path)
        .env("BEGINI_API_KEY", BEGINI_KEY)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("ok"));
}

#[tokio::test]
async fn send_signs_like_the_sender_and_prints_the_answer() {
    let app = TestApp::begini().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hookbox.toml");
    std::fs::write(&path, BEGINI_CONFIG).unwrap();
    let url = format!("{}/webhooks/begini", app.address);

    let run = |key: &'static str| {
        let (path, url) = (path.clone(), url.clone());
        tokio::task::spawn_blocking(move || {
            hookbox()
                .args(["send", "--source", "begini", "--url", &url, "--config"])
                .arg(&path)
                .env("BEGINI_API_KEY", key)
                .output()
                .unwrap()
        })
    };
    let good = run(BEGINI_KEY).await.unwrap();
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let stdout = String::from_utf8(good.stdout).unwrap();
    assert!(
        stdout.starts_with("200 ") && stdout.contains("\"accepted\""),
        "{stdout}"
    );

    let bad = run("not-the-right-key-at-all").await.unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8(bad.stdout).unwrap().starts_with("403 "));
    assert_eq!(
        app.count(
            "SELECT count(*) FROM inbox_events WHERE event_type = 'psychometric_score.complete'"
        )
        .await,
        1
    );
}

#[test]
fn every_command_has_help() {
    for args in [
        &["--help"][..],
        &["send", "--help"],
        &["dev", "--help"],
        &["config", "check", "--help"],
        &["migrate", "--help"],
        &["reconcile", "--help"],
    ] {
        let output = hookbox().args(args).output().unwrap();
        assert!(output.status.success(), "{args:?}");
    }
}

#[test]
fn the_shipped_example_configuration_is_valid() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/hookbox.toml"))
        .unwrap();
    assert_success(&config_check(&text, &[("BEGINI_API_KEY", BEGINI_KEY)]));
}

/// What a newcomer does: `hookbox dev`, then the printed `hookbox send` line,
/// then Ctrl-C. No DATABASE_URL: dev makes its own cluster.
#[test]
fn dev_runs_a_whole_inbox_that_accepts_send_and_stops_cleanly_on_ctrl_c() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::Builder::new()
        .prefix("hookbox-dev-")
        .tempdir()
        .unwrap();
    let mut dev = hookbox()
        .args(["dev", "--port", "0", "--console-port", "0", "--data-dir"])
        .arg(dir.path())
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(dev.stdout.take().unwrap()).lines();
    let mut send_line = None;
    let mut console_line = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.trim_start().starts_with("console:") {
            console_line = Some(line.clone());
        }
        if line.trim_start().starts_with("cargo run -- --config") && line.contains(" send ") {
            send_line = Some(line.clone());
        }
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    let send_line = send_line.expect("dev prints how to send a test event");
    let console_line = console_line.expect("dev prints the console's URL");
    assert!(
        console_line.contains("http://127.0.0.1:") && console_line.contains("token: "),
        "{console_line}"
    );
    let args: Vec<&str> = send_line.split_whitespace().skip(3).collect();

    let sent = hookbox().args(&args).output().unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert!(String::from_utf8_lossy(&sent.stdout).starts_with("200 "));

    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(dev.id() as i32, libc::SIGINT) };
    let status = dev.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let pid_file = dir.path().join("postgres/postmaster.pid");
    assert!(!pid_file.exists(), "the private cluster was stopped");
}

#[test]
fn the_configuration_reference_example_is_accepted_and_names_every_documented_key() {
    let (doc, example) = first_toml_block("docs/configuration.md");
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("partner");
    std::fs::write(&secret, "partner-secret-of-24-bytes\n").unwrap();
    let audit_secret = dir.path().join("audit-whsec");
    std::fs::write(&audit_secret, "whsec_YXVkaXQ=").unwrap();
    let example_here = example
        .replace("/run/secrets/partner", secret.to_str().unwrap())
        .replace("/run/secrets/audit-whsec", audit_secret.to_str().unwrap());
    let env = [
        ("BEGINI_API_KEY", "the-current-begini-api-key"),
        ("BEGINI_API_KEY_PREVIOUS", "the-previous-begini-api-key"),
        ("DOWNSTREAM_WHSEC", "whsec_ZG93bnN0cmVhbQ=="),
        ("STRIPE_WEBHOOK_SECRET", "whsec_stripe-webhook-secret-0001"),
        ("STRIPE_API_KEY", "rk_test_reconcile"),
        (
            "SHOP_WEBHOOK_SECRET",
            "whsec_c2hvcC13ZWJob29rLXNlY3JldC0wMDAx",
        ),
        ("SHOP_API_KEY", "shop-api-key"),
        ("HOOKBOX_OPS_TOKEN", "ops-token-for-the-example-0001"),
        ("HOOKBOX_AUDIT_TOKEN", "audit-token-for-the-example-02"),
        ("ALERT_WEBHOOK_URL", "https://alerts.example.test/hookbox"),
    ];
    assert_success(&config_check(&example_here, &env));
    let documented: Vec<&str> = doc
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .collect();
    assert!(documented.len() > 40, "{documented:?}");
    for key in documented {
        assert!(
            example.contains(&format!("{key} =")),
            "the example sets {key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_sends_signed_events_with_duplicates_and_reports_what_it_saw() {
    let config = BEGINI_CONFIG.replace("max_body_bytes = 4096", "max_body_bytes = 65536");
    let app = TestApp::spawn(&config, &[("BEGINI_API_KEY", BEGINI_KEY)]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hookbox.toml");
    std::fs::write(&path, &config).unwrap();
    let url = format!("{}/webhooks/begini", app.address);
    let output = tokio::task::spawn_blocking(move || {
        hookbox()
            .args([
                "loadtest",
                "--source",
                "begini",
                "--url",
                &url,
                "--connections",
                "4",
                "--duration",
                "2s",
            ])
            .args(["--rate", "200", "--duplicates", "0.3", "--json", "--config"])
            .arg(&path)
            .env("BEGINI_API_KEY", BEGINI_KEY)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let requests = report["requests"].as_i64().unwrap();
    assert!(requests > 50, "{report}");
    assert_eq!(
        report["statuses"]["200"].as_i64(),
        Some(requests),
        "every signed event accepted: {report}"
    );
    assert!(
        report["latency_ms"]["p99"].as_f64().unwrap()
            <= report["latency_ms"]["max"].as_f64().unwrap()
    );
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_deliveries").await,
        requests
    );
    let duplicates = app
        .count("SELECT count(*) FROM inbox_deliveries WHERE outcome = 'duplicate'")
        .await;
    assert!(
        duplicates > 0 && duplicates < requests / 2,
        "about 30% duplicates: {duplicates} of {requests}"
    );
    let size: i64 = app
        .count("SELECT max(octet_length(payload))::int8 FROM inbox_events")
        .await;
    assert!(
        (700..1500).contains(&size),
        "realistic events of about 1 KB: {size}"
    );
}

#[test]
fn the_readme_configuration_overview_is_accepted() {
    let (_, overview) = first_toml_block("README.md");
    assert_success(&config_check(&overview, &[("BEGINI_API_KEY", BEGINI_KEY)]));
}

/// A document of the repository and its first TOML code block.
fn first_toml_block(path: &str) -> (String, String) {
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap();
    let block = text
        .split("```toml\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap()
        .to_owned();
    (text, block)
}

#[tokio::test]
async fn migrate_succeeds_against_a_server_that_requires_tls() {
    use hookbox::pgcluster::{Cluster, ClusterOptions, StopMode};
    let data = std::env::temp_dir().join(format!("hookbox-tls-{}", uuid::Uuid::now_v7().simple()));
    let options = ClusterOptions {
        durable: false,
        remove_on_exit: true,
        port: None,
    };
    let cluster = tokio::task::spawn_blocking({
        let data = data.clone();
        move || {
            let cluster = Cluster::start(&data, &options).unwrap();
            cluster.stop(StopMode::Fast).unwrap();
            require_tls(&data);
            cluster.restart(false).unwrap();
            cluster
        }
    })
    .await
    .unwrap();
    let migrate = |sslmode: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hookbox.toml");
        std::fs::write(&path, "").unwrap();
        hookbox()
            .args(["migrate", "--config"])
            .arg(&path)
            .env(
                "DATABASE_URL",
                format!("{}?sslmode={sslmode}", cluster.url("postgres")),
            )
            .output()
            .unwrap()
    };

    let plain = migrate("disable");
    assert!(
        !plain.status.success(),
        "the server refuses plain connections"
    );
    let encrypted = migrate("require");
    assert_success(&encrypted);
    assert!(String::from_utf8_lossy(&encrypted.stdout).starts_with("applied: V1__inbox"));
    let again = migrate("require");
    assert_success(&again);
    assert_eq!(
        String::from_utf8_lossy(&again.stdout),
        "schema is up to date\n"
    );
}

/// Turns on TLS with a fresh self-signed certificate and refuses every
/// connection that does not use it.
fn require_tls(data: &std::path::Path) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(data.join("server.crt"), certified.cert.pem()).unwrap();
    std::fs::write(
        data.join("server.key"),
        certified.signing_key.serialize_pem(),
    )
    .unwrap();
    std::fs::set_permissions(
        data.join("server.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .unwrap();
    std::io::Write::write_all(&mut conf, b"\nssl = on\n").unwrap();
    std::fs::write(
        data.join("pg_hba.conf"),
        "hostssl all all 127.0.0.1/32 trust\nhostnossl all all 0.0.0.0/0 reject\n",
    )
    .unwrap();
    // As root the cluster runs as `postgres`, which must own its key.
    if unsafe { libc::geteuid() } == 0 {
        let owned = Command::new("chown")
            .args(["postgres:", "server.crt", "server.key", "pg_hba.conf"])
            .current_dir(data)
            .status()
            .unwrap();
        assert!(owned.success());
    }
}
