//! The configuration file as users write it. Unknown keys are refused so a typo
//! never silently falls back to a default.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use serde::{de, Deserialize, Deserializer};

use crate::{
    duration::HumanDuration,
    event_key::{EventKeySpec, FieldSpec},
    signature::{Algorithm, Encoding},
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub database: DatabaseSection,
    #[serde(default)]
    pub receiver: ReceiverSection,
    #[serde(default)]
    pub worker: WorkerSection,
    #[serde(default)]
    pub source: Vec<SourceSection>,
    #[serde(default)]
    pub route: Vec<RouteSection>,
    #[serde(default)]
    pub handler: BTreeMap<String, HandlerTable>,
    #[serde(default)]
    pub console: Option<super::operators::ConsoleSection>,
    #[serde(default)]
    pub alert: Vec<super::operators::AlertSection>,
    #[serde(default)]
    pub alerting: super::operators::AlertingSection,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSection {
    /// Name of the environment variable holding the database URL.
    pub url_env: String,
    pub max_connections: u32,
    /// How long to wait for a connection before answering 503.
    pub acquire_timeout: HumanDuration,
    /// A file holding the database URL, read when the `url_env` variable is
    /// not set (`hookbox dev` writes one for its private cluster).
    pub url_file: Option<PathBuf>,
}

impl Default for DatabaseSection {
    fn default() -> Self {
        Self {
            url_env: "DATABASE_URL".into(),
            max_connections: 16,
            acquire_timeout: HumanDuration::from_secs(3),
            url_file: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiverSection {
    pub listen: SocketAddr,
    /// `/metrics`; never on the public port. Empty string disables it.
    pub admin_listen: String,
    pub max_body_bytes: usize,
    pub request_timeout: HumanDuration,
    pub trusted_proxies: Vec<String>,
    pub tls: Option<TlsSection>,
    pub tls_terminated_by_proxy: bool,
    /// Group commit: at most this many deliveries share one transaction.
    pub batch_max_size: usize,
    /// How long a batch waits for more deliveries once it has one.
    pub batch_max_wait: HumanDuration,
    /// Batches committing at once in all, each on its own connection, shared
    /// out among the HTTP workers (at least one each).
    pub batch_committers: usize,
    /// Threads serving HTTP, each gathering and committing the batches of the
    /// requests it serves; `0`: one per core and one more.
    pub http_workers: usize,
    /// Deliveries waiting for a batch; beyond this, `503`.
    pub queue_capacity: usize,
    /// Per client address: refused requests allowed before the address is
    /// answered 429 without its body being read.
    pub refusal_rate_limit: RateLimitSection,
    /// Per minute, source, outcome and reason: refusals that get a detailed
    /// `inbox_deliveries` row; the rest are counted only.
    pub refusals_detailed_per_minute: usize,
}

impl Default for ReceiverSection {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".parse().expect("valid address"),
            admin_listen: "127.0.0.1:9090".into(),
            max_body_bytes: 1024 * 1024,
            request_timeout: HumanDuration::from_secs(10),
            trusted_proxies: Vec::new(),
            tls: None,
            tls_terminated_by_proxy: false,
            batch_max_size: 256,
            batch_max_wait: HumanDuration::from_millis(0),
            batch_committers: 2,
            http_workers: 0,
            queue_capacity: 8192,
            refusal_rate_limit: RateLimitSection {
                per_second: 10,
                burst: 100,
            },
            refusals_detailed_per_minute: 100,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    #[serde(default = "default_tls_version")]
    pub min_version: String,
}

fn default_tls_version() -> String {
    "1.3".into()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSection {
    /// `/metrics`; never a public address. Empty string disables it.
    pub admin_listen: String,
    pub concurrency: usize,
    /// Events claimed at once; for sql and library handlers, also how many
    /// complete in one transaction.
    pub batch_size: usize,
    pub lease: HumanDuration,
    pub poll_interval: HumanDuration,
    pub shutdown_grace: HumanDuration,
    pub retry: RetrySection,
    /// The time each partition of the history (deliveries, attempts,
    /// payloads) covers: what `hookbox prune` can drop at once.
    pub partition_interval: HumanDuration,
    /// Partitions are made this many intervals ahead of now (by one worker
    /// at a time), so that rows never wait for one.
    pub partitions_ahead: u32,
}

impl Default for WorkerSection {
    fn default() -> Self {
        Self {
            // A range: the first free port, so several workers share a host.
            admin_listen: "127.0.0.1:9091-9099".into(),
            concurrency: 16,
            batch_size: 500,
            lease: HumanDuration::from_secs(300),
            poll_interval: HumanDuration::from_secs(1),
            shutdown_grace: HumanDuration::from_secs(30),
            retry: RetrySection::default(),
            partition_interval: HumanDuration::from_secs(24 * 3600),
            partitions_ahead: 3,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySection {
    pub max_attempts: u32,
    pub initial: HumanDuration,
    pub max: HumanDuration,
    pub multiplier: f64,
    pub jitter: f64,
}

impl Default for RetrySection {
    fn default() -> Self {
        Self {
            max_attempts: 12,
            initial: HumanDuration::from_secs(5),
            max: HumanDuration::from_secs(6 * 3600),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SchemeName {
    Begini,
    StandardWebhooks,
    Stripe,
    Github,
    Hmac,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    pub name: String,
    pub environment: String,
    pub scheme: SchemeName,
    #[serde(default)]
    pub secrets_env: Vec<String>,
    #[serde(default)]
    pub secrets_file: Vec<PathBuf>,
    /// Present only to refuse inline secrets with a helpful message.
    #[serde(default)]
    pub secret: Option<toml::Value>,
    #[serde(default)]
    pub secrets: Option<toml::Value>,
    #[serde(default = "default_event_key")]
    pub event_key: EventKeySpec,
    #[serde(default)]
    pub event_type: Option<FieldSpec>,
    #[serde(default)]
    pub allow_ips: Vec<String>,
    #[serde(default)]
    pub rate_limit: Option<RateLimitSection>,
    #[serde(default = "default_tolerance")]
    pub tolerance: HumanDuration,
    /// Flow control: events sharing this key run one at a time, in order.
    #[serde(default)]
    pub ordering_key: Option<EventKeySpec>,
    /// The sender's time (`{ json = "/created" }`); default: the order received.
    #[serde(default)]
    pub order_by: Option<FieldSpec>,
    #[serde(default)]
    pub stale: Option<StalePolicy>,
    #[serde(default)]
    pub on_dead: Option<OnDead>,
    /// `hmac` scheme only.
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub algorithm: Option<Algorithm>,
    #[serde(default)]
    pub encoding: Option<Encoding>,
    /// `[source.reconcile]`: see `reconcile.rs`.
    #[serde(default)]
    pub reconcile: Option<super::ReconcileSection>,
}

fn default_event_key() -> EventKeySpec {
    EventKeySpec::BodySha256
}

fn default_tolerance() -> HumanDuration {
    HumanDuration::from_secs(300)
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    pub per_second: u32,
    pub burst: u32,
}

/// `stale`: what becomes of an event older (by `order_by`) than one of its
/// key that has already finished.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StalePolicy {
    #[default]
    Process,
    Skip,
}

/// `on_dead`: whether a dead event holds back the rest of its key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDead {
    #[default]
    Block,
    Continue,
}

/// A `[handler.NAME]` table: its kind's keys, and the flow-control keys every
/// kind shares.
#[derive(Clone, Debug)]
pub struct HandlerTable {
    pub section: HandlerSection,
    pub flow: HandlerFlowSection,
}

/// Limits shared by every worker process.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerFlowSection {
    /// Attempts running at once, across all workers.
    pub max_in_flight: Option<u32>,
    /// Attempts started per second, across all workers.
    pub rate_limit: Option<RateLimitSection>,
    /// `http` and `exec`: consecutive retryable failures open the circuit.
    pub circuit: Option<CircuitSection>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitSection {
    pub failures: u32,
    pub cool_down: HumanDuration,
}

const FLOW_KEYS: [&str; 3] = ["max_in_flight", "rate_limit", "circuit"];

impl<'de> Deserialize<'de> for HandlerTable {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut table = toml::Table::deserialize(deserializer)?;
        let mut flow = toml::Table::new();
        for key in FLOW_KEYS {
            if let Some(value) = table.remove(key) {
                flow.insert(key.to_owned(), value);
            }
        }
        let flow = toml::Value::Table(flow)
            .try_into::<HandlerFlowSection>()
            .map_err(|e| de::Error::custom(e.message().trim()))?;
        let section = toml::Value::Table(table)
            .try_into::<HandlerSection>()
            .map_err(|e| de::Error::custom(e.message().trim()))?;
        Ok(Self { section, flow })
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub source: String,
    /// Globs (`*`, `?`); `None` matches every type, including none.
    #[serde(default)]
    pub event_types: Option<Vec<String>>,
    pub handler: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum HandlerSection {
    Sql {
        statement: String,
    },
    Http {
        url: String,
        #[serde(default = "default_handler_timeout")]
        timeout: HumanDuration,
        #[serde(default = "default_permanent_statuses")]
        permanent_statuses: Vec<u16>,
        /// Re-sign the POST with a Standard Webhooks signature.
        #[serde(default)]
        signing_secret_env: Option<String>,
        #[serde(default)]
        signing_secret_file: Option<PathBuf>,
    },
    Exec {
        command: Vec<String>,
        #[serde(default = "default_handler_timeout")]
        timeout: HumanDuration,
        /// Variables passed on from the worker's environment, besides `PATH`
        /// and the `HOOKBOX_*` event variables; nothing else is.
        #[serde(default)]
        env: Vec<String>,
    },
    /// Provided in code by a binary that embeds hookbox.
    Library {},
    /// Forwarding to a broker (`config::brokers`).
    Nats(super::NatsSection),
    Amqp(super::AmqpSection),
    Redis(super::RedisSection),
}

fn default_handler_timeout() -> HumanDuration {
    HumanDuration::from_secs(30)
}

fn default_permanent_statuses() -> Vec<u16> {
    vec![400, 404, 410, 422]
}
