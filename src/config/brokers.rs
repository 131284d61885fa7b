//! `[handler.NAME]` tables that forward events to a message broker:
//! `kind = "nats"`, `"amqp"` and `"redis"`. Checked here once; the worker
//! receives a [`BrokerConfig`] with the URL resolved and held as a secret.

use std::time::Duration;

use serde::Deserialize;

use super::{Checker, ConfigError, HandlerSection};
use crate::{duration::HumanDuration, secret::Secret};

/// `kind = "nats"`: JetStream publish to `subject`, waiting for the stream's ack.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSection {
    /// A URL without credentials (`nats://host:4222`, `tls://host:4222`).
    #[serde(default)]
    pub url: Option<String>,
    /// Or the environment variable holding the URL, credentials included.
    #[serde(default)]
    pub url_env: Option<String>,
    pub subject: String,
    #[serde(default = "default_broker_timeout")]
    pub timeout: HumanDuration,
}

/// `kind = "amqp"`: a persistent publish to `exchange` with publisher confirms.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSection {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub url_env: Option<String>,
    pub exchange: String,
    #[serde(default)]
    pub routing_key: String,
    #[serde(default = "default_broker_timeout")]
    pub timeout: HumanDuration,
}

/// `kind = "redis"`: `XADD` to `stream`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSection {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub url_env: Option<String>,
    pub stream: String,
    /// Trims the stream to about this many entries (`XADD … MAXLEN ~ n`).
    #[serde(default)]
    pub max_len: Option<u64>,
    #[serde(default = "default_broker_timeout")]
    pub timeout: HumanDuration,
}

/// Publishing is quick when the broker is well; a broker that does not
/// confirm within this long is treated as unavailable and the event retried.
fn default_broker_timeout() -> HumanDuration {
    HumanDuration::from_secs(10)
}

/// A broker handler, checked: where to connect, where to publish, how long
/// connecting, publishing and confirming may take together.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// May carry credentials: never logged, never in an error message.
    pub url: Secret,
    pub timeout: Duration,
    pub target: BrokerTarget,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerTarget {
    Nats {
        subject: String,
    },
    Amqp {
        exchange: String,
        routing_key: String,
    },
    Redis {
        stream: String,
        max_len: Option<u64>,
    },
}

impl BrokerConfig {
    /// The URL as text (it was checked to be UTF-8 at load).
    pub fn url(&self) -> &str {
        std::str::from_utf8(self.url.expose()).expect("checked at load")
    }
}

