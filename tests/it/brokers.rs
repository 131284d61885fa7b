//! The forwarding handlers against the machine's real brokers: NATS with
//! JetStream, RabbitMQ and Redis. Events go in through the receiver (with
//! duplicate deliveries), out through `hookbox-worker` processes that are
//! killed at random, and every event must be found in the broker. A broker
//! that is absent skips its tests loudly (and fails them under `CI=true`).
//! Each test uses its own stream, queue or key, and removes it afterwards.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    process::Child,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use hookbox::event_key::sha256_hex;
use uuid::Uuid;

use crate::support::*;

const NATS: &str = "127.0.0.1:4222";
const AMQP: &str = "127.0.0.1:5672";
const REDIS: &str = "127.0.0.1:6379";
/// The AMQP URL carries credentials, so the config names a variable.
const AMQP_URL_ENV: &str = "HOOKBOX_TEST_AMQP_URL";
const EVENT_TYPES: [&str; 3] = [
    "psychometric_score.complete",
    "application.complete",
    "application.expired",
];

/// A test's own place in a broker: stream, exchange and queue, or key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Nats,
    Amqp,
    Redis,
}

struct Target {
    kind: Kind,
    /// NATS subject and stream, AMQP exchange and queue, Redis stream key.
    name: String,
    /// Where the worker connects: the broker, or a forwarder in front of it.
    address: String,
}

impl Target {
    fn new(kind: Kind, address: &str) -> Self {
        let unique = Uuid::now_v7().simple().to_string();
        Self {
            kind,
            name: format!("hookbox_test_{}", &unique[unique.len() - 12..]),
            address: address.to_owned(),
        }
    }

