//! The operators' sections: `[console]` (the web console's tokens) and
//! `[[alert]]` (what to watch and whom to tell). Checked here, once, into
//! typed values; the console and the alert evaluator never see raw text.

use std::{net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use serde::Deserialize;

use super::{read_secret_file, Checker, ConfigError};
use crate::{duration::HumanDuration, secret::Secret};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSection {
    #[serde(default = "default_console_listen")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub tokens: Vec<ConsoleTokenSection>,
    /// How long a browser stays logged in.
    #[serde(default = "default_session")]
    pub session: HumanDuration,
}

fn default_console_listen() -> SocketAddr {
    "127.0.0.1:8088".parse().expect("valid address")
}

fn default_session() -> HumanDuration {
    HumanDuration::from_secs(8 * 3600)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleTokenSection {
    pub name: String,
    #[serde(default)]
    pub token_env: Option<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Present only to refuse an inline token with a helpful message.
    #[serde(default)]
    pub token: Option<toml::Value>,
    pub role: Role,
}

/// What a console token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads every page.
    Viewer,
    /// Also replays (and, later, pauses and skips).
    Operator,
}

/// A checked `[console]` section.
#[derive(Clone, Debug)]
pub struct ConsoleConfig {
    pub listen: SocketAddr,
    pub tokens: Vec<ConsoleToken>,
    pub session: Duration,
}

#[derive(Clone, Debug)]
pub struct ConsoleToken {
    /// Recorded as the actor of every action taken with this token.
    pub name: String,
    pub token: Secret,
    pub role: Role,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertingSection {
    /// How often the elected worker evaluates every alert.
    #[serde(default = "default_evaluate_every")]
    pub evaluate_every: HumanDuration,
}

impl Default for AlertingSection {
    fn default() -> Self {
        Self {
            evaluate_every: default_evaluate_every(),
        }
    }
}

fn default_evaluate_every() -> HumanDuration {
    HumanDuration::from_secs(30)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertSection {
    pub name: String,
    pub when: String,
    #[serde(default)]
    pub source: Option<String>,
    pub notify: NotifySection,
    #[serde(default = "default_alert_every")]
    pub every: HumanDuration,
}

fn default_alert_every() -> HumanDuration {
    HumanDuration::from_secs(15 * 60)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySection {
    pub url_env: String,
    #[serde(default)]
    pub format: NotifyFormat,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyFormat {
    #[default]
    Json,
    Slack,
}

/// What an alert watches, parsed from `when`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Condition {
    /// Any event is `dead`.
    Dead,
    /// The oldest due event has waited longer than this.
    OldestDueAge(Duration),
    /// Failed attempts / finished attempts over the window exceed the ratio.
    FailureRate { above: f64, over: Duration },
    /// Deliveries refused for their signature over the window exceed the count.
    SignatureFailures { above: u64, over: Duration },
    /// Any delivery signed with another environment's key since the last round.
    WrongEnvironment,
    /// Reconciliation imported more than this many events the inbox lacked
    /// (over the alert's `every`): deliveries were lost, an outage nobody saw.
    ReconciledMissing { above: u64 },
}

impl FromStr for Condition {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let duration = |word: &str| word.parse::<HumanDuration>().map(|d| d.0);
        let positive = |d: Duration| {
            if d.is_zero() {
                Err("the window must be longer than 0".to_owned())
            } else {
                Ok(d)
            }
        };
        match words.as_slice() {
            ["dead"] => Ok(Self::Dead),
            ["wrong_environment"] => Ok(Self::WrongEnvironment),
            ["oldest_due_age", ">", age] => Ok(Self::OldestDueAge(duration(age)?)),
            ["failure_rate", ">", ratio, "over", window] => {
                let above: f64 = ratio
                    .parse()
                    .map_err(|_| format!("`{ratio}` is not a ratio like 0.2"))?;
                if !(0.0..1.0).contains(&above) {
                    return Err(format!("`{ratio}`: a failure rate is between 0 and 1"));
                }
                Ok(Self::FailureRate {
                    above,
                    over: positive(duration(window)?)?,
                })
            }
            ["reconciled_missing", ">", count] => Ok(Self::ReconciledMissing {
                above: count
                    .parse()
                    .map_err(|_| format!("`{count}` is not a whole number"))?,
            }),
            ["signature_failures", ">", count, "over", window] => Ok(Self::SignatureFailures {
                above: count
                    .parse()
                    .map_err(|_| format!("`{count}` is not a whole number"))?,
                over: positive(duration(window)?)?,
            }),
            _ => Err(format!(
                "`{text}` is not a condition: write \"dead\", \"oldest_due_age > 10m\", \
                 \"failure_rate > 0.2 over 5m\", \"signature_failures > 20 over 1m\", \"wrong_environment\" or \"reconciled_missing > 0\""
            )),
        }
    }
}

/// A checked `[[alert]]`.
#[derive(Clone, Debug)]
pub struct AlertConfig {
    pub name: String,
    /// As written, for notifications and the console.
    pub when: String,
    pub condition: Condition,
    pub source: Option<String>,
    /// Webhook URLs (Slack's above all) are credentials: kept redacted.
    pub url: Secret,
    pub format: NotifyFormat,
    pub every: Duration,
}

impl Checker<'_> {
    pub(super) fn check_console(
        &self,
        section: Option<ConsoleSection>,
    ) -> Result<Option<ConsoleConfig>, ConfigError> {
        let Some(section) = section else {
            return Ok(None);
        };
        let mut tokens: Vec<ConsoleToken> = Vec::new();
        for (i, entry) in section.tokens.into_iter().enumerate() {
            let key = |field: &str| format!("console.tokens[{i}].{field}");
            if entry.name.is_empty() || entry.name.chars().any(char::is_control) {
                return Err(self.error(
                    key("name"),
                    "must be a non-empty name (it is recorded as the actor)",
                ));
            }
            if tokens.iter().any(|t| t.name == entry.name) {
                return Err(self.error(
                    key("name"),
                    format!("token \"{}\" is defined twice", entry.name),
                ));
            }
            if entry.token.is_some() {
                return Err(self.error(
                    key("token"),
                    "tokens are never written in the file: use token_env = \"VAR\" or token_file = \"/path\"",
                ));
            }
            let value = match (&entry.token_env, &entry.token_file) {
                (Some(var), None) => {
                    self.env.var(var).filter(|v| !v.is_empty()).ok_or_else(|| {
                        self.error(
                            key("token_env"),
                            format!("environment variable {var} is not set"),
                        )
                    })?
                }
                (None, Some(path)) => {
                    read_secret_file(path).map_err(|m| self.error(key("token_file"), m))?
                }
                _ => {
                    return Err(self.error(
                        key("token_env"),
                        "give exactly one of token_env or token_file",
                    ))
                }
            };
            if value.trim().len() < 16 {
                return Err(self.error(
                    key("token_env"),
                    "the token must be at least 16 characters (e.g. `openssl rand -hex 24`)",
                ));
            }
            let token = Secret::new(value.trim().as_bytes().to_vec());
            if tokens.iter().any(|t| t.token == token) {
                return Err(self.error(key("token_env"), "two tokens share one value"));
            }
            tokens.push(ConsoleToken {
                name: entry.name,
                token,
                role: entry.role,
            });
        }
        if tokens.is_empty() {
            return Err(self.error(
                "console.tokens",
                "name at least one token: the console serves nothing without one",
            ));
        }
        if section.session.0 < Duration::from_secs(60) {
            return Err(self.error("console.session", "must be at least 1m"));
        }
        Ok(Some(ConsoleConfig {
            listen: section.listen,
            tokens,
            session: section.session.0,
        }))
    }

    pub(super) fn check_alerts(
        &self,
        sections: Vec<AlertSection>,
        sources: &[super::Source],
        alerting: &AlertingSection,
    ) -> Result<Vec<AlertConfig>, ConfigError> {
        if alerting.evaluate_every.0 < Duration::from_millis(100) {
            return Err(self.error("alerting.evaluate_every", "must be at least 100ms"));
        }
        let mut alerts: Vec<AlertConfig> = Vec::new();
        for (i, section) in sections.into_iter().enumerate() {
            let key = |field: &str| format!("alert[{i}].{field}");
            if section.name.is_empty() || section.name.chars().any(char::is_control) {
                return Err(self.error(key("name"), "must be a non-empty name"));
            }
            if alerts.iter().any(|a| a.name == section.name) {
                return Err(self.error(
                    key("name"),
                    format!("alert \"{}\" is defined twice", section.name),
                ));
            }
            let condition: Condition = section
                .when
                .parse()
                .map_err(|m| self.error(key("when"), m))?;
            if let Some(source) = &section.source {
                if !sources.iter().any(|s| &s.name == source) {
                    return Err(self.error(
                        key("source"),
                        format!("no [[source]] is named \"{source}\""),
                    ));
                }
            }
            let var = &section.notify.url_env;
            let url = self.env.var(var).filter(|v| !v.is_empty()).ok_or_else(|| {
                self.error(
                    key("notify.url_env"),
                    format!("environment variable {var} is not set"),
                )
            })?;
            match reqwest::Url::parse(&url) {
                Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => {}
                // The URL itself may be a credential: it is never echoed.
                _ => {
                    return Err(self.error(
                        key("notify.url_env"),
                        format!("{var} must hold an http:// or https:// URL"),
                    ))
                }
            }
            if section.every.0 < Duration::from_secs(1) {
                return Err(self.error(key("every"), "must be at least 1s"));
            }
            alerts.push(AlertConfig {
                name: section.name,
                when: section
                    .when
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
                condition,
                source: section.source,
                url: Secret::new(url.into_bytes()),
                format: section.notify.format,
                every: section.every.0,
            });
        }
        Ok(alerts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_condition_the_spec_names_parses() {
        assert_eq!("dead".parse(), Ok(Condition::Dead));
        assert_eq!("wrong_environment".parse(), Ok(Condition::WrongEnvironment));
        assert_eq!(
            "reconciled_missing > 0".parse(),
            Ok(Condition::ReconciledMissing { above: 0 })
        );
        assert_eq!(
            "oldest_due_age > 10m".parse(),
            Ok(Condition::OldestDueAge(Duration::from_secs(600)))
        );
        assert_eq!(
            "failure_rate > 0.2 over 5m".parse(),
            Ok(Condition::FailureRate {
                above: 0.2,
                over: Duration::from_secs(300)
            })
        );
        assert_eq!(
            "signature_failures > 20 over 1m".parse(),
            Ok(Condition::SignatureFailures {
                above: 20,
                over: Duration::from_secs(60)
            })
        );
    }

    #[test]
    fn malformed_conditions_are_refused() {
        for text in [
            "",
            "deadish",
            "oldest_due_age 10m",
            "failure_rate > 2 over 5m",
            "failure_rate > 0.2 over 0s",
            "signature_failures > -1 over 1m",
        ] {
            assert!(text.parse::<Condition>().is_err(), "{text} was accepted");
        }
    }
}