impl Checker<'_> {
    /// `Some` for the broker kinds, `None` for the others.
    pub(super) fn check_broker(
        &self,
        name: &str,
        section: &HandlerSection,
    ) -> Result<Option<BrokerConfig>, ConfigError> {
        let key = |field: &str| format!("handler.{name}.{field}");
        let (url, url_env, timeout, schemes, target) = match section {
            HandlerSection::Nats(s) => {
                let subject = s.subject.trim();
                if subject.is_empty() || subject.contains(char::is_whitespace) {
                    return Err(self.error(
                        key("subject"),
                        "name the subject to publish to, without spaces, e.g. \"hookbox.events\"",
                    ));
                }
                if subject.contains(['*', '>']) {
                    return Err(self.error(
                        key("subject"),
                        "a publish subject cannot contain the wildcards * or >",
                    ));
                }
                let target = BrokerTarget::Nats {
                    subject: subject.to_owned(),
                };
                (&s.url, &s.url_env, s.timeout, &["nats", "tls"][..], target)
            }
            HandlerSection::Amqp(s) => {
                if s.exchange.trim().is_empty() {
                    return Err(self.error(
                        key("exchange"),
                        "name the exchange to publish to (the default exchange \"\" is not used)",
                    ));
                }
                let target = BrokerTarget::Amqp {
                    exchange: s.exchange.clone(),
                    routing_key: s.routing_key.clone(),
                };
                (
                    &s.url,
                    &s.url_env,
                    s.timeout,
                    &["amqp", "amqps"][..],
                    target,
                )
            }
            HandlerSection::Redis(s) => {
                if s.stream.trim().is_empty() {
                    return Err(self.error(key("stream"), "name the stream to XADD to"));
                }
                if s.max_len == Some(0) {
                    return Err(self.error(
                        key("max_len"),
                        "must be at least 1 (leave it out to keep every entry)",
                    ));
                }
                let target = BrokerTarget::Redis {
                    stream: s.stream.clone(),
                    max_len: s.max_len,
                };
                (
                    &s.url,
                    &s.url_env,
                    s.timeout,
                    &["redis", "rediss"][..],
                    target,
                )
            }
            _ => return Ok(None),
        };
        if timeout.0 < Duration::from_millis(10) {
            return Err(self.error(key("timeout"), "must be at least 10ms"));
        }
        let url = self.broker_url(name, url, url_env, schemes)?;
        Ok(Some(BrokerConfig {
            url,
            timeout: timeout.0,
            target,
        }))
    }

    /// The URL from the file (no credentials allowed there) or from the
    /// variable `url_env` names. Messages never repeat the URL itself.
    fn broker_url(
        &self,
        name: &str,
        url: &Option<String>,
        url_env: &Option<String>,
        schemes: &[&str],
    ) -> Result<Secret, ConfigError> {
        let key = |field: &str| format!("handler.{name}.{field}");
        let (field, text, from_file) = match (url, url_env) {
            (Some(_), Some(_)) => {
                return Err(self.error(key("url"), "give url or url_env, not both"));
            }
            (None, None) => {
                return Err(self.error(
                    key("url"),
                    format!(
                        "name the broker: url = \"{}://host\", or url_env = \"VAR\" when the URL carries credentials",
                        schemes[0]
                    ),
                ));
            }
            (Some(url), None) => ("url", url.clone(), true),
            (None, Some(var)) => {
                let value = self.env.var(var).filter(|v| !v.is_empty()).ok_or_else(|| {
                    self.error(
                        key("url_env"),
                        format!("environment variable {var} is not set"),
                    )
                })?;
                ("url_env", value, false)
            }
        };
        let parsed = reqwest::Url::parse(text.trim())
            .map_err(|e| self.error(key(field), format!("not a URL: {e}")))?;
        if !schemes.contains(&parsed.scheme()) {
            return Err(self.error(
                key(field),
                format!("must be a {} URL", schemes.join(":// or ") + "://"),
            ));
        }
        if parsed.host_str().unwrap_or_default().is_empty() {
            return Err(self.error(key(field), "the URL names no host"));
        }
        if from_file && (!parsed.username().is_empty() || parsed.password().is_some()) {
            return Err(self.error(
                key("url"),
                "credentials are never written in the file: put the whole URL in an environment \
                 variable and name it with url_env = \"VAR\"",
            ));
        }
        Ok(Secret::new(text.trim().as_bytes().to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, path::Path};

    use super::*;
    use crate::config::Config;

    fn parse(handler: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::parse(
            &format!("[handler.out]\n{handler}"),
            Path::new("hookbox.toml"),
            &env,
        )
    }

    fn broker(config: &Config) -> &BrokerConfig {
        config.handlers["out"]
            .broker
            .as_ref()
            .expect("a broker handler")
    }

    fn refused(handler: &str, env: &[(&str, &str)]) -> String {
        parse(handler, env).expect_err("refused").to_string()
    }

    #[test]
    fn each_kind_is_read_with_its_target_and_a_ten_second_timeout_by_default() {
        let nats = parse(
            "kind = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nsubject = \"hooks.in\"",
            &[],
        )
        .unwrap();
        assert_eq!(
            broker(&nats).target,
            BrokerTarget::Nats {
                subject: "hooks.in".into()
            }
        );
        assert_eq!(broker(&nats).timeout, Duration::from_secs(10));
        assert_eq!(broker(&nats).url(), "nats://127.0.0.1:4222");

        let amqp = parse(
            "kind = \"amqp\"\nurl_env = \"AMQP_URL\"\nexchange = \"hooks\"\nrouting_key = \"begini\"\ntimeout = \"2s\"",
            &[("AMQP_URL", "amqp://app:pw@rabbit:5672/%2f")],
        )
        .unwrap();
        assert_eq!(
            broker(&amqp).target,
            BrokerTarget::Amqp {
                exchange: "hooks".into(),
                routing_key: "begini".into()
            }
        );
        assert_eq!(broker(&amqp).timeout, Duration::from_secs(2));

        let redis = parse("kind = \"redis\"\nurl = \"redis://127.0.0.1:6379/0\"\nstream = \"hooks\"\nmax_len = 1000", &[]).unwrap();
        assert_eq!(
            broker(&redis).target,
            BrokerTarget::Redis {
                stream: "hooks".into(),
                max_len: Some(1000)
            }
        );
    }

    #[test]
    fn credentials_in_the_file_are_refused_and_never_repeated() {
        let message = refused(
            "kind = \"amqp\"\nurl = \"amqp://app:hunter2@rabbit/%2f\"\nexchange = \"hooks\"",
            &[],
        );
        assert!(message.contains("handler.out.url"), "{message}");
        assert!(message.contains("url_env"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
        let token = refused(
            "kind = \"nats\"\nurl = \"nats://s3cret@nats:4222\"\nsubject = \"a\"",
            &[],
        );
        assert!(token.contains("credentials"), "{token}");
    }

    #[test]
    fn a_url_from_the_environment_may_carry_credentials_and_is_redacted() {
        let config = parse(
            "kind = \"redis\"\nurl_env = \"REDIS_URL\"\nstream = \"hooks\"",
            &[("REDIS_URL", "rediss://:hunter2@cache:6380")],
        )
        .unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
        assert_eq!(broker(&config).url(), "rediss://:hunter2@cache:6380");
    }

    #[test]
    fn mistakes_name_the_key() {
        let cases = [
            (
                "kind = \"nats\"\nsubject = \"a\"",
                &[][..],
                "handler.out.url: name the broker",
            ),
            (
                "kind = \"nats\"\nurl = \"nats://a\"\nurl_env = \"X\"\nsubject = \"a\"",
                &[],
                "handler.out.url: give url or url_env, not both",
            ),
            (
                "kind = \"nats\"\nurl_env = \"NATS_URL\"\nsubject = \"a\"",
                &[],
                "handler.out.url_env: environment variable NATS_URL is not set",
            ),
            (
                "kind = \"nats\"\nurl = \"http://a\"\nsubject = \"a\"",
                &[],
                "must be a nats:// or tls:// URL",
            ),
            (
                "kind = \"nats\"\nurl = \"nats://a\"\nsubject = \"\"",
                &[],
                "handler.out.subject",
            ),
            (
                "kind = \"nats\"\nurl = \"nats://a\"\nsubject = \"a.*\"",
                &[],
                "wildcards",
            ),
            (
                "kind = \"amqp\"\nurl = \"amqp://a\"\nexchange = \" \"",
                &[],
                "handler.out.exchange",
            ),
            (
                "kind = \"amqp\"\nurl = \"redis://a\"\nexchange = \"x\"",
                &[],
                "amqp:// or amqps://",
            ),
            (
                "kind = \"redis\"\nurl = \"redis://a\"\nstream = \"\"",
                &[],
                "handler.out.stream",
            ),
            (
                "kind = \"redis\"\nurl = \"redis://a\"\nstream = \"s\"\nmax_len = 0",
                &[],
                "handler.out.max_len",
            ),
            (
                "kind = \"redis\"\nurl = \"not a url\"\nstream = \"s\"",
                &[],
                "handler.out.url: not a URL",
            ),
            (
                "kind = \"redis\"\nurl = \"redis://a\"\nstream = \"s\"\ntimeout = \"0s\"",
                &[],
                "handler.out.timeout",
            ),
            (
                "kind = \"redis\"\nurl = \"redis://a\"\nstream = \"s\"\nsubject = \"x\"",
                &[],
                "unknown field `subject`",
            ),
            (
                "kind = \"amqp\"\nurl = \"amqp://a\"",
                &[],
                "missing field `exchange`",
            ),
        ];
        for (handler, env, expected) in cases {
            let message = refused(handler, env);
            assert!(message.contains(expected), "{handler:?}: {message}");
        }
    }
}