    fn handler(&self) -> String {
        match self.kind {
            Kind::Nats => format!(
                "kind = \"nats\"\nurl = \"nats://{}\"\nsubject = \"{}.events\"\ntimeout = \"1s\"",
                self.address, self.name
            ),
            Kind::Amqp => format!(
                "kind = \"amqp\"\nurl_env = \"{AMQP_URL_ENV}\"\nexchange = \"{}\"\nrouting_key = \"events\"\ntimeout = \"1s\"",
                self.name
            ),
            Kind::Redis => format!(
                "kind = \"redis\"\nurl = \"redis://{}\"\nstream = \"{}\"\ntimeout = \"1s\"",
                self.address, self.name
            ),
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![("BEGINI_API_KEY".to_owned(), BEGINI_KEY.to_owned())];
        if self.kind == Kind::Amqp {
            env.push((
                AMQP_URL_ENV.to_owned(),
                format!("amqp://guest:guest@{}/%2f", self.address),
            ));
        }
        env
    }

    /// Creates the stream, or the exchange with a queue bound to it.
    async fn create(&self) {
        match self.kind {
            Kind::Nats => {
                use async_nats::jetstream::stream;
                nats()
                    .await
                    .create_stream(stream::Config {
                        name: self.name.clone(),
                        subjects: vec![format!("{}.events", self.name)],
                        storage: stream::StorageType::Memory,
                        // Longer than any test: a retried publish is always
                        // inside the window, so the stream keeps it once.
                        duplicate_window: Duration::from_secs(600),
                        max_age: Duration::from_secs(3600),
                        ..Default::default()
                    })
                    .await
                    .expect("a JetStream stream");
            }
            Kind::Amqp => {
                use lapin::{options::*, types::FieldTable, ExchangeKind};
                let channel = amqp().await;
                channel
                    .exchange_declare(
                        self.name.as_str().into(),
                        ExchangeKind::Direct,
                        ExchangeDeclareOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .unwrap();
                channel
                    .queue_declare(
                        self.name.as_str().into(),
                        QueueDeclareOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .unwrap();
                channel
                    .queue_bind(
                        self.name.as_str().into(),
                        self.name.as_str().into(),
                        "events".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .unwrap();
            }
            // XADD creates the stream.
            Kind::Redis => {}
        }
    }

    /// Every message the broker holds, and removes the stream, queue or key.
    async fn take_messages(&self) -> Vec<Message> {
        match self.kind {
            Kind::Nats => {
                let jetstream = nats().await;
                let mut stream = jetstream.get_stream(&self.name).await.unwrap();
                let state = stream.info().await.unwrap().state.clone();
                let mut messages = Vec::new();
                for sequence in state.first_sequence..=state.last_sequence {
                    let raw = stream.get_raw_message(sequence).await.unwrap();
                    let header = |name: &str| {
                        raw.headers
                            .get(name)
                            .map(|v| v.as_str().to_owned())
                            .unwrap_or_default()
                    };
                    messages.push(Message {
                        dedup_id: header("Nats-Msg-Id"),
                        event_id: header("hookbox-event-id"),
                        event_type: header("hookbox-event-type"),
                        source: header("hookbox-source"),
                        attempt: header("hookbox-attempt").parse().unwrap_or(0),
                        payload: raw.payload.to_vec(),
                    });
                }
                jetstream.delete_stream(&self.name).await.unwrap();
                messages
            }
            Kind::Amqp => {
                use lapin::{options::*, types::AMQPValue};
                let channel = amqp().await;
                let mut messages = Vec::new();
                while let Some(got) = channel
                    .basic_get(self.name.as_str().into(), BasicGetOptions { no_ack: true })
                    .await
                    .unwrap()
                {
                    let properties = &got.delivery.properties;
                    let headers = properties.headers().clone().unwrap_or_default();
                    let header = |name: &str| match headers.inner().get(name) {
                        Some(AMQPValue::LongString(s)) => s.to_string(),
                        Some(AMQPValue::LongInt(n)) => n.to_string(),
                        _ => String::new(),
                    };
                    assert_eq!(
                        *properties.delivery_mode(),
                        Some(2),
                        "messages are persistent"
                    );
                    messages.push(Message {
                        dedup_id: properties
                            .message_id()
                            .as_ref()
                            .map(|id| id.to_string())
                            .unwrap_or_default(),
                        event_id: header("hookbox-event-id"),
                        event_type: header("hookbox-event-type"),
                        source: header("hookbox-source"),
                        attempt: header("hookbox-attempt").parse().unwrap_or(0),
                        payload: got.delivery.data.clone(),
                    });
                }
                channel
                    .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .unwrap();
                channel
                    .exchange_delete(self.name.as_str().into(), ExchangeDeleteOptions::default())
                    .await
                    .unwrap();
                messages
            }
            Kind::Redis => {
                let mut redis = redis().await;
                type Entry = (String, HashMap<String, Vec<u8>>);
                let entries: Vec<Entry> = redis::cmd("XRANGE")
                    .arg(&self.name)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut redis)
                    .await
                    .unwrap();
                let _: i64 = redis::cmd("DEL")
                    .arg(&self.name)
                    .query_async(&mut redis)
                    .await
                    .unwrap();
                entries
                    .into_iter()
                    .map(|(_, mut fields)| {
                        let mut field = |name: &str| {
                            String::from_utf8(fields.remove(name).unwrap_or_default()).unwrap()
                        };
                        let event_id = field("event_id");
                        Message {
                            dedup_id: event_id.clone(),
                            event_id,
                            event_type: field("type"),
                            source: field("source"),
                            attempt: field("attempt").parse().unwrap_or(0),
                            payload: fields.remove("payload").unwrap_or_default(),
                        }
                    })
                    .collect()
            }
        }
    }
}

async fn nats() -> async_nats::jetstream::Context {
    async_nats::jetstream::new(async_nats::connect(NATS).await.expect("NATS answers"))
}

async fn amqp() -> lapin::Channel {
    let connection = lapin::Connection::connect(
        &format!("amqp://guest:guest@{AMQP}/%2f"),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("RabbitMQ answers");
    // The channel keeps its connection open while it is used.
    connection.create_channel().await.unwrap()
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://{REDIS}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers")
}

/// One message as a consumer of the broker sees it.
struct Message {
    /// `Nats-Msg-Id`, AMQP `message_id`, or the Redis `event_id` field.
    dedup_id: String,
    event_id: String,
    event_type: String,
    source: String,
    attempt: i32,
    payload: Vec<u8>,
}

fn worker_config(target: &Target) -> String {
    format!(
        r#"
[database]
max_connections = 8

[receiver]
listen = "127.0.0.1:0"
admin_listen = ""
request_timeout = "5s"

[worker]
admin_listen = ""
concurrency = 16
batch_size = 100
lease = "2s"
poll_interval = "200ms"
shutdown_grace = "2s"
retry = {{ max_attempts = 1000, initial = "100ms", max = "1s", multiplier = 2.0, jitter = 0.2 }}

[[source]]
name = "begini"
environment = "sandbox"
scheme = "begini"
secrets_env = ["BEGINI_API_KEY"]

[[route]]
source = "begini"
handler = "out"

[handler.out]
{}
"#,
        target.handler()
    )
}

/// A receiver in the test and its database, with a config file for workers.
struct Stage {
    app: TestApp,
    config: PathBuf,
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Stage {
    async fn new(target: &Target) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("hookbox.toml");
        let text = worker_config(target);
        std::fs::write(&config, &text).unwrap();
        let env = target.env();
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let app = TestApp::spawn_on(database().await, &text, &pairs).await;
        Self {
            app,
            config,
            env,
            _dir: dir,
        }
    }

    fn start_workers(&self, n: usize) -> Workers {
        let mut workers = Workers {
            children: Vec::new(),
            config: self.config.clone(),
            database_url: self.app.db.url.clone(),
            env: self.env.clone(),
        };
        for _ in 0..n {
            let worker = workers.spawn();
            workers.children.push(worker);
        }
        workers
    }

    async fn unfinished(&self) -> i64 {
        self.app
            .count("SELECT count(*) FROM inbox_events WHERE status <> 'succeeded'")
            .await
    }

    /// Waits (at most a minute) until every stored event has succeeded.
    async fn wait_until_drained(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.unfinished().await > 0 {
            assert!(
                Instant::now() < deadline,
                "events still unfinished after a minute: {}",
                self.unfinished().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Each stored event: its attempts so far, type and payload digest.
    async fn stored(&self) -> HashMap<String, (i32, Option<String>, String)> {
        sqlx::query_as::<_, (Uuid, i32, Option<String>, String)>(
            "SELECT id, attempts, event_type, payload_sha256 FROM inbox_events",
        )
        .fetch_all(&self.app.db.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, attempts, event_type, sha)| (id.to_string(), (attempts, event_type, sha)))
        .collect()
    }
}

/// `hookbox-worker` processes, killed when the test ends however it ends.
struct Workers {
    children: Vec<Child>,
    config: PathBuf,
    database_url: String,
    env: Vec<(String, String)>,
}

impl Workers {
    fn spawn(&self) -> Child {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        spawn_service_with_env("hookbox-worker", &self.config, &self.database_url, &env)
    }

    /// SIGKILLs one worker, chosen at random, and starts another in its place.
    fn kill_one(&mut self) {
        let victim = rand::random_range(0..self.children.len());
        self.children[victim].kill().unwrap();
        self.children[victim].wait().unwrap();
        self.children[victim] = self.spawn();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for worker in &mut self.children {
            let _ = worker.kill();
            let _ = worker.wait();
        }
    }
}

/// `events` new Begini events and `duplicates` repeated deliveries of some of
/// them, as a retrying sender would make; returns the stored events' ids.
async fn deliver(app: &TestApp, events: usize, duplicates: usize) -> HashSet<Uuid> {
    let bodies: Vec<Vec<u8>> = (0..events)
        .map(|i| begini_payload(&unique_uid(), EVENT_TYPES[i % EVENT_TYPES.len()]))
        .collect();
    let first: Vec<(u16, String, Uuid)> = futures_util::stream::iter(bodies.iter())
        .map(|body| async move {
            let answer = app.deliver_as_sender("begini", body).await;
            let status = answer.body["status"].as_str().unwrap_or("").to_owned();
            (answer.status, status, answer.event_id())
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(
        first
            .iter()
            .all(|(code, status, _)| *code == 200 && status == "accepted"),
        "every new event is accepted"
    );
    let again: Vec<(u16, String)> = futures_util::stream::iter(0..duplicates)
        .map(|_| {
            let body = &bodies[rand::random_range(0..bodies.len())];
            async move {
                let answer = app.deliver_as_sender("begini", body).await;
                let status = answer.body["status"].as_str().unwrap_or("").to_owned();
                (answer.status, status)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(
        again
            .iter()
            .all(|(code, status)| *code == 200 && status == "duplicate"),
        "every repeated delivery is answered duplicate"
    );
    first.into_iter().map(|(_, _, id)| id).collect()
}

/// What every broker must show: each stored event at least once, with its
/// id as the dedup id and in the event-id header or field, its type, source
/// and exact payload; duplicates only of one event, each from a later
/// attempt of it. Returns how many duplicates there were.
fn assert_every_event_published(
    messages: &[Message],
    stored: &HashMap<String, (i32, Option<String>, String)>,
) -> usize {
    let mut attempts_seen: HashMap<&str, Vec<i32>> = HashMap::new();
    for message in messages {
        assert_eq!(
            message.dedup_id, message.event_id,
            "the dedup id is the event id"
        );
        let (attempts, event_type, sha) = stored
            .get(&message.event_id)
            .unwrap_or_else(|| panic!("message {} is a stored event", message.event_id));
        assert_eq!(message.source, "begini");
        assert_eq!(Some(&message.event_type), event_type.as_ref());
        assert_eq!(&sha256_hex(&message.payload), sha, "the exact payload");
        assert!(
            (1..=*attempts).contains(&message.attempt),
            "attempt {} is one the event had (it had {attempts})",
            message.attempt
        );
        attempts_seen
            .entry(message.event_id.as_str())
            .or_default()
            .push(message.attempt);
    }
    let missing: Vec<&String> = stored
        .keys()
        .filter(|id| !attempts_seen.contains_key(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "events missing from the broker: {missing:?}"
    );
    for (id, attempts) in &attempts_seen {
        let distinct: HashSet<&i32> = attempts.iter().collect();
        assert_eq!(
            distinct.len(),
            attempts.len(),
            "event {id}: each copy comes from a different attempt ({attempts:?})"
        );
    }
    messages.len() - stored.len()
}

/// 2,000 events with 400 duplicate deliveries; two workers, killed and
/// restarted at random while they publish; every event ends in the broker.
/// Returns the messages' duplicate count.
async fn forward_while_workers_are_killed(kind: Kind, address: &str) -> Option<usize> {
    if !service_available(&format!("{kind:?}"), address) {
        return None;
    }
    const EVENTS: usize = 2000;
    let target = Target::new(kind, address);
    target.create().await;
    let stage = Stage::new(&target).await;
    let mut workers = stage.start_workers(2);

    let sending = deliver(&stage.app, EVENTS, 400);
    tokio::pin!(sending);
    let mut ids = None;
    let mut kills_with_work_open = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while ids.is_none() || (kills_with_work_open < 5 && Instant::now() < deadline) {
        let pause = Duration::from_millis(rand::random_range(100..400));
        tokio::select! {
            delivered = &mut sending, if ids.is_none() => ids = Some(delivered),
            _ = tokio::time::sleep(pause) => {
                let open = stage.unfinished().await;
                let total = stage.app.count("SELECT count(*) FROM inbox_events").await;
                if ids.is_some() && open == 0 && total == EVENTS as i64 {
                    // Drained before five kills: send no more, check what we have.
                    break;
                }
                workers.kill_one();
                if open > 0 {
                    kills_with_work_open += 1;
                }
            }
        }
    }
    let ids = ids.unwrap();
    assert_eq!(ids.len(), EVENTS, "one stored event per new body");
    assert!(
        kills_with_work_open >= 3,
        "workers were killed while events were open ({kills_with_work_open} times)"
    );
    stage.wait_until_drained().await;
    let stored = stage.stored().await;
    assert_eq!(stored.len(), EVENTS);
    let messages = target.take_messages().await;
    let duplicates = assert_every_event_published(&messages, &stored);
    let retried = stage
        .app
        .count("SELECT count(*) FROM inbox_events WHERE attempts > 1")
        .await;
    eprintln!(
        "{kind:?}: {} messages for {EVENTS} events, {duplicates} duplicates; {kills_with_work_open} kills with work open; {retried} events took more than one attempt",
        messages.len()
    );
    Some(duplicates)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_holds_every_event_exactly_once_while_workers_are_killed() {
    if let Some(duplicates) = forward_while_workers_are_killed(Kind::Nats, NATS).await {
        assert_eq!(duplicates, 0, "JetStream keeps one message per Nats-Msg-Id");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_holds_every_event_while_workers_are_killed_and_repeats_only_with_its_message_id() {
    forward_while_workers_are_killed(Kind::Amqp, AMQP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_holds_every_event_while_workers_are_killed_and_repeats_only_with_its_event_id() {
    forward_while_workers_are_killed(Kind::Redis, REDIS).await;
}

/// The broker goes away (a forwarder in front of it is cut) while events
/// arrive: they are retried, none is lost or dead, and once the broker is
/// back they all reach it.
async fn events_wait_out_an_outage(kind: Kind, address: &str) {
    if !service_available(&format!("{kind:?}"), address) {
        return;
    }
    let mut forwarder = Forwarder::start(address).await;
    let target = Target::new(kind, &format!("127.0.0.1:{}", forwarder.port));
    target.create().await;
    let stage = Stage::new(&target).await;
    let _workers = stage.start_workers(1);

    let before = deliver(&stage.app, 200, 0).await;
    stage.wait_until_drained().await;

    forwarder.cut();
    let during = deliver(&stage.app, 300, 50).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while stage
        .app
        .count("SELECT count(*) FROM inbox_attempts WHERE outcome = 'retry'")
        .await
        < 10
    {
        assert!(Instant::now() < deadline, "the outage led to retries");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        stage
            .app
            .count("SELECT count(*) FROM inbox_events WHERE status = 'succeeded'")
            .await,
        200,
        "nothing is confirmed while the broker is away"
    );
    assert_eq!(
        stage
            .app
            .count("SELECT count(*) FROM inbox_events WHERE status = 'dead'")
            .await,
        0
    );

    forwarder.restore().await;
    stage.wait_until_drained().await;
    let stored = stage.stored().await;
    assert_eq!(stored.len(), before.len() + during.len());
    let messages = target.take_messages().await;
    let duplicates = assert_every_event_published(&messages, &stored);
    if kind == Kind::Nats {
        assert_eq!(duplicates, 0, "JetStream keeps one message per Nats-Msg-Id");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_events_are_retried_and_drain_when_it_returns() {
    events_wait_out_an_outage(Kind::Nats, NATS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_outage_events_are_retried_and_drain_when_it_returns() {
    events_wait_out_an_outage(Kind::Amqp, AMQP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_events_are_retried_and_drain_when_it_returns() {
    events_wait_out_an_outage(Kind::Redis, REDIS).await;
}

/// A publish the broker refuses (no queue is bound for the routing key) is
/// a retried failure with the reason in the attempt's error, not a success.
#[tokio::test]
async fn an_amqp_message_no_queue_takes_is_retried_not_counted_as_delivered() {
    if !service_available("Amqp", AMQP) {
        return;
    }
    let target = Target::new(Kind::Amqp, AMQP);
    target.create().await;
    // Same exchange, but a routing key no queue is bound to.
    let text = worker_config(&target).replace(
        "routing_key = \"events\"",
        "routing_key = \"nobody-listens\"",
    );
    let env = target.env();
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let app = TestApp::spawn_on(database().await, &text, &pairs).await;
    let id = app
        .post_signed(
            "begini",
            &begini_payload(&unique_uid(), "application.complete"),
        )
        .await
        .event_id();
    let worker =
        hookbox::worker::Worker::from_config(&app.config, app.db.pool.clone(), Default::default())
            .unwrap();
    let outcomes = worker.process_next().await.unwrap();
    assert_eq!(
        outcomes,
        vec![hookbox::worker::Processed::Recorded(
            hookbox::AttemptOutcome::Retry
        )]
    );
    let (status, error): (String, String) =
        sqlx::query_as("SELECT status, last_error FROM inbox_events WHERE id = $1")
            .bind(id)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(status, "retrying");
    assert!(error.contains("no queue is bound"), "{error}");
    assert!(target.take_messages().await.is_empty());
    // The URL from url_env carries the credentials: they stay out of errors and logs.
    assert!(!error.contains("guest:guest"), "{error}");
    assert_logs_never_contain(&["guest:guest"]);
}

/// A JetStream subject no stream takes: retried (an operator may create the
/// stream), with the reason in the attempt's error.
#[tokio::test]
async fn a_nats_subject_without_a_stream_is_retried_with_the_reason() {
    if !service_available("Nats", NATS) {
        return;
    }
    let target = Target::new(Kind::Nats, NATS);
    let app = TestApp::spawn_on(
        database().await,
        &worker_config(&target),
        &[("BEGINI_API_KEY", BEGINI_KEY)],
    )
    .await;
    let id = app
        .post_signed(
            "begini",
            &begini_payload(&unique_uid(), "application.complete"),
        )
        .await
        .event_id();
    let worker =
        hookbox::worker::Worker::from_config(&app.config, app.db.pool.clone(), Default::default())
            .unwrap();
    assert_eq!(
        worker.process_next().await.unwrap(),
        vec![hookbox::worker::Processed::Recorded(
            hookbox::AttemptOutcome::Retry
        )]
    );
    let error: String = sqlx::query_scalar("SELECT last_error FROM inbox_events WHERE id = $1")
        .bind(id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(
        error.contains("no JetStream stream takes subject"),
        "{error}"
    );
}
