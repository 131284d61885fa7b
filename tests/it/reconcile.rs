//! Reconciliation with the provider: a local server answers the way Stripe's
//! `GET /v1/events` does, and hookbox imports exactly what the inbox lacks.

use std::{
    collections::{BTreeSet, HashMap},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use futures_util::StreamExt;
use hookbox::{
    reconcile::{self, ReconcileRequest},
    worker::{LibraryHandlers, Worker},
};
use serde_json::json;

use crate::support::*;

const STRIPE_API_KEY: &str = "sk_test_reconcile_4eC39HqLyjWDarjtT1zdp7dc";
const STRIPE_WEBHOOK_SECRET: &str = "whsec_reconcile_test_secret";
const STRIPE_ENV: [(&str, &str); 2] = [
    ("STRIPE_API_KEY", STRIPE_API_KEY),
    ("STRIPE_WEBHOOK_SECRET", STRIPE_WEBHOOK_SECRET),
];

/// A Stripe source whose reconcile asks `api_base`.
fn stripe_config(api_base: &str, every: &str) -> String {
    format!(
        r#"
[receiver]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
request_timeout = "5s"
max_body_bytes = 65536

[worker]
admin_listen = ""
poll_interval = "200ms"

[[source]]
name = "stripe"
environment = "sandbox"
scheme = "stripe"
secrets_env = ["STRIPE_WEBHOOK_SECRET"]
event_key = {{ json = ["/id"] }}

[source.reconcile]
kind = "stripe"
api_key_env = "STRIPE_API_KEY"
api_base = "{api_base}"
every = "{every}"
lookback = "1h"
"#
    )
}

/// An event as Stripe's API and its webhooks carry it.
fn stripe_event(n: usize, created: i64) -> serde_json::Value {
    json!({
        "id": format!("evt_1Reconcile{n:06}"),
        "object": "event",
        "api_version": "2024-06-20",
        "created": created,
        "data": { "object": { "id": format!("pi_{n:06}"), "object": "payment_intent", "amount": 1000 + n, "currency": "eur" } },
        "livemode": false,
        "pending_webhooks": 1,
        "request": { "id": null, "idempotency_key": null },
        "type": "payment_intent.succeeded"
    })
}

/// What a webhook endpoint receives: the event as compact JSON (the listing
/// serialises it differently, pretty-printed).
fn delivered_bytes(event: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(event).unwrap()
}

/// A local server answering like Stripe's list-events API: newest first,
/// `limit`, `created[gte]`, `starting_after`, `has_more`; a `429` with
/// `Retry-After` when asked to throttle once.
struct FakeStripe {
    /// Newest first, as Stripe lists them.
    events: Mutex<Vec<serde_json::Value>>,
    throttle_next_page: AtomicBool,
    throttled: AtomicUsize,
    /// The query of every request, in order.
    requests: Mutex<Vec<HashMap<String, String>>>,
    unauthorized: AtomicUsize,
    address: String,
}

impl FakeStripe {
    async fn start(events: Vec<serde_json::Value>) -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let fake = Arc::new(Self {
            events: Mutex::new(events),
            throttle_next_page: AtomicBool::new(false),
            throttled: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            unauthorized: AtomicUsize::new(0),
            address,
        });
        let data = web::Data::from(fake.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .route("/v1/events", web::get().to(list_events))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        tokio::spawn(server);
        fake
    }

    fn add_newest(&self, event: serde_json::Value) {
        self.events.lock().unwrap().insert(0, event);
    }

    fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

async fn list_events(request: HttpRequest, fake: web::Data<FakeStripe>) -> HttpResponse {
    let query: HashMap<String, String> =
        reqwest::Url::parse(&format!("http://x/?{}", request.query_string()))
            .unwrap()
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    fake.requests.lock().unwrap().push(query.clone());
    let authorized = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {STRIPE_API_KEY}"));
    if !authorized {
        fake.unauthorized.fetch_add(1, Ordering::SeqCst);
        return HttpResponse::Unauthorized()
            .json(json!({ "error": { "type": "invalid_request_error" } }));
    }
    if query.contains_key("starting_after") && fake.throttle_next_page.swap(false, Ordering::SeqCst)
    {
        fake.throttled.fetch_add(1, Ordering::SeqCst);
        return HttpResponse::TooManyRequests()
            .insert_header(("Retry-After", "1"))
            .json(json!({ "error": { "type": "rate_limit_error" } }));
    }
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(10)
        .min(100);
    let created_gte: i64 = query
        .get("created[gte]")
        .and_then(|c| c.parse().ok())
        .unwrap_or(i64::MIN);
    let events = fake.events.lock().unwrap();
    let eligible: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["created"].as_i64().unwrap() >= created_gte)
        .collect();
    let start = match query.get("starting_after") {
        Some(id) => eligible
            .iter()
            .position(|e| e["id"] == id.as_str())
            .map_or(eligible.len(), |p| p + 1),
        None => 0,
    };
    let page: Vec<&serde_json::Value> = eligible[start..].iter().take(limit).copied().collect();
    let has_more = start + page.len() < eligible.len();
    let body = json!({ "object": "list", "data": page, "has_more": has_more, "url": "/v1/events" });
    HttpResponse::Ok()
        .content_type("application/json")
        .body(serde_json::to_string_pretty(&body).unwrap())
}

/// The `hookbox` binary with the Stripe source's secrets in its environment.
async fn hookbox(config: &Path, url: &str, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hookbox"));
    command
        .arg("--config")
        .arg(config)
        .args(args)
        .env("DATABASE_URL", url)
        .envs(STRIPE_ENV)
        .env("USER", "auditor")
        .env("RUST_LOG", "warn");
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn succeeded(output: &Output) -> String {
    assert!(
        output.status.success(),
        "hookbox failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("hookbox.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn listed_through(app: &TestApp) -> Option<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar("SELECT listed_through FROM inbox_reconcile_cursors WHERE source = 'stripe'")
        .fetch_optional(&app.db.pool)
        .await
        .unwrap()
        .flatten()
}

async fn imported_keys(app: &TestApp) -> BTreeSet<String> {
    sqlx::query_scalar(
        "SELECT e.event_key FROM inbox_deliveries d JOIN inbox_events e ON e.id = d.event_id \
         WHERE d.outcome = 'imported'",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_imports_exactly_the_40_events_never_delivered_and_a_second_run_none() {
    let now = chrono::Utc::now().timestamp();
    let events: Vec<serde_json::Value> = (0..250)
        .map(|n| stripe_event(n, now - 3000 + n as i64 * 10))
        .rev()
        .collect();
    let never_delivered: BTreeSet<String> = events
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 6 == 1 && *i < 240)
        .map(|(_, e)| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(never_delivered.len(), 40);
    let fake = FakeStripe::start(events.clone()).await;
    let config_text = stripe_config(&fake.address, "10m");
    let app = TestApp::spawn(&config_text, &STRIPE_ENV).await;

    // The receiver took every delivery but 40.
    let delivered: Vec<Vec<u8>> = events
        .iter()
        .filter(|e| !never_delivered.contains(e["id"].as_str().unwrap()))
        .map(delivered_bytes)
        .collect();
    let answers: Vec<u16> = futures_util::stream::iter(&delivered)
        .map(|body| app.deliver_as_sender("stripe", body))
        .buffer_unordered(8)
        .map(|answer| answer.status)
        .collect()
        .await;
    assert!(answers.iter().all(|status| *status == 200));
    assert_eq!(app.count("SELECT count(*) FROM inbox_events").await, 210);

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, &config_text);
    let dry = succeeded(
        &hookbox(
            &config,
            &app.db.url,
            &["reconcile", "--source", "stripe", "--dry-run"],
        )
        .await,
    );
    assert!(dry.contains("listed 250 events"), "{dry}");
    assert!(
        dry.contains("210 already stored, would import 40, 0 invalid"),
        "{dry}"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_events").await,
        210,
        "a dry run changes nothing"
    );
    assert_eq!(
        listed_through(&app).await,
        None,
        "a dry run does not move the cursor"
    );

    fake.throttle_next_page.store(true, Ordering::SeqCst);
    let requests_before = fake.request_count();
    let output = hookbox(
        &config,
        &app.db.url,
        &[
            "reconcile",
            "--source",
            "stripe",
            "--reason",
            "receiver outage 02:00-03:00",
        ],
    )
    .await;
    let first = succeeded(&output);
    assert!(first.contains("listed 250 events"), "{first}");
    assert!(
        first.contains("(3 pages): 210 already stored, imported 40, 0 invalid"),
        "{first}"
    );
    assert_eq!(
        fake.throttled.load(Ordering::SeqCst),
        1,
        "the provider answered 429 once"
    );
    assert_eq!(
        fake.request_count() - requests_before,
        4,
        "3 pages, one of them asked for twice"
    );
    assert_eq!(
        fake.unauthorized.load(Ordering::SeqCst),
        0,
        "the API key was sent as Stripe expects"
    );
    for text in [
        &first,
        &String::from_utf8_lossy(&output.stderr).into_owned(),
    ] {
        assert!(
            !text.contains(STRIPE_API_KEY),
            "the API key is never printed"
        );
    }

    assert_eq!(app.count("SELECT count(*) FROM inbox_events").await, 250);
    assert_eq!(
        imported_keys(&app).await,
        never_delivered,
        "exactly the missing 40 were imported"
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM inbox_actions WHERE action = 'reconcile' AND affected = 40 \
             AND actor = 'auditor' AND reason = 'receiver outage 02:00-03:00' \
             AND filter @> '{\"source\": \"stripe\", \"listed\": 250, \"already_stored\": 210, \"imported\": 40}'"
        )
        .await,
        1
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM inbox_events WHERE event_type = 'payment_intent.succeeded' \
             AND status = 'pending' AND payload_json->>'id' = event_key"
        )
        .await,
        250,
        "imported events are stored as deliveries would be, ready for the worker"
    );
    let cursor_after_first = listed_through(&app).await.expect("the run set the cursor");

    // Five more events, delivered as usual; then a second run.
    for n in 250..255 {
        let event = stripe_event(n, chrono::Utc::now().timestamp());
        fake.add_newest(event.clone());
        assert_eq!(
            app.post_signed("stripe", &delivered_bytes(&event))
                .await
                .status,
            200
        );
    }
    let second =
        succeeded(&hookbox(&config, &app.db.url, &["reconcile", "--source", "stripe"]).await);
    assert!(second.contains("listed 255 events"), "{second}");
    assert!(
        second.contains("255 already stored, imported 0, 0 invalid"),
        "{second}"
    );
    assert_eq!(app.count("SELECT count(*) FROM inbox_events").await, 255);
    assert_eq!(
        imported_keys(&app).await.len(),
        40,
        "nothing more was imported"
    );
    let cursor_after_second = listed_through(&app).await.unwrap();
    assert!(
        cursor_after_second > cursor_after_first,
        "the cursor moved: {cursor_after_first} -> {cursor_after_second}"
    );
    let last_query = fake.requests.lock().unwrap().last().cloned().unwrap();
    let expected_from = (cursor_after_first - chrono::Duration::hours(1)).timestamp();
    assert_eq!(
        last_query.get("created[gte]").map(String::as_str),
        Some(expected_from.to_string().as_str()),
        "the second run listed from lookback before the cursor"
    );
}

const RECORD_HANDLED: &str = r#"
CREATE TABLE handled (event_key text NOT NULL, event_id uuid NOT NULL);
CREATE FUNCTION record_handled(key text, id uuid) RETURNS void LANGUAGE sql AS
    'INSERT INTO handled VALUES (key, id)';
"#;

/// Runs the worker until no event is open.
async fn drain(app: &TestApp, worker: &Worker) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        worker.process_next().await.unwrap();
        let open = app
            .count("SELECT count(*) FROM inbox_events WHERE status IN ('pending', 'retrying', 'processing')")
            .await;
        if open == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not drain the queue"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_signed_deliveries_and_reconciled_copies_dedupe_in_both_orders() {
    let now = chrono::Utc::now().timestamp();
    let events: Vec<serde_json::Value> = (0..20)
        .map(|n| stripe_event(n, now - 600 + n as i64))
        .rev()
        .collect();
    let (delivered_first, reconciled_first) = events.split_at(10);
    let fake = FakeStripe::start(events.clone()).await;
    let config_text = format!(
        "{}\n[[route]]\nsource = \"stripe\"\nhandler = \"record\"\n\
         [handler.record]\nkind = \"sql\"\nstatement = \"SELECT record_handled($5, $3)\"\n",
        stripe_config(&fake.address, "10m")
    );
    let app = TestApp::spawn(&config_text, &STRIPE_ENV).await;
    sqlx::raw_sql(RECORD_HANDLED)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let worker = {
        let pool = hookbox::db::pool(&app.db.url, &hookbox::db::PoolSettings::worker(&app.config))
            .unwrap();
        Worker::from_config(&app.config, pool, LibraryHandlers::default()).unwrap()
    };
    let source = app.config.source("stripe").unwrap();
    let request = ReconcileRequest {
        since: None,
        dry_run: false,
        actor: "test".into(),
        reason: None,
    };

    // Signed delivery first, reconciled copy later.
    let mut first_ids = HashMap::new();
    for event in delivered_first {
        let answer = app.post_signed("stripe", &delivered_bytes(event)).await;
        assert_eq!(
            (answer.status, answer.body["status"].as_str()),
            (200, Some("accepted"))
        );
        first_ids.insert(event["id"].as_str().unwrap().to_owned(), answer.event_id());
    }
    let report = reconcile::reconcile(&app.db.pool, source, &request)
        .await
        .unwrap();
    assert_eq!(
        (report.listed, report.already_stored, report.imported),
        (20, 10, 10)
    );
    drain(&app, &worker).await;

    // Reconciled copy first, signed delivery later: the same event, answered
    // `conflict` (the bytes differ from the listing's) and not processed again.
    for event in reconciled_first {
        let answer = app.post_signed("stripe", &delivered_bytes(event)).await;
        assert_eq!(
            (answer.status, answer.body["status"].as_str()),
            (200, Some("conflict"))
        );
        let stored: uuid::Uuid = sqlx::query_scalar(
            "SELECT id FROM inbox_events WHERE source = 'stripe' AND event_key = $1",
        )
        .bind(event["id"].as_str().unwrap())
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
        assert_eq!(
            answer.event_id(),
            stored,
            "the delivery names the reconciled event"
        );
    }
    // And a late retry of an event delivered before is a plain duplicate.
    for event in delivered_first {
        let answer = app.post_signed("stripe", &delivered_bytes(event)).await;
        assert_eq!(
            (answer.status, answer.body["status"].as_str()),
            (200, Some("duplicate"))
        );
        assert_eq!(answer.event_id(), first_ids[event["id"].as_str().unwrap()]);
    }
    let again = reconcile::reconcile(&app.db.pool, source, &request)
        .await
        .unwrap();
    assert_eq!(
        (again.listed, again.already_stored, again.imported),
        (20, 20, 0)
    );
    drain(&app, &worker).await;

    assert_eq!(app.count("SELECT count(*) FROM inbox_events").await, 20);
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_events WHERE status = 'succeeded'")
            .await,
        20
    );
    assert_eq!(
        app.count("SELECT count(*) FROM handled").await,
        20,
        "each event was handled once"
    );
    assert_eq!(
        app.count("SELECT count(DISTINCT event_key) FROM handled")
            .await,
        20
    );
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_deliveries WHERE outcome = 'conflict'")
            .await,
        10
    );
    assert_logs_never_contain(&[STRIPE_API_KEY, "pi_000003"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_api_key_ends_the_run_as_a_configuration_error_and_moves_nothing() {
    let now = chrono::Utc::now().timestamp();
    let fake = FakeStripe::start(vec![stripe_event(1, now - 60)]).await;
    let env = [
        ("STRIPE_API_KEY", "sk_test_revoked_key_0000"),
        ("STRIPE_WEBHOOK_SECRET", STRIPE_WEBHOOK_SECRET),
    ];
    let app = TestApp::spawn(&stripe_config(&fake.address, "10m"), &env).await;
    let request = ReconcileRequest {
        since: None,
        dry_run: false,
        actor: "test".into(),
        reason: None,
    };
    let error = reconcile::reconcile(&app.db.pool, app.config.source("stripe").unwrap(), &request)
        .await
        .unwrap_err();
    assert!(!error.is_retryable(), "{error}");
    assert!(error.to_string().contains("401"), "{error}");
    assert!(!error.to_string().contains("sk_test_revoked_key_0000"));
    assert_eq!(
        fake.unauthorized.load(Ordering::SeqCst),
        1,
        "a refusal is not retried"
    );
    assert_eq!(app.count("SELECT count(*) FROM inbox_events").await, 0);
    assert_eq!(listed_through(&app).await, None, "the cursor did not move");
    assert_eq!(
        app.count(
            "SELECT count(*) FROM inbox_actions WHERE action = 'reconcile' \
             AND filter->>'error' LIKE '%401%' AND affected = 0"
        )
        .await,
        1,
        "the failed run is on record"
    );
}

/// Worker processes killed when the test ends, however it ends.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_reconcile_with_three_workers_runs_exactly_once_per_period() {
    let now = chrono::Utc::now().timestamp();
    let events: Vec<serde_json::Value> = (0..3)
        .map(|n| stripe_event(n, now - 60 + n as i64))
        .rev()
        .collect();
    let fake = FakeStripe::start(events).await;
    let config_text = stripe_config(&fake.address, "1s");
    let app = TestApp::spawn(&config_text, &STRIPE_ENV).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, &config_text);

    let workers = Workers(
        (0..3)
            .map(|_| {
                Command::new(env!("CARGO_BIN_EXE_hookbox-worker"))
                    .arg("--config")
                    .arg(&config)
                    .env("DATABASE_URL", &app.db.url)
                    .envs(STRIPE_ENV)
                    .env("RUST_LOG", "warn")
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );
    let finished_runs =
        "SELECT count(*) FROM inbox_actions WHERE action = 'reconcile' AND filter ? 'listed'";
    let deadline = Instant::now() + Duration::from_secs(90);
    while app.count(finished_runs).await < 5 {
        assert!(
            Instant::now() < deadline,
            "five scheduled runs did not happen"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(workers);

    let runs = app
        .count("SELECT count(*) FROM inbox_actions WHERE action = 'reconcile'")
        .await;
    assert_eq!(
        app.count(
            "SELECT count(*) FROM (SELECT at - lag(at) OVER (ORDER BY at) AS gap \
             FROM inbox_actions WHERE action = 'reconcile') runs WHERE gap < interval '1 second'"
        )
        .await,
        0,
        "no two runs started within one period"
    );
    let listed = fake.request_count() as i64;
    assert!(
        listed <= runs && listed >= app.count(finished_runs).await,
        "each run asked the provider once: {listed} requests for {runs} runs"
    );
    assert_eq!(app.count("SELECT count(*) FROM inbox_events").await, 3);
    assert_eq!(
        app.count("SELECT count(*) FROM inbox_deliveries WHERE outcome = 'imported'")
            .await,
        3,
        "the events missing were imported once, by one run"
    );
    assert_eq!(
        app.count(
            "SELECT coalesce(sum((filter->>'imported')::int), 0) FROM inbox_actions WHERE action = 'reconcile'"
        )
        .await,
        3
    );
}

/// A generic cursor-paged list: `{"events": [...], "next_page": "..."}`,
/// the key in `X-Api-Key`, the cursor in `page`, the start in `created_after`.
async fn generic_list(
    request: HttpRequest,
    events: web::Data<Vec<serde_json::Value>>,
) -> HttpResponse {
    if request
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        != Some("shop-key-1")
    {
        return HttpResponse::Unauthorized().finish();
    }
    let query: HashMap<String, String> =
        reqwest::Url::parse(&format!("http://x/?{}", request.query_string()))
            .unwrap()
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    assert!(
        query.contains_key("created_after"),
        "the start is asked for"
    );
    let start: usize = query.get("page").map_or(0, |p| p.parse().unwrap());
    let page: Vec<&serde_json::Value> = events.iter().skip(start).take(7).collect();
    let next = (start + 7 < events.len()).then(|| (start + 7).to_string());
    HttpResponse::Ok().json(json!({ "events": page, "next_page": next }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_list_provider_is_paged_by_its_own_cursor_and_reconciled_the_same_way() {
    let events: Vec<serde_json::Value> = (0..30)
        .map(|n| json!({ "event_id": format!("shop-{n}"), "type": "order.paid", "order": { "total": n } }))
        .collect();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let data = web::Data::new(events.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/v2/events", web::get().to(generic_list))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .unwrap()
    .run();
    tokio::spawn(server);
    let config_text = format!(
        r#"
[receiver]
listen = "127.0.0.1:0"
admin_listen = ""

[[source]]
name = "shop"
environment = "sandbox"
scheme = "github"
secrets_env = ["SHOP_WEBHOOK_SECRET"]
event_key = {{ json = ["/event_id"] }}
event_type = {{ json = "/type" }}

[source.reconcile]
kind = "http-list"
url = "{address}/v2/events"
api_key_env = "SHOP_API_KEY"
auth_header = "X-Api-Key"
auth_scheme = ""
items = "/events"
item_id = "/event_id"
next_cursor = "/next_page"
cursor_param = "page"
since_param = "created_after"
"#
    );
    let env = [
        ("SHOP_WEBHOOK_SECRET", "shop-webhook-secret"),
        ("SHOP_API_KEY", "shop-key-1"),
    ];
    let app = TestApp::spawn(&config_text, &env).await;
    for event in events.iter().step_by(3) {
        assert_eq!(
            app.post_signed("shop", &serde_json::to_vec(event).unwrap())
                .await
                .status,
            200
        );
    }
    let request = ReconcileRequest {
        since: None,
        dry_run: false,
        actor: "test".into(),
        reason: None,
    };
    let source = app.config.source("shop").unwrap();
    let report = reconcile::reconcile(&app.db.pool, source, &request)
        .await
        .unwrap();
    assert_eq!(
        (
            report.pages,
            report.listed,
            report.already_stored,
            report.imported
        ),
        (5, 30, 10, 20)
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM inbox_events WHERE source = 'shop' AND event_type = 'order.paid'"
        )
        .await,
        30
    );
    let again = reconcile::reconcile(&app.db.pool, source, &request)
        .await
        .unwrap();
    assert_eq!((again.listed, again.imported), (30, 0));
}
