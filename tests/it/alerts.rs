//! Alerts: a local HTTP sink stands in for the team's webhook; the evaluator
//! runs in-process (round by round) or inside real `hookbox-worker` processes.

use std::{
    net::TcpListener,
    sync::{Arc, Mutex},
    time::Duration,
};

use actix_web::{web, App, HttpResponse, HttpServer};
use hookbox::alerts::Evaluator;

use crate::support::{begini_payload, free_port, unique_uid, TestApp, BEGINI_CONFIG, BEGINI_KEY};

/// Records every JSON body POSTed to it and answers 200.
struct Sink {
    received: Arc<Mutex<Vec<serde_json::Value>>>,
    handle: actix_web::dev::ServerHandle,
}

impl Sink {
    fn start(port: u16) -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let shared = received.clone();
        let server = HttpServer::new(move || {
            let shared = shared.clone();
            App::new().default_service(web::to(move |body: web::Json<serde_json::Value>| {
                let shared = shared.clone();
                async move {
                    shared.lock().unwrap().push(body.into_inner());
                    HttpResponse::Ok().finish()
                }
            }))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self { received, handle }
    }

    fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

fn alert_config(sink_port: u16, evaluate_every: &str) -> String {
    format!(
        r#"{BEGINI_CONFIG}
[worker]
poll_interval = "100ms"
admin_listen = ""

[alerting]
evaluate_every = "{evaluate_every}"

[[alert]]
name = "dead-events"
when = "dead"
source = "begini"
notify = {{ url_env = "ALERT_URL", format = "json" }}
every = "1h"
"#
    )
    .replace("ALERT_URL", &format!("ALERT_URL_{sink_port}"))
}

fn env_for(sink_port: u16) -> (String, String) {
    (
        format!("ALERT_URL_{sink_port}"),
        format!("http://127.0.0.1:{sink_port}/hooks/alerts"),
    )
}

/// An event that gave up: delivered, then marked dead as the worker would.
async fn a_dead_event(app: &TestApp) -> uuid::Uuid {
    let answer = app
        .post_signed(
            "begini",
            &begini_payload(&unique_uid(), "application.complete"),
        )
        .await;
    assert_eq!(answer.status, 200);
    let id = answer.event_id();
    sqlx::query("UPDATE inbox_events SET status = 'dead', last_error = 'handler kept failing' WHERE id = $1")
        .bind(id)
        .execute(&app.db.pool)
        .await
        .unwrap();
    id
}

async fn spawn_app(sink_port: u16, evaluate_every: &str) -> TestApp {
    let (var, url) = env_for(sink_port);
    TestApp::spawn(
        &alert_config(sink_port, evaluate_every),
        &[("BEGINI_API_KEY", BEGINI_KEY), (&var, &url)],
    )
    .await
}

fn evaluator(app: &TestApp) -> Evaluator {
    Evaluator::new(
        app.db.pool.clone(),
        app.config.alerts.clone(),
        app.config.alert_evaluation_interval,
    )
}

/// Lets the next round claim the alert at once, as if an interval had passed.
async fn next_interval(app: &TestApp) {
    sqlx::query("UPDATE hookbox_alert_state SET next_evaluation_at = now()")
        .execute(&app.db.pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_dead_event_is_notified_once_per_every() {
    let port = free_port();
    let sink = Sink::start(port);
    let app = spawn_app(port, "1s").await;
    let evaluator = evaluator(&app);

    assert_eq!(evaluator.round().await.unwrap(), 1);
    assert_eq!(sink.count(), 0, "nothing is dead yet: no notification");

    a_dead_event(&app).await;
    next_interval(&app).await;
    evaluator.round().await.unwrap();
    assert_eq!(
        sink.count(),
        1,
        "notified in the first round that sees the dead event"
    );
    let body = sink.received.lock().unwrap()[0].clone();
    assert_eq!(body["alert"], "dead-events");
    assert_eq!(body["condition"], "dead");
    assert_eq!(body["source"], "begini");
    assert_eq!(body["counts"]["dead"], 1);
    assert!(
        !body.to_string().contains("integration_id"),
        "no payload in a notification"
    );

    // Before the interval passes, a round evaluates nothing.
    assert_eq!(evaluator.round().await.unwrap(), 0);
    for _ in 0..3 {
        next_interval(&app).await;
        assert_eq!(evaluator.round().await.unwrap(), 1);
    }
    assert_eq!(sink.count(), 1, "no second notification within `every`");
    assert_eq!(
        app.count("SELECT count(*) FROM hookbox_alert_notifications WHERE outcome = 'sent'")
            .await,
        1
    );
    sink.handle.stop(false).await;
}

#[tokio::test]
async fn with_three_workers_exactly_one_notification_is_sent() {
    let port = free_port();
    let sink = Sink::start(port);
    let app = spawn_app(port, "200ms").await;
    a_dead_event(&app).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hookbox.toml");
    std::fs::write(&path, alert_config(port, "200ms")).unwrap();
    let (var, url) = env_for(port);
    let mut workers: Vec<_> = (0..3)
        .map(|_| {
            crate::support::spawn_service_with_env(
                "hookbox-worker",
                &path,
                &app.db.url,
                &[(&var, &url)],
            )
        })
        .collect();
    for _ in 0..300 {
        if sink.count() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sink.count(), 1, "one notification arrived");
    // Many more rounds (15 intervals), by all three workers: still one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for worker in &mut workers {
        worker.kill().unwrap();
        worker.wait().unwrap();
    }
    assert_eq!(sink.count(), 1, "no worker sent a second one");
    assert_eq!(
        app.count("SELECT count(*) FROM hookbox_alert_notifications")
            .await,
        1
    );
    sink.handle.stop(false).await;
}

#[tokio::test]
async fn a_notification_to_a_sink_that_is_down_is_recorded_failed_and_retried() {
    hookbox::telemetry::metrics_handle();
    let port = free_port();
    let app = spawn_app(port, "1s").await;
    a_dead_event(&app).await;
    let evaluator = evaluator(&app);

    evaluator.round().await.unwrap();
    let (outcome, error): (String, Option<String>) =
        sqlx::query_as("SELECT outcome, error FROM hookbox_alert_notifications")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(outcome, "failed");
    assert_eq!(error.as_deref(), Some("endpoint unreachable"));
    let metrics = hookbox::telemetry::metrics_handle().render();
    assert!(
        metrics
            .contains(r#"hookbox_alert_notifications_total{alert="dead-events",outcome="failed"}"#),
        "{metrics}"
    );

    let sink = Sink::start(port);
    next_interval(&app).await;
    evaluator.round().await.unwrap();
    assert_eq!(sink.count(), 1, "retried once the sink is back");
    let outcomes: Vec<String> =
        sqlx::query_scalar("SELECT outcome FROM hookbox_alert_notifications ORDER BY id")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(outcomes, ["failed", "sent"]);
    sink.handle.stop(false).await;
}

#[test]
fn alert_sections_are_checked_at_load() {
    let env = [
        ("BEGINI_API_KEY", BEGINI_KEY),
        ("HOOK", "https://hooks.example.test/x"),
    ];
    let parse = |extra: &str| {
        let env: std::collections::BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        hookbox::config::Config::parse(
            &format!("{BEGINI_CONFIG}\n{extra}"),
            std::path::Path::new("test.toml"),
            &env,
        )
    };
    let good = r#"
[[alert]]
name = "slow"
when = "oldest_due_age > 10m"
notify = { url_env = "HOOK", format = "slack" }
"#;
    let checked = parse(good).unwrap();
    assert_eq!(checked.alerts[0].every, Duration::from_secs(900));
    for (bad, key) in [
        (
            good.replace("oldest_due_age > 10m", "oldest_due_age > soon"),
            "alert[0].when",
        ),
        (
            good.replace("HOOK", "MISSING_HOOK"),
            "alert[0].notify.url_env",
        ),
        (format!("{good}source = \"nowhere\"\n"), "alert[0].source"),
    ] {
        let error = parse(&bad).unwrap_err();
        assert_eq!(error.key, key, "{error}");
        assert!(
            !error.to_string().contains("hooks.example.test"),
            "the URL is never echoed"
        );
    }
}

#[tokio::test]
async fn events_that_reconciliation_found_missing_fire_the_reconciled_missing_alert() {
    let text = format!(
        "{BEGINI_CONFIG}\n[[alert]]\nname = \"lost-deliveries\"\nwhen = \"reconciled_missing > 0\"\n\
         source = \"begini\"\nnotify = {{ url_env = \"HOOK\", format = \"json\" }}\nevery = \"1h\"\n"
    );
    let app = TestApp::spawn(
        &text,
        &[
            ("BEGINI_API_KEY", BEGINI_KEY),
            ("HOOK", "https://hooks.example.test/x"),
        ],
    )
    .await;
    let alert = &app.config.alerts[0];
    let quiet = hookbox::alerts::evaluate(&app.db.pool, alert)
        .await
        .unwrap();
    assert!(!quiet.firing);

    // A reconcile run that imported 3 events the inbox lacked.
    sqlx::query(
        "INSERT INTO inbox_actions (actor, action, filter, affected) \
         VALUES ('worker-1', 'reconcile', '{\"source\": \"begini\"}', 3)",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
    let firing = hookbox::alerts::evaluate(&app.db.pool, alert)
        .await
        .unwrap();
    assert!(firing.firing);
    assert_eq!(firing.counts["reconciled_missing"], 3);
}
