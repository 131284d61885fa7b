//! Loading and checking the configuration file. Everything a process needs is
//! checked here, once, so a bad file is refused at start with the key named.

mod brokers;
mod operators;
mod reconcile;
mod sections;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

pub use brokers::{AmqpSection, BrokerConfig, BrokerTarget, NatsSection, RedisSection};
use ipnet::IpNet;
pub use operators::{AlertConfig, Condition, ConsoleConfig, ConsoleToken, NotifyFormat, Role};
pub use reconcile::{Auth, Listing, Reconcile, ReconcileSection};
pub use sections::*;

use crate::{
    event_key::{EventKeySpec, FieldSpec, OrderingSpec},
    secret::Secret,
    signature::{Algorithm, Encoding, HmacParams, Scheme},
};

/// A configuration problem, naming the file and the key.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: String,
    pub message: String,
}

/// A checked configuration: every secret resolved, every reference valid.
#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub database: DatabaseSection,
    pub receiver: ReceiverSection,
    pub trusted_proxies: Vec<IpNet>,
    pub worker: WorkerSection,
    pub sources: Vec<Source>,
    pub routes: Vec<RouteSection>,
    pub handlers: BTreeMap<String, HandlerConfig>,
    /// `[console]`: absent means `hookbox console` refuses to start.
    pub console: Option<ConsoleConfig>,
    pub alerts: Vec<AlertConfig>,
    pub alert_evaluation_interval: Duration,
    /// Problems that do not stop a process but should be fixed (a secret file
    /// others can read); logged at start and printed by `config check`.
    pub warnings: Vec<String>,
}

/// Which process loads the configuration: each resolves only the secrets of
/// its own job, so a worker starts without the sources' secrets and a receiver
/// without the handlers'. Their keys are then empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessRole {
    /// Operator commands and `config check`: everything.
    All,
    /// Needs the sources' secrets.
    Receiver,
    /// Needs the handlers' secrets.
    Worker,
}

impl ProcessRole {
    fn needs_source_secrets(self) -> bool {
        self != Self::Worker
    }

    fn needs_handler_secrets(self) -> bool {
        self != Self::Receiver
    }
}

/// Shortest key accepted, in bytes (after decoding): shorter ones can be guessed.
pub const MIN_SECRET_BYTES: usize = 16;
/// Longest `tolerance` accepted: a longer window lets captured deliveries be
/// replayed for longer.
pub const MAX_TOLERANCE: Duration = Duration::from_secs(3600);

/// The shortest and longest `worker.partition_interval`.
pub const MIN_PARTITION_INTERVAL: Duration = Duration::from_secs(60);
pub const MAX_PARTITION_INTERVAL: Duration = Duration::from_secs(366 * 24 * 3600);
/// At most this many partitions ahead (`worker.partitions_ahead`): each one
/// costs every query that cannot skip it a little planning.
pub const MAX_PARTITIONS_AHEAD: u32 = 100;

/// Environment names the production rules apply to (compared ignoring case).
pub const PRODUCTION_NAMES: [&str; 3] = ["production", "prod", "live"];

/// Whether a source's `environment` names production.
pub fn is_production(environment: &str) -> bool {
    PRODUCTION_NAMES
        .iter()
        .any(|name| environment.eq_ignore_ascii_case(name))
}

/// A webhook sender, ready for the receiver.
#[derive(Clone, Debug)]
pub struct Source {
    pub name: String,
    pub environment: String,
    pub scheme: Scheme,
    /// Every configured key; more than one while a key is being rotated.
    pub keys: Vec<Secret>,
    pub event_key: EventKeySpec,
    pub event_type: Option<FieldSpec>,
    pub allow_ips: Vec<IpNet>,
    pub rate_limit: Option<RateLimitSection>,
    pub tolerance: Duration,
    /// Flow control: the source's events are ordered by this key.
    pub ordering: Option<OrderingSpec>,
    /// `[source.reconcile]`: asking the provider which events it sent.
    pub reconcile: Option<Reconcile>,
}

/// A `[handler.NAME]` table with its secrets resolved.
#[derive(Clone, Debug)]
pub struct HandlerConfig {
    pub section: HandlerSection,
    /// Limits and circuit, shared by every worker process.
    pub flow: HandlerFlow,
    pub signing_key: Option<Secret>,
    /// For `nats`, `amqp` and `redis`: the checked broker settings.
    pub broker: Option<BrokerConfig>,
}

