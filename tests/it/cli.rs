//! The `hookbox` command as users run it.

use std::process::Command;

use crate::support::*;

fn hookbox() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hookbox"));
    command.env_remove("HOOKBOX_CONFIG").env("NO_COLOR", "1");
    command
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
        .env("BEGINI_API_KEY", "k")
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

    let bad = run("not-the-key").await.unwrap();
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
    ] {
        let output = hookbox().args(args).output().unwrap();
        assert!(output.status.success(), "{args:?}");
    }
}
