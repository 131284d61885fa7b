//! The web console: what an operator sees and may do, who is refused, and
//! that attacker-controlled payloads stay text. Browser tests drive Debian's
//! headless Chromium through chromedriver; without it they are skipped
//! loudly, and under CI=true they fail.

use std::{path::PathBuf, process::Child, time::Duration};

use fantoccini::{Client, ClientBuilder, Locator};
use hookbox::{
    console::{self, Console},
    worker::Worker,
};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::support::{begini_payload, unique_uid, TestApp, BEGINI_CONFIG, BEGINI_KEY};

const OPS_TOKEN: &str = "ops-token-7c1d3e5f9a2b4c6d8e0f";
const AUDIT_TOKEN: &str = "audit-token-0a9b8c7d6e5f4a3b2c1d";

/// A receiver, a worker (no routes: events end `skipped`) and the console.
struct ConsoleTest {
    app: TestApp,
    url: String,
    http: reqwest::Client,
    _stop: DropGuard,
}

impl ConsoleTest {
    async fn start() -> Self {
        let text = format!(
            r#"{BEGINI_CONFIG}
[worker]
poll_interval = "100ms"
admin_listen = ""

[console]
listen = "127.0.0.1:0"
tokens = [
  {{ name = "ops", token_env = "OPS_TOKEN", role = "operator" }},
  {{ name = "audit", token_env = "AUDIT_TOKEN", role = "viewer" }},
]
"#
        );
        let app = TestApp::spawn(
            &text,
            &[
                ("BEGINI_API_KEY", BEGINI_KEY),
                ("OPS_TOKEN", OPS_TOKEN),
                ("AUDIT_TOKEN", AUDIT_TOKEN),
            ],
        )
        .await;
        let stop = CancellationToken::new();
        let pool = hookbox::db::pool(&app.db.url, &hookbox::db::PoolSettings::worker(&app.config))
            .unwrap();
        let worker = Worker::from_config(&app.config, pool, Default::default()).unwrap();
        tokio::spawn(worker.run(stop.clone()));
        let console = Console::build(&app.config, console::pool(&app.db.url).unwrap()).unwrap();
        let url = format!("http://127.0.0.1:{}", console.port());
        let handle = console.handle();
        tokio::spawn(console.run_until_stopped());
        tokio::spawn({
            let stop = stop.clone();
            async move {
                stop.cancelled().await;
                handle.stop(false).await;
            }
        });
        Self {
            app,
            url,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            _stop: stop.drop_guard(),
        }
    }

    /// Delivers a signed event and waits until the worker has finished it.
    async fn delivered(&self, body: &[u8]) -> uuid::Uuid {
        let answer = self.app.post_signed("begini", body).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        let id = answer.event_id();
        self.wait_for(&format!(
            "SELECT count(*) FROM inbox_events WHERE id = '{id}' AND status = 'skipped'"
        ))
        .await;
        id
    }

    async fn wait_for(&self, count_sql: &str) {
        for _ in 0..300 {
            if self.app.count(count_sql).await > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("never true: {count_sql}");
    }

    /// Logs in through the form; returns the session cookie's `name=value`.
    async fn login(&self, token: &str) -> String {
        let response = self
            .http
            .post(format!("{}/login", self.url))
            .form(&[("token", token)])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 303);
        let set_cookie = response.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
        assert!(set_cookie.contains("SameSite=Strict"), "{set_cookie}");
        set_cookie.split(';').next().unwrap().to_owned()
    }