/// A handler's flow-control limits, checked.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HandlerFlow {
    pub max_in_flight: Option<u32>,
    /// Attempts started per second, and the burst.
    pub rate: Option<(f64, f64)>,
    pub circuit: Option<Circuit>,
}

impl HandlerFlow {
    /// Whether the database must keep state for this handler.
    pub fn is_limited(&self) -> bool {
        self.max_in_flight.is_some() || self.rate.is_some() || self.circuit.is_some()
    }
}

/// `circuit = { failures, cool_down }`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Circuit {
    pub failures: u32,
    pub cool_down: Duration,
}

/// Where secrets and the database URL are read from: the process environment
/// in production, a map in tests.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Environment for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl Config {
    /// `--config PATH`, else `$HOOKBOX_CONFIG`, else `./hookbox.toml` (the CLI
    /// resolves that order); reads secrets from the process environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_for(path, ProcessRole::All)
    }

    /// Like [`Config::load`], resolving only the secrets `role` needs.
    pub fn load_for(path: &Path, role: ProcessRole) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            key: "(file)".into(),
            message: format!("cannot be read: {e}"),
        })?;
        Self::parse_for(&text, path, &ProcessEnvironment, role)
    }

    pub fn parse(text: &str, path: &Path, env: &dyn Environment) -> Result<Self, ConfigError> {
        Self::parse_for(text, path, env, ProcessRole::All)
    }

    pub fn parse_for(
        text: &str,
        path: &Path,
        env: &dyn Environment,
        role: ProcessRole,
    ) -> Result<Self, ConfigError> {
        let error = |key: &str, message: String| ConfigError {
            file: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        let deserializer = toml::Deserializer::new(text);
        let file: FileConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let message = e.into_inner().message().trim().to_owned();
            // The root, or a key whose name is empty (`'' = 1`).
            let key = match key.as_str() {
                "." | "" => "(file)".to_owned(),
                _ => key,
            };
            error(&key, message)
        })?;
        Checker {
            path,
            env,
            role,
            warnings: std::cell::RefCell::new(Vec::new()),
        }
        .check(file)
    }

    pub fn source(&self, name: &str) -> Option<&Source> {
        self.sources.iter().find(|s| s.name == name)
    }

    /// The source a command was asked for, or an error naming the file.
    pub fn require_source(&self, name: &str) -> Result<&Source, ConfigError> {
        self.source(name).ok_or_else(|| ConfigError {
            file: self.path.clone(),
            key: "source".into(),
            message: format!("no [[source]] is named \"{name}\""),
        })
    }

    /// The database URL from the variable `[database] url_env` names.
    pub fn database_url(&self) -> Result<String, ConfigError> {
        self.database_url_from(&ProcessEnvironment)
    }

    /// The variable wins; without it, `[database] url_file` is read.
    pub fn database_url_from(&self, env: &dyn Environment) -> Result<String, ConfigError> {
        if let Some(url) = env
            .var(&self.database.url_env)
            .filter(|url| !url.is_empty())
        {
            return Ok(url);
        }
        match &self.database.url_file {
            Some(file) => read_secret_file(file).map_err(|message| ConfigError {
                file: self.path.clone(),
                key: "database.url_file".into(),
                message: format!(
                    "{message} (and environment variable {} is not set)",
                    self.database.url_env
                ),
            }),
            None => Err(ConfigError {
                file: self.path.clone(),
                key: "database.url_env".into(),
                message: format!("environment variable {} is not set", self.database.url_env),
            }),
        }
    }
}

struct Checker<'a> {
    path: &'a Path,
    env: &'a dyn Environment,
    role: ProcessRole,
    warnings: std::cell::RefCell<Vec<String>>,
}

impl Checker<'_> {
    fn error(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.path.to_owned(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn warn(&self, key: impl Into<String>, message: impl Into<String>) {
        let warning = self.error(key, message).to_string();
        tracing::warn!(warning = %warning, "configuration");
        self.warnings.borrow_mut().push(warning);
    }

    /// Secret and key files should be readable by their owner only.
    fn warn_if_world_readable(&self, key: &str, path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(metadata) = std::fs::metadata(path) {
            if metadata.permissions().mode() & 0o004 != 0 {
                self.warn(
                    key,
                    format!(
                        "{} can be read by every user of this machine; make it readable by hookbox only (chmod 600)",
                        path.display()
                    ),
                );
            }
        }
    }

    fn check(&self, file: FileConfig) -> Result<Config, ConfigError> {
        if file.database.url_env.is_empty() {
            return Err(self.error("database.url_env", "must name an environment variable"));
        }
        if file.database.max_connections == 0 {
            return Err(self.error("database.max_connections", "must be at least 1"));
        }
        self.check_receiver(&file.receiver)?;
        let trusted_proxies = file
            .receiver
            .trusted_proxies
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let key = format!("receiver.trusted_proxies[{i}]");
                let net = parse_cidr(text).map_err(|m| self.error(&key, m))?;
                if net.prefix_len() == 0 {
                    return Err(self.error(
                        key,
                        format!("`{text}` would trust every address to name the client; list your proxies' addresses"),
                    ));
                }
                Ok(net)
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.check_worker(&file.worker)?;

        let mut sources: Vec<Source> = Vec::new();
        for (i, section) in file.source.into_iter().enumerate() {
            let source = self.check_source(i, section)?;
            if sources.iter().any(|s| s.name == source.name) {
                return Err(self.error(
                    format!("source[{i}].name"),
                    format!("source \"{}\" is defined twice", source.name),
                ));
            }
            sources.push(source);
        }
        self.check_environments_apart(&sources)?;
        self.check_plain_http(&file.receiver, &sources)?;

        let mut handlers = BTreeMap::new();
        for (name, table) in file.handler {
            let handler = self.check_handler(&name, table.section, &table.flow)?;
            handlers.insert(name, handler);
        }
        for (i, route) in file.route.iter().enumerate() {
            if !sources.iter().any(|s| s.name == route.source) {
                return Err(self.error(
                    format!("route[{i}].source"),
                    format!("no [[source]] is named \"{}\"", route.source),
                ));
            }
            if !handlers.contains_key(&route.handler) {
                return Err(self.error(
                    format!("route[{i}].handler"),
                    format!("no [handler.{}] table is defined", route.handler),
                ));
            }
            if let Some(types) = &route.event_types {
                if types.is_empty() || types.iter().any(String::is_empty) {
                    return Err(self.error(
                        format!("route[{i}].event_types"),
                        "list one or more globs, or leave the key out to match every type",
                    ));
                }
            }
        }

        let console = self.check_console(file.console)?;
        let alerts = self.check_alerts(file.alert, &sources, &file.alerting)?;
        Ok(Config {
            console,
            alerts,
            alert_evaluation_interval: file.alerting.evaluate_every.0,
            path: self.path.to_owned(),
            database: file.database,
            receiver: file.receiver,
            trusted_proxies,
            worker: file.worker,
            sources,
            routes: file.route,
            handlers,
            warnings: self.warnings.take(),
        })
    }

    fn check_receiver(&self, receiver: &ReceiverSection) -> Result<(), ConfigError> {
        if receiver.max_body_bytes == 0 {
            return Err(self.error("receiver.max_body_bytes", "must be at least 1"));
        }
        if receiver.request_timeout.0 < Duration::from_millis(100) {
            return Err(self.error("receiver.request_timeout", "must be at least 100ms"));
        }
        for (value, key) in [
            (receiver.batch_max_size, "receiver.batch_max_size"),
            (receiver.batch_committers, "receiver.batch_committers"),
            (receiver.queue_capacity, "receiver.queue_capacity"),
        ] {
            if value == 0 {
                return Err(self.error(key, "must be at least 1"));
            }
        }
        if receiver.batch_max_wait.0 >= receiver.request_timeout.0 {
            return Err(self.error(
                "receiver.batch_max_wait",
                "must be shorter than receiver.request_timeout",
            ));
        }
        self.check_admin_listen("receiver.admin_listen", &receiver.admin_listen)?;
        if let Some(tls) = &receiver.tls {
            if !matches!(tls.min_version.as_str(), "1.2" | "1.3") {
                return Err(self.error("receiver.tls.min_version", "must be \"1.2\" or \"1.3\""));
            }
            for (key, file) in [("cert_file", &tls.cert_file), ("key_file", &tls.key_file)] {
                if !file.is_file() {
                    return Err(self.error(
                        format!("receiver.tls.{key}"),
                        format!("{} is not a readable file", file.display()),
                    ));
                }
            }
            self.warn_if_world_readable("receiver.tls.key_file", &tls.key_file);
        }
        let refusals = receiver.refusal_rate_limit;
        if refusals.per_second == 0 || refusals.burst == 0 {
            return Err(self.error(
                "receiver.refusal_rate_limit",
                "per_second and burst must be at least 1",
            ));
        }
        Ok(())
    }

    fn check_admin_listen(&self, key: &str, address: &str) -> Result<(), ConfigError> {
        if !address.is_empty() && crate::telemetry::listen_candidates(address).is_none() {
            return Err(self.error(
                key,
                "must be an address like 127.0.0.1:9091, a range like 127.0.0.1:9091-9099 \
                 (the first free port), or \"\" for none",
            ));
        }
        Ok(())
    }

    fn check_worker(&self, worker: &WorkerSection) -> Result<(), ConfigError> {
        self.check_admin_listen("worker.admin_listen", &worker.admin_listen)?;
        let retry = &worker.retry;
        let checks = [
            (
                worker.concurrency == 0,
                "worker.concurrency",
                "must be at least 1",
            ),
            (
                worker.batch_size == 0,
                "worker.batch_size",
                "must be at least 1",
            ),
            (
                worker.lease.0 < Duration::from_secs(1),
                "worker.lease",
                "must be at least 1s",
            ),
            (
                worker.poll_interval.0.is_zero(),
                "worker.poll_interval",
                "must be more than 0",
            ),
            (
                !(MIN_PARTITION_INTERVAL..=MAX_PARTITION_INTERVAL)
                    .contains(&worker.partition_interval.0)
                    || worker.partition_interval.0.subsec_nanos() != 0,
                "worker.partition_interval",
                "must be whole seconds between 1m and 366d (for example \"1d\", \"6h\" or \"10m\")",
            ),
            (
                !(1..=MAX_PARTITIONS_AHEAD).contains(&worker.partitions_ahead),
                "worker.partitions_ahead",
                "must be between 1 and 100",
            ),
            (
                retry.max_attempts == 0,
                "worker.retry.max_attempts",
                "must be at least 1",
            ),
            (
                retry.initial.0.is_zero(),
                "worker.retry.initial",
                "must be more than 0",
            ),
            (
                retry.max < retry.initial,
                "worker.retry.max",
                "must not be less than worker.retry.initial",
            ),
            (
                !(retry.multiplier >= 1.0 && retry.multiplier.is_finite()),
                "worker.retry.multiplier",
                "must be a number of at least 1.0",
            ),
            (
                !(0.0..=1.0).contains(&retry.jitter),
                "worker.retry.jitter",
                "must be between 0.0 and 1.0",
            ),
        ];
        match checks.into_iter().find(|(failed, _, _)| *failed) {
            Some((_, key, message)) => Err(self.error(key, message)),
            None => Ok(()),
        }
    }

    fn check_source(&self, i: usize, section: SourceSection) -> Result<Source, ConfigError> {
        let key = |field: &str| format!("source[{i}].{field}");
        let name = section.name.clone();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(self.error(
                key("name"),
                "use letters, digits, `-` and `_` only (it is a URL path segment)",
            ));
        }
        if section.environment.is_empty() {
            return Err(self.error(
                key("environment"),
                "must not be empty (for example \"production\" or \"sandbox\")",
            ));
        }
        for (field, present) in [
            ("secret", section.secret.is_some()),
            ("secrets", section.secrets.is_some()),
        ] {
            if present {
                return Err(self.error(
                    key(field),
                    "secrets are never written in the file: name an environment variable with \
                     secrets_env = [\"BEGINI_API_KEY\"] or a file with secrets_file = [\"/run/secrets/begini\"]",
                ));
            }
        }
        let scheme = self.check_scheme(i, &section)?;
        if let EventKeySpec::Header(header) = &section.event_key {
            if !scheme_signs_header(&scheme, header) {
                return Err(self.error(
                    key("event_key"),
                    format!(
                        "the {} scheme does not sign the {header} header, so anyone holding one captured delivery \
                         could replay it under a new key; use {{ json = [\"/id\"] }} or \"body_sha256\"{}",
                        scheme.name(),
                        if scheme == Scheme::StandardWebhooks {
                            " (or the signed webhook-id header)"
                        } else {
                            ""
                        }
                    ),
                ));
            }
        }
        if section.tolerance.0 > MAX_TOLERANCE {
            return Err(self.error(
                key("tolerance"),
                "must be at most 1h: a longer window lets a captured delivery be replayed for longer",
            ));
        }
        let keys = if self.role.needs_source_secrets() {
            self.resolve_secrets(i, &scheme, &section.secrets_env, &section.secrets_file)?
        } else {
            if section.secrets_env.is_empty() && section.secrets_file.is_empty() {
                return Err(self.error(
                    key("secrets_env"),
                    "name at least one secret: secrets_env = [\"VAR\"] or secrets_file = [\"/path\"]",
                ));
            }
            Vec::new()
        };
        let allow_ips = section
            .allow_ips
            .iter()
            .enumerate()
            .map(|(j, text)| {
                parse_cidr(text).map_err(|m| self.error(format!("source[{i}].allow_ips[{j}]"), m))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(limit) = section.rate_limit {
            if limit.per_second == 0 || limit.burst == 0 {
                return Err(
                    self.error(key("rate_limit"), "per_second and burst must be at least 1")
                );
            }
        }
        let ordering = self.check_ordering(i, &section)?;
        let reconcile = self.check_reconcile(i, &section)?;
        let event_type = section
            .event_type
            .or_else(|| default_event_type(section.scheme));
        Ok(Source {
            name,
            environment: section.environment,
            scheme,
            keys,
            event_key: section.event_key,
            event_type,
            allow_ips,
            rate_limit: section.rate_limit,
            tolerance: section.tolerance.0,
            ordering,
            reconcile,
        })
    }

    fn check_ordering(
        &self,
        i: usize,
        section: &SourceSection,
    ) -> Result<Option<OrderingSpec>, ConfigError> {
        let key = |field: &str| format!("source[{i}].{field}");
        let Some(ordering_key) = section.ordering_key.clone() else {
            let stray = [
                ("order_by", section.order_by.is_some()),
                ("stale", section.stale.is_some()),
                ("on_dead", section.on_dead.is_some()),
            ];
            return match stray.into_iter().find(|(_, present)| *present) {
                Some((field, _)) => Err(self.error(key(field), "only applies with ordering_key")),
                None => Ok(None),
            };
        };
        if ordering_key == EventKeySpec::BodySha256 {
            return Err(self.error(
                key("ordering_key"),
                "name what events share: { json = [\"/uid\"] } or { header = \"...\" }",
            ));
        }
        let order_by = match &section.order_by {
            None => None,
            Some(FieldSpec::Json(pointer)) => Some(pointer.clone()),
            Some(FieldSpec::Header(_)) => {
                return Err(self.error(
                    key("order_by"),
                    "the sender's time is read from the payload: { json = \"/created\" }",
                ));
            }
        };
        let skip_if_stale = section.stale.unwrap_or_default() == StalePolicy::Skip;
        if skip_if_stale && order_by.is_none() {
            return Err(self.error(
                key("stale"),
                "stale = \"skip\" needs order_by: in the order received, no event is older than one already finished",
            ));
        }
        Ok(Some(OrderingSpec {
            key: ordering_key,
            order_by,
            dead_blocks: section.on_dead.unwrap_or_default() == OnDead::Block,
            skip_if_stale,
        }))
    }

    fn check_scheme(&self, i: usize, section: &SourceSection) -> Result<Scheme, ConfigError> {
        let hmac_only = [
            ("header", section.header.is_some()),
            ("prefix", section.prefix.is_some()),
            ("algorithm", section.algorithm.is_some()),
            ("encoding", section.encoding.is_some()),
        ];
        let scheme = match section.scheme {
            SchemeName::Begini => Scheme::Begini,
            SchemeName::StandardWebhooks => Scheme::StandardWebhooks,
            SchemeName::Stripe => Scheme::Stripe,
            SchemeName::Github => Scheme::Github,
            SchemeName::Hmac => {
                let header = section
                    .header
                    .clone()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| {
                        self.error(
                            format!("source[{i}].header"),
                            "the hmac scheme needs the signature header's name",
                        )
                    })?;
                return Ok(Scheme::Hmac(HmacParams {
                    header,
                    prefix: section.prefix.clone().unwrap_or_default(),
                    algorithm: section.algorithm.unwrap_or(Algorithm::Sha256),
                    encoding: section.encoding.unwrap_or(Encoding::Hex),
                }));
            }
        };
        if let Some((field, _)) = hmac_only.iter().find(|(_, present)| *present) {
            return Err(self.error(
                format!("source[{i}].{field}"),
                "only applies to scheme = \"hmac\"",
            ));
        }
        Ok(scheme)
    }

    fn resolve_secrets(
        &self,
        i: usize,
        scheme: &Scheme,
        from_env: &[String],
        from_files: &[PathBuf],
    ) -> Result<Vec<Secret>, ConfigError> {
        if from_env.is_empty() && from_files.is_empty() {
            return Err(self.error(
                format!("source[{i}].secrets_env"),
                "name at least one secret: secrets_env = [\"VAR\"] or secrets_file = [\"/path\"]",
            ));
        }
        let mut keys = Vec::new();
        for (j, var) in from_env.iter().enumerate() {
            let field = format!("source[{i}].secrets_env[{j}]");
            let value = self.env.var(var).ok_or_else(|| {
                self.error(&field, format!("environment variable {var} is not set"))
            })?;
            let key = scheme
                .key_from_secret(&value)
                .map_err(|m| self.error(&field, format!("{var}: {m}")))?;
            self.check_secret_length(&field, var, &key)?;
            keys.push(key);
        }
        for (j, path) in from_files.iter().enumerate() {
            let field = format!("source[{i}].secrets_file[{j}]");
            let value = read_secret_file(path).map_err(|m| self.error(&field, m))?;
            let key = scheme
                .key_from_secret(&value)
                .map_err(|m| self.error(&field, format!("{}: {m}", path.display())))?;
            self.check_secret_length(&field, &path.display().to_string(), &key)?;
            self.warn_if_world_readable(&field, path);
            keys.push(key);
        }
        Ok(keys)
    }

    fn check_secret_length(
        &self,
        field: &str,
        origin: &str,
        key: &Secret,
    ) -> Result<(), ConfigError> {
        if key.expose().len() < MIN_SECRET_BYTES {
            return Err(self.error(
                field,
                format!(
                    "{origin}: the secret is {} bytes; use at least {MIN_SECRET_BYTES} (the key your provider issued)",
                    key.expose().len()
                ),
            ));
        }
        Ok(())
    }

    /// Sandbox and production keys must differ, or data could cross over.
    fn check_environments_apart(&self, sources: &[Source]) -> Result<(), ConfigError> {
        for (i, a) in sources.iter().enumerate() {
            for b in &sources[..i] {
                if a.environment != b.environment && a.keys.iter().any(|k| b.keys.contains(k)) {
                    return Err(self.error(
                        format!("source[{i}].secrets_env"),
                        format!(
                            "source \"{}\" ({}) shares a secret with source \"{}\" ({}); keys of different environments must differ",
                            a.name, a.environment, b.name, b.environment
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn check_plain_http(
        &self,
        receiver: &ReceiverSection,
        sources: &[Source],
    ) -> Result<(), ConfigError> {
        if receiver.tls.is_some() || receiver.tls_terminated_by_proxy {
            return Ok(());
        }
        match sources.iter().find(|s| is_production(&s.environment)) {
            Some(source) => Err(self.error(
                "receiver.tls",
                format!(
                    "source \"{}\" is production but the receiver would serve plain HTTP: configure \
                     receiver.tls, or set receiver.tls_terminated_by_proxy = true if TLS ends in front of hookbox",
                    source.name
                ),
            )),
            None => Ok(()),
        }
    }

    fn check_handler(
        &self,
        name: &str,
        section: HandlerSection,
        flow: &HandlerFlowSection,
    ) -> Result<HandlerConfig, ConfigError> {
        let key = |field: &str| format!("handler.{name}.{field}");
        let broker = self.check_broker(name, &section)?;
        let mut signing_key = None;
        match &section {
            HandlerSection::Sql { statement } if statement.trim().is_empty() => {
                return Err(self.error(key("statement"), "must not be empty"));
            }
            HandlerSection::Http {
                url,
                permanent_statuses,
                signing_secret_env,
                signing_secret_file,
                ..
            } => {
                let parsed = reqwest::Url::parse(url)
                    .map_err(|e| self.error(key("url"), format!("not a URL: {e}")))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(self.error(key("url"), "must be an http:// or https:// URL"));
                }
                if let Some(status) = permanent_statuses
                    .iter()
                    .find(|s| !(100..=599).contains(*s))
                {
                    return Err(self.error(
                        key("permanent_statuses"),
                        format!("{status} is not an HTTP status"),
                    ));
                }
                let secret = match (signing_secret_env, signing_secret_file) {
                    (Some(_), Some(_)) => {
                        return Err(self.error(
                            key("signing_secret_env"),
                            "give signing_secret_env or signing_secret_file, not both",
                        ));
                    }
                    _ if !self.role.needs_handler_secrets() => None,
                    (Some(var), None) => Some(self.env.var(var).ok_or_else(|| {
                        self.error(
                            key("signing_secret_env"),
                            format!("environment variable {var} is not set"),
                        )
                    })?),
                    (None, Some(path)) => {
                        self.warn_if_world_readable(&key("signing_secret_file"), path);
                        Some(
                            read_secret_file(path)
                                .map_err(|m| self.error(key("signing_secret_file"), m))?,
                        )
                    }
                    (None, None) => None,
                };
                if let Some(secret) = secret {
                    signing_key = Some(
                        Scheme::StandardWebhooks
                            .key_from_secret(&secret)
                            .map_err(|m| self.error(key("signing_secret_env"), m))?,
                    );
                }
            }
            HandlerSection::Exec { command, .. } if command.is_empty() || command[0].is_empty() => {
                return Err(self.error(
                    key("command"),
                    "name the program and its arguments, e.g. [\"/usr/local/bin/on-score\"]",
                ));
            }
            _ => {}
        }
        let flow = self.check_handler_flow(name, &section, flow)?;
        Ok(HandlerConfig {
            section,
            flow,
            signing_key,
            broker,
        })
    }

    fn check_handler_flow(
        &self,
        name: &str,
        section: &HandlerSection,
        flow: &HandlerFlowSection,
    ) -> Result<HandlerFlow, ConfigError> {
        let key = |field: &str| format!("handler.{name}.{field}");
        if flow.max_in_flight == Some(0) {
            return Err(self.error(key("max_in_flight"), "must be at least 1"));
        }
        if let Some(limit) = flow.rate_limit {
            if limit.per_second == 0 || limit.burst == 0 {
                return Err(
                    self.error(key("rate_limit"), "per_second and burst must be at least 1")
                );
            }
        }
        if let Some(circuit) = flow.circuit {
            if matches!(
                section,
                HandlerSection::Sql { .. } | HandlerSection::Library {}
            ) {
                return Err(self.error(
                    key("circuit"),
                    "only for handlers that call out (http, exec): a transactional handler's failures roll back with it",
                ));
            }
            if circuit.failures == 0 || circuit.cool_down.0.is_zero() {
                return Err(self.error(
                    key("circuit"),
                    "failures must be at least 1 and cool_down more than 0",
                ));
            }
        }
        Ok(HandlerFlow {
            max_in_flight: flow.max_in_flight,
            rate: flow
                .rate_limit
                .map(|limit| (f64::from(limit.per_second), f64::from(limit.burst))),
            circuit: flow.circuit.map(|c| Circuit {
                failures: c.failures,
                cool_down: c.cool_down.0,
            }),
        })
    }
}

/// Whether the scheme's signature covers the header, so that its value can
/// serve as the event key: only Standard Webhooks signs its message id.
fn scheme_signs_header(scheme: &Scheme, header: &str) -> bool {
    *scheme == Scheme::StandardWebhooks
        && ["webhook-id", "svix-id"]
            .iter()
            .any(|signed| header.eq_ignore_ascii_case(signed))
}

fn default_event_type(scheme: SchemeName) -> Option<FieldSpec> {
    match scheme {
        SchemeName::Begini => Some(FieldSpec::Json("/event/type".into())),
        SchemeName::Stripe | SchemeName::StandardWebhooks => Some(FieldSpec::Json("/type".into())),
        SchemeName::Github => Some(FieldSpec::Header("X-GitHub-Event".into())),
        SchemeName::Hmac => None,
    }
}

fn read_secret_file(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(trimmed.to_owned())
}

/// A CIDR (`10.0.0.0/8`) or a single address (`10.0.0.1`, taken as /32 or /128).
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    text.parse::<IpNet>()
        .map(|net| net.trunc())
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{text}` is not an address or CIDR like 10.0.0.0/8"))
}

#[cfg(test)]
mod tests;