    async fn page(&self, path: &str, cookie: &str) -> (u16, String) {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    async fn actions(&self) -> i64 {
        self.app.count("SELECT count(*) FROM inbox_actions").await
    }
}

/// JSON bodies, as scripts send them (reqwest's `json` feature is not built).
trait JsonBody {
    fn json_body(self, value: &serde_json::Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, value: &serde_json::Value) -> Self {
        self.header("content-type", "application/json")
            .body(value.to_string())
    }
}

/// The value of the first hidden `csrf` field in a page.
fn csrf_in(page: &str) -> String {
    let at =
        page.find(r#"name="csrf" value=""#).expect("a csrf field") + r#"name="csrf" value=""#.len();
    page[at..].split('"').next().unwrap().to_owned()
}

#[tokio::test]
async fn without_a_valid_token_only_the_login_page_is_served() {
    let test = ConsoleTest::start().await;
    let id = test
        .delivered(&begini_payload(&unique_uid(), "application.complete"))
        .await;
    for path in [
        "/",
        "/events",
        &format!("/events/{id}"),
        "/actions",
        "/replay",
        "/nowhere",
    ] {
        let response = test
            .http
            .get(format!("{}{path}", test.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 303, "{path} without a token");
        assert_eq!(response.headers()["location"], "/login");
        let response = test
            .http
            .get(format!("{}{path}", test.url))
            .bearer_auth("not-a-token-at-all-123456")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{path} with a wrong token");
        let response = test
            .http
            .get(format!("{}{path}", test.url))
            .header("cookie", "hookbox_session=1999999999.6f7073.00ff")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 303, "{path} with a forged cookie");
    }
    let login = test
        .http
        .get(format!("{}/login", test.url))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let csp = login.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"));
    let wrong = test
        .http
        .post(format!("{}/login", test.url))
        .form(&[("token", "wrong-token-wrong-token")])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());
}

#[tokio::test]
async fn refused_changes_write_nothing() {
    let test = ConsoleTest::start().await;
    let id = test
        .delivered(&begini_payload(&unique_uid(), "application.complete"))
        .await;
    let replay = format!("{}/events/{id}/replay", test.url);

    // An operator's browser session without the form's CSRF token.
    let ops = test.login(OPS_TOKEN).await;
    let response = test
        .http
        .post(&replay)
        .header("cookie", &ops)
        .form(&[("reason", "no csrf")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let response = test
        .http
        .post(&replay)
        .header("cookie", &ops)
        .form(&[("reason", "wrong csrf"), ("csrf", "00ff00ff")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);

    // A viewer, by browser (with a valid CSRF token) and by script.
    let audit = test.login(AUDIT_TOKEN).await;
    let (_, page) = test.page(&format!("/events/{id}"), &audit).await;
    assert!(
        !page.contains(r#"id="replay""#),
        "a viewer sees no replay form"
    );
    let response = test
        .http
        .post(&replay)
        .header("cookie", &audit)
        .form(&[("reason", "viewer"), ("csrf", &csrf_in(&page))])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let response = test
        .http
        .post(&replay)
        .bearer_auth(AUDIT_TOKEN)
        .json_body(&serde_json::json!({ "reason": "viewer script" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);

    // No token, and a wrong one.
    let response = test
        .http
        .post(&replay)
        .form(&[("reason", "anonymous")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    let response = test
        .http
        .post(&replay)
        .bearer_auth("wrong-token-wrong-token")
        .json_body(&serde_json::json!({ "reason": "wrong" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    // Bulk replay too.
    let response = test
        .http
        .post(format!("{}/replay", test.url))
        .bearer_auth(AUDIT_TOKEN)
        .json_body(&serde_json::json!({ "reason": "viewer bulk", "status": "skipped" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);

    assert_eq!(test.actions().await, 0, "nothing was recorded");
    assert_eq!(
        test.app
            .count(&format!(
                "SELECT attempts::int8 FROM inbox_events WHERE id = '{id}' AND status = 'skipped'"
            ))
            .await,
        1,
        "the event is untouched"
    );

    // A reason is required even of an operator.
    let response = test
        .http
        .post(&replay)
        .bearer_auth(OPS_TOKEN)
        .json_body(&serde_json::json!({ "reason": " " }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(test.actions().await, 0);

    // The operator's script succeeds, recorded under the token's name.
    let response = test
        .http
        .post(&replay)
        .bearer_auth(OPS_TOKEN)
        .json_body(&serde_json::json!({ "reason": "handler fixed" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let report: serde_json::Value =
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(report["replayed"], 1);
    let (actor, reason): (String, Option<String>) =
        sqlx::query_as("SELECT actor, reason FROM inbox_actions")
            .fetch_one(&test.app.db.pool)
            .await
            .unwrap();
    assert_eq!(
        (actor.as_str(), reason.as_deref()),
        ("ops", Some("handler fixed"))
    );
}

#[tokio::test]
async fn bulk_replay_shows_the_dry_run_count_first() {
    let test = ConsoleTest::start().await;
    for _ in 0..3 {
        test.delivered(&begini_payload(&unique_uid(), "application.expired"))
            .await;
    }
    let ops = test.login(OPS_TOKEN).await;
    let (status, page) = test
        .page("/replay?status=skipped&type=application.*", &ops)
        .await;
    assert_eq!(status, 200);
    assert!(
        page.contains("Would replay <strong>3</strong> events"),
        "{page}"
    );
    assert_eq!(test.actions().await, 0, "a dry run changes nothing");

    let dry = test
        .http
        .post(format!("{}/replay", test.url))
        .bearer_auth(OPS_TOKEN)
        .json_body(&serde_json::json!({ "status": "skipped", "reason": "check", "dry_run": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(dry.status(), 200);
    let dry: serde_json::Value = serde_json::from_slice(&dry.bytes().await.unwrap()).unwrap();
    assert_eq!(dry["would_replay"], 3);
    assert_eq!(test.actions().await, 0);

    let done = test
        .http
        .post(format!("{}/replay", test.url))
        .header("cookie", &ops)
        .form(&[
            ("status", "skipped"),
            ("type", "application.*"),
            ("reason", "route added"),
            ("csrf", &csrf_in(&page)),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 200);
    let body = done.text().await.unwrap();
    assert!(
        body.contains("Replayed <strong>3</strong> events"),
        "{body}"
    );
    let (status, actions) = test.page("/actions", &ops).await;
    assert_eq!(status, 200);
    assert!(
        actions.contains("route added") && actions.contains("<td>ops</td>"),
        "{actions}"
    );
}

#[tokio::test]
async fn the_events_page_filters_searches_payloads_and_pages() {
    let test = ConsoleTest::start().await;
    let wanted = unique_uid();
    let mut last = None;
    for i in 0..55 {
        let uid = if i == 7 { wanted.clone() } else { unique_uid() };
        let answer = test
            .app
            .post_signed("begini", &begini_payload(&uid, "application.complete"))
            .await;
        assert_eq!(answer.status, 200);
        last = Some(answer.event_id());
    }
    test.wait_for("SELECT count(*) FILTER (WHERE status = 'skipped') / 55 FROM inbox_events")
        .await;
    let ops = test.login(OPS_TOKEN).await;

    let (_, first) = test.page("/events?status=skipped", &ops).await;
    assert_eq!(first.matches("<tr><td><a href=\"/events/").count(), 50);
    assert!(first.contains(&last.unwrap().to_string()), "newest first");
    let older = first
        .split(r#"id="older" href=""#)
        .nth(1)
        .expect("an older page")
        .split('"')
        .next()
        .unwrap();
    let (_, second) = test.page(&older.replace("&amp;", "&"), &ops).await;
    assert_eq!(second.matches("<tr><td><a href=\"/events/").count(), 5);

    for search in [
        format!("uid = {wanted}"),
        format!(r#"{{"uid":"{wanted}"}}"#),
    ] {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("q", &search)
            .finish();
        let (status, found) = test.page(&format!("/events?{query}"), &ops).await;
        assert_eq!(status, 200);
        assert_eq!(
            found.matches("<tr><td><a href=\"/events/").count(),
            1,
            "{search}"
        );
    }
    let (status, _) = test.page("/events?status=lost", &ops).await;
    assert_eq!(status, 400);
    let (status, _) = test.page("/events?q=%7Bbroken", &ops).await;
    assert_eq!(status, 400);
}

/// A payload a hostile sender could post: every field an attempt at markup.
fn hostile_payload(uid: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "uid": uid,
        "integration_id": "<script>window.hookboxXss = 1; document.title = 'pwned'</script>",
        "event": {
            "type": "application.complete\"><img src=x onerror=\"window.hookboxXss = 2\">",
            "details": { "link": "javascript:window.hookboxXss = 3", "html": "</pre><a href=\"javascript:window.hookboxXss=4\">click</a>" },
            "reasons": ["\"><svg onload=window.hookboxXss=5>"]
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn payloads_render_as_escaped_text() {
    let test = ConsoleTest::start().await;
    let id = test.delivered(&hostile_payload(&unique_uid())).await;
    let ops = test.login(OPS_TOKEN).await;
    for path in [format!("/events/{id}"), "/events".to_owned()] {
        let (status, page) = test.page(&path, &ops).await;
        assert_eq!(status, 200);
        for injected in [
            "<script>window",
            "<img src=x",
            "<svg onload",
            "<a href=\"javascript:",
        ] {
            assert!(
                !page.contains(injected),
                "{path} contains markup {injected}"
            );
        }
    }
    let (_, page) = test.page(&format!("/events/{id}"), &ops).await;
    assert!(
        page.contains("&lt;script&gt;window.hookboxXss = 1"),
        "the payload is shown as text"
    );
}

#[tokio::test]
async fn tokens_never_appear_in_pages_or_logs() {
    let test = ConsoleTest::start().await;
    let id = test
        .delivered(&begini_payload(&unique_uid(), "application.complete"))
        .await;
    let ops = test.login(OPS_TOKEN).await;
    assert!(!ops.contains(OPS_TOKEN));
    for path in [
        "/",
        "/events",
        &format!("/events/{id}"),
        "/actions",
        "/replay?status=skipped",
    ] {
        let (status, page) = test.page(path, &ops).await;
        assert_eq!(status, 200, "{path}");
        assert!(
            !page.contains(OPS_TOKEN) && !page.contains(AUDIT_TOKEN),
            "{path} shows a token"
        );
    }
    test.http
        .post(format!("{}/login", test.url))
        .form(&[("token", "a-wrong-token-typed-by-someone")])
        .send()
        .await
        .unwrap();
    crate::support::assert_logs_never_contain(&[
        OPS_TOKEN,
        AUDIT_TOKEN,
        "a-wrong-token-typed-by-someone",
    ]);
}

/// chromedriver and headless Chromium, or `None` (said loudly) outside CI.
struct Browser {
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Option<Self> {
        let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let driver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("CI=true but Chromium or chromedriver is not installed (apt-get install chromium chromium-driver)");
            }
            eprintln!("\n*** SKIPPED: browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver) ***\n");
            return None;
        };
        let port = crate::support::free_port();
        let driver = std::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = tempfile::tempdir().unwrap();
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-dev-shm-usage", "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }),
        );
        let mut last_error = None;
        for _ in 0..100 {
            match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(capabilities.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(client) => {
                    return Some(Self {
                        client,
                        driver,
                        _profile: profile,
                    })
                }
                Err(error) => last_error = Some(error),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("chromedriver did not start a session: {last_error:?}");
    }

    /// Saves a screenshot under target/console-screenshots/ and checks that it
    /// shows something: more than a handful of distinct colours.
    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), &png).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(png));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut pixels).unwrap();
        let step = info.color_type.samples();
        let colours: std::collections::HashSet<&[u8]> =
            pixels[..info.buffer_size()].chunks(step).collect();
        assert!(
            colours.len() > 8,
            "screenshot {name} is blank ({} colours)",
            colours.len()
        );
    }

    async fn text(&self, css: &str) -> String {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn stop(mut self) {
        let _ = self.client.close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[tokio::test]
async fn an_operator_logs_in_opens_a_new_event_and_replays_it_in_the_browser() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let test = ConsoleTest::start().await;
    let id = test
        .delivered(&begini_payload(&unique_uid(), "application.complete"))
        .await;
    let page = &browser.client;

    page.goto(&format!("{}/", test.url)).await.unwrap();
    assert!(page.current_url().await.unwrap().path().ends_with("/login"));
    page.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(OPS_TOKEN)
        .await
        .unwrap();
    page.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    page.wait()
        .for_element(Locator::Css("#sources"))
        .await
        .unwrap();
    assert!(browser.text("#sources").await.contains("begini"));
    browser.screenshot("overview").await;

    page.goto(&format!("{}/events", test.url)).await.unwrap();
    let link = page
        .wait()
        .for_element(Locator::Css(&format!("a[href='/events/{id}']")))
        .await
        .unwrap();
    link.click().await.unwrap();
    page.wait()
        .for_element(Locator::Css("#timeline"))
        .await
        .unwrap();
    assert_eq!(browser.text("#event-id").await, id.to_string());
    let timeline = browser.text("#timeline").await;
    assert!(
        timeline.contains("delivery") && timeline.contains("attempt"),
        "{timeline}"
    );
    browser.screenshot("event").await;

    page.find(Locator::Css("#reason"))
        .await
        .unwrap()
        .send_keys("checking the new route")
        .await
        .unwrap();
    page.find(Locator::Css("#replay-button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    page.wait()
        .for_element(Locator::Css("p.notice"))
        .await
        .unwrap();
    test.wait_for(&format!(
        "SELECT (count(*) = 2 AND bool_and(finished_at IS NOT NULL))::int::int8 FROM inbox_attempts WHERE event_id = '{id}'"
    ))
    .await;
    page.refresh().await.unwrap();
    let timeline = browser.text("#timeline").await;
    // A replay restarts the attempt count: the new attempt is a second row.
    assert_eq!(
        timeline.matches("attempt skipped").count(),
        2,
        "the new attempt is shown: {timeline}"
    );
    assert!(
        timeline.contains("checking the new route"),
        "the replay and its reason are shown: {timeline}"
    );
    browser.stop().await;
}

#[tokio::test]
async fn hostile_payloads_run_no_script_in_the_browser() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let test = ConsoleTest::start().await;
    let id = test.delivered(&hostile_payload(&unique_uid())).await;
    let page = &browser.client;
    page.goto(&format!("{}/login", test.url)).await.unwrap();
    page.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(OPS_TOKEN)
        .await
        .unwrap();
    page.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    page.wait()
        .for_element(Locator::Css("#sources"))
        .await
        .unwrap();
    for path in ["/events".to_owned(), format!("/events/{id}")] {
        page.goto(&format!("{}{path}", test.url)).await.unwrap();
        page.wait().for_element(Locator::Css("main")).await.unwrap();
        let marker = page
            .execute("return [typeof window.hookboxXss, document.title, document.querySelectorAll('main img, main svg[onload], main script, main a[href^=\"javascript:\"]').length];", vec![])
            .await
            .unwrap();
        assert_eq!(marker[0], "undefined", "{path}: a script ran");
        assert!(!marker[1].as_str().unwrap().contains("pwned"), "{path}");
        assert_eq!(marker[2], 0, "{path}: markup was injected");
    }
    assert!(browser
        .text("#payload")
        .await
        .contains("<script>window.hookboxXss = 1"));
    browser.stop().await;
}

#[tokio::test]
async fn operators_pause_skip_and_resume_from_the_console_and_viewers_cannot() {
    let test = ConsoleTest::start().await;
    let post = |path: &str, token: &str, body: serde_json::Value| {
        test.http
            .post(format!("{}{path}", test.url))
            .bearer_auth(token)
            .json_body(&body)
            .send()
    };
    let pause =
        serde_json::json!({ "kind": "source", "name": "begini", "reason": "provider incident" });

    let refused = post("/pause", AUDIT_TOKEN, pause.clone()).await.unwrap();
    assert_eq!(refused.status(), 403, "a viewer cannot pause");
    let paused = post("/pause", OPS_TOKEN, pause).await.unwrap();
    assert_eq!(paused.status(), 200);

    // Paused: the delivery is accepted and waits.
    let answer = test
        .app
        .post_signed(
            "begini",
            &begini_payload(&unique_uid(), "application.complete"),
        )
        .await;
    assert_eq!(answer.status, 200);
    let id = answer.event_id();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let ops = test.login(OPS_TOKEN).await;
    let (_, overview) = test.page("/", &ops).await;
    assert!(
        overview.contains("provider incident"),
        "the overview shows the pause"
    );
    let (_, page) = test.page(&format!("/events/{id}"), &ops).await;
    assert!(page.contains(r#"id="skip""#), "a waiting event offers skip");

    let skip = serde_json::json!({ "reason": "sent by mistake" });
    let refused = post(&format!("/events/{id}/skip"), AUDIT_TOKEN, skip.clone())
        .await
        .unwrap();
    assert_eq!(refused.status(), 403, "a viewer cannot skip");
    let skipped = post(&format!("/events/{id}/skip"), OPS_TOKEN, skip)
        .await
        .unwrap();
    assert_eq!(skipped.status(), 200);
    let resumed = post(
        "/resume",
        OPS_TOKEN,
        serde_json::json!({ "kind": "source", "name": "begini", "reason": "over" }),
    )
    .await
    .unwrap();
    assert_eq!(resumed.status(), 200);

    let status: String = sqlx::query_scalar("SELECT status FROM inbox_events WHERE id = $1")
        .bind(id)
        .fetch_one(&test.app.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "skipped");
    let actions: Vec<(String, String)> =
        sqlx::query_as("SELECT action, actor FROM inbox_actions ORDER BY id")
            .fetch_all(&test.app.db.pool)
            .await
            .unwrap();
    let expected = [("pause", "ops"), ("skip", "ops"), ("resume", "ops")];
    assert_eq!(actions, expected.map(|(a, b)| (a.to_owned(), b.to_owned())));
}
