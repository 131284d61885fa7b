//! `[source.reconcile]`: asking the provider which events it sent. Checked
//! here, once: the listing's URL, its JSON pointers, the API key (held as a
//! [`Secret`]) and an event key that a listed copy shares with a delivery.

use std::time::Duration;

use serde::Deserialize;

use super::{Checker, ConfigError, SourceSection};
use crate::{
    duration::HumanDuration, event_key::EventKeySpec, event_key::FieldSpec, secret::Secret,
};

/// The table as users write it.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ReconcileSection {
    /// Stripe's `GET /v1/events`.
    Stripe {
        api_key_env: String,
        #[serde(default = "default_every")]
        every: HumanDuration,
        #[serde(default = "default_lookback")]
        lookback: HumanDuration,
        #[serde(default = "default_stripe_api_base")]
        api_base: String,
    },
    /// Any cursor-paged JSON list of events.
    HttpList {
        url: String,
        #[serde(default)]
        api_key_env: Option<String>,
        #[serde(default = "default_auth_header")]
        auth_header: String,
        #[serde(default = "default_auth_scheme")]
        auth_scheme: String,
        #[serde(default = "default_every")]
        every: HumanDuration,
        #[serde(default = "default_lookback")]
        lookback: HumanDuration,
        items: String,
        #[serde(default = "default_item_id")]
        item_id: String,
        #[serde(default)]
        next_cursor: Option<String>,
        #[serde(default = "default_cursor_param")]
        cursor_param: String,
        #[serde(default)]
        has_more: Option<String>,
        #[serde(default)]
        since_param: Option<String>,
    },
}

fn default_every() -> HumanDuration {
    HumanDuration::from_secs(600)
}

fn default_lookback() -> HumanDuration {
    HumanDuration::from_secs(3600)
}

fn default_stripe_api_base() -> String {
    "https://api.stripe.com".into()
}

fn default_auth_header() -> String {
    "Authorization".into()
}

fn default_auth_scheme() -> String {
    "Bearer".into()
}

fn default_item_id() -> String {
    "/id".into()
}

fn default_cursor_param() -> String {
    "starting_after".into()
}

/// A checked `[source.reconcile]`.
#[derive(Clone, Debug)]
pub struct Reconcile {
    /// `stripe` or `http-list`, for messages and the audit row.
    pub kind: &'static str,
    /// How often one worker runs it.
    pub every: Duration,
    /// How far before its cursor each run starts listing (and how far back
    /// the first run looks).
    pub lookback: Duration,
    pub listing: Listing,
}

/// How to page through the provider's list of events. Stripe's is one
/// instance of it.
#[derive(Clone, Debug)]
pub struct Listing {
    /// The first page, with any fixed query parameters (Stripe: `limit=100`).
    pub url: reqwest::Url,
    pub auth: Option<Auth>,
    /// JSON pointer to the array of events in a page.
    pub items: String,
    /// JSON pointer to an event's id, within the event.
    pub item_id: String,
    /// JSON pointer to the next page's cursor in a page; `None`: the last
    /// event's id is the cursor.
    pub next_cursor: Option<String>,
    /// The query parameter that carries the cursor.
    pub cursor_param: String,
    /// JSON pointer to a boolean saying whether more pages follow.
    pub has_more: Option<String>,
    /// The query parameter that asks for events created at or after a time
    /// (unix seconds); `None`: the whole list is read every run.
    pub since_param: Option<String>,
}

/// The API key and how the provider expects it.
#[derive(Clone, Debug)]
pub struct Auth {
    pub header: reqwest::header::HeaderName,
    /// Written before the key, with a space (`Bearer`); empty for none.
    pub scheme: String,
    pub key: Secret,
}

/// Stripe lists the events of the last 30 days.
const STRIPE_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why a body hash cannot be a reconciling source's key.
const BYTES_DIFFER: &str = "a reconciling source needs an event key that does not depend on the \
     delivered bytes: a listed copy is the provider's API serialisation of the event, not the bytes \
     of its webhook, so with body_sha256 a missed event and its listed copy (or a delivery that \
     arrives after it) would be stored as two events";

impl Checker<'_> {
    /// `None` when the source does not reconcile.
    pub(super) fn check_reconcile(
        &self,
        i: usize,
        section: &SourceSection,
    ) -> Result<Option<Reconcile>, ConfigError> {
        let Some(reconcile) = &section.reconcile else {
            return Ok(None);
        };
        let key = |field: &str| format!("source[{i}].reconcile.{field}");
        match (&section.event_key, reconcile) {
            (EventKeySpec::BodySha256, ReconcileSection::Stripe { .. }) => {
                return Err(self.error(
                    format!("source[{i}].event_key"),
                    format!("{BYTES_DIFFER}; use event_key = {{ json = [\"/id\"] }} (Stripe's event id)"),
                ));
            }
            (EventKeySpec::BodySha256, _) => {
                return Err(self.error(
                    format!("source[{i}].event_key"),
                    format!("{BYTES_DIFFER}; use {{ json = [\"/your/event/id\"] }}"),
                ));
            }
            (EventKeySpec::Header(_), _) => {
                return Err(self.error(
                    format!("source[{i}].event_key"),
                    "a reconciling source needs its event key from the JSON payload: listed events carry no headers",
                ));
            }
            (EventKeySpec::Json(pointers), ReconcileSection::Stripe { .. })
                if pointers.as_slice() != ["/id"] =>
            {
                return Err(self.error(
                    format!("source[{i}].event_key"),
                    "kind = \"stripe\" needs event_key = { json = [\"/id\"] }: Stripe's event id is \
                     the one value a delivery and the listed copy of the same event share",
                ));
            }
            _ => {}
        }
        let event_type = section
            .event_type
            .clone()
            .or_else(|| super::default_event_type(section.scheme));
        if let Some(FieldSpec::Header(_)) = event_type {
            return Err(self.error(
                format!("source[{i}].event_type"),
                "a reconciling source needs its event type from the JSON payload: listed events carry no headers",
            ));
        }
        let (every, lookback) = match reconcile {
            ReconcileSection::Stripe {
                every, lookback, ..
            }
            | ReconcileSection::HttpList {
                every, lookback, ..
            } => (every.0, lookback.0),
        };
        if every < Duration::from_secs(1) {
            return Err(self.error(key("every"), "must be at least 1s"));
        }
        if lookback.is_zero() {
            return Err(self.error(key("lookback"), "must be more than 0"));
        }
        let (kind, listing) = match reconcile {
            ReconcileSection::Stripe {
                api_key_env,
                api_base,
                ..
            } => {
                if lookback > STRIPE_RETENTION {
                    return Err(self.error(
                        key("lookback"),
                        "Stripe lists the events of the last 30 days only: use 30d or less",
                    ));
                }
                let base = api_base.trim_end_matches('/');
                let mut url = self.api_url(&key("api_base"), &format!("{base}/v1/events"))?;
                url.query_pairs_mut().append_pair("limit", "100");
                let listing = Listing {
                    url,
                    auth: Some(Auth {
                        header: reqwest::header::AUTHORIZATION,
                        scheme: "Bearer".into(),
                        key: self.api_key(&key("api_key_env"), api_key_env)?,
                    }),
                    items: "/data".into(),
                    item_id: "/id".into(),
                    next_cursor: None,
                    cursor_param: "starting_after".into(),
                    has_more: Some("/has_more".into()),
                    since_param: Some("created[gte]".into()),
                };
                ("stripe", listing)
            }
            ReconcileSection::HttpList {
                url,
                api_key_env,
                auth_header,
                auth_scheme,
                items,
                item_id,
                next_cursor,
                cursor_param,
                has_more,
                since_param,
                ..
            } => {
                for (field, pointer) in [
                    ("items", Some(items)),
                    ("item_id", Some(item_id)),
                    ("next_cursor", next_cursor.as_ref()),
                    ("has_more", has_more.as_ref()),
                ] {
                    if let Some(pointer) = pointer {
                        if !(pointer.is_empty() || pointer.starts_with('/')) {
                            return Err(self.error(
                                key(field),
                                "must be a JSON pointer such as \"/data\" (or \"\" for the whole document)",
                            ));
                        }
                    }
                }
                for (field, param) in [
                    ("cursor_param", Some(cursor_param)),
                    ("since_param", since_param.as_ref()),
                ] {
                    if param.is_some_and(|p| p.is_empty()) {
                        return Err(self.error(key(field), "must name a query parameter"));
                    }
                }
                let auth = match api_key_env {
                    None => None,
                    Some(var) => Some(Auth {
                        header: reqwest::header::HeaderName::from_bytes(auth_header.as_bytes())
                            .map_err(|_| self.error(key("auth_header"), "is not a header name"))?,
                        scheme: auth_scheme.trim().to_owned(),
                        key: self.api_key(&key("api_key_env"), var)?,
                    }),
                };
                let listing = Listing {
                    url: self.api_url(&key("url"), url)?,
                    auth,
                    items: items.clone(),
                    item_id: item_id.clone(),
                    next_cursor: next_cursor.clone(),
                    cursor_param: cursor_param.clone(),
                    has_more: has_more.clone(),
                    since_param: since_param.clone(),
                };
                ("http-list", listing)
            }
        };
        Ok(Some(Reconcile {
            kind,
            every,
            lookback,
            listing,
        }))
    }

    /// An API key travels in a header: https only, except to this machine
    /// (a local test server or a proxy on loopback).
    fn api_url(&self, key: &str, text: &str) -> Result<reqwest::Url, ConfigError> {
        let url = reqwest::Url::parse(text)
            .map_err(|e| self.error(key, format!("`{text}` is not a URL: {e}")))?;
        let host = url.host_str().unwrap_or_default();
        let loopback = host == "localhost"
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        match url.scheme() {
            "https" => Ok(url),
            "http" if loopback => Ok(url),
            "http" => Err(self.error(
                key,
                "must be https:// (the API key would travel in clear text); plain http is allowed to loopback addresses only",
            )),
            _ => Err(self.error(key, "must be an https:// URL")),
        }
    }

    fn api_key(&self, key: &str, var: &str) -> Result<Secret, ConfigError> {
        match self.env.var(var) {
            Some(value) if !value.trim().is_empty() => Ok(Secret::new(value.trim().as_bytes())),
            Some(_) => Err(self.error(key, format!("environment variable {var} is empty"))),
            None => Err(self.error(key, format!("environment variable {var} is not set"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, path::Path};

    use crate::config::{Config, ConfigError};

    const STRIPE: &str = r#"
[[source]]
name = "stripe"
environment = "sandbox"
scheme = "stripe"
secrets_env = ["STRIPE_WEBHOOK_SECRET"]
event_key = { json = ["/id"] }

[source.reconcile]
kind = "stripe"
api_key_env = "STRIPE_API_KEY"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let env: BTreeMap<String, String> = [
            ("STRIPE_WEBHOOK_SECRET", "whsec_reconcile-test-secret-0001"),
            ("STRIPE_API_KEY", "sk_test_123"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        Config::parse(text, Path::new("hookbox.toml"), &env)
    }

    #[test]
    fn a_stripe_source_reconciles_with_the_published_defaults() {
        let config = parse(STRIPE).unwrap();
        let reconcile = config.sources[0].reconcile.as_ref().unwrap();
        assert_eq!(reconcile.kind, "stripe");
        assert_eq!(reconcile.every.as_secs(), 600);
        assert_eq!(
            reconcile.listing.url.as_str(),
            "https://api.stripe.com/v1/events?limit=100"
        );
        assert!(!format!("{config:?}").contains("sk_test_123"));
    }

    #[test]
    fn a_body_hash_key_is_refused_with_the_reason() {
        let text = STRIPE.replace("event_key = { json = [\"/id\"] }\n", "");
        let error = parse(&text).unwrap_err();
        assert_eq!(error.key, "source[0].event_key");
        assert!(error
            .message
            .contains("does not depend on the delivered bytes"));
        assert!(error.message.contains("{ json = [\"/id\"] }"));
    }

    #[test]
    fn stripe_needs_the_event_id_as_key() {
        let text = STRIPE.replace("[\"/id\"]", "[\"/data/object/id\"]");
        assert_eq!(parse(&text).unwrap_err().key, "source[0].event_key");
    }

    #[test]
    fn the_api_key_variable_must_be_set_and_is_named() {
        let text = STRIPE.replace("STRIPE_API_KEY", "MISSING_KEY");
        let error = parse(&text).unwrap_err();
        assert_eq!(error.key, "source[0].reconcile.api_key_env");
        assert!(error.message.contains("MISSING_KEY"));
    }

    #[test]
    fn an_api_key_never_travels_over_plain_http_beyond_loopback() {
        let remote = format!("{STRIPE}api_base = \"http://api.example.com\"\n");
        assert_eq!(
            parse(&remote).unwrap_err().key,
            "source[0].reconcile.api_base"
        );
        let local = format!("{STRIPE}api_base = \"http://127.0.0.1:4010/\"\n");
        let config = parse(&local).unwrap();
        assert_eq!(
            config.sources[0]
                .reconcile
                .as_ref()
                .unwrap()
                .listing
                .url
                .as_str(),
            "http://127.0.0.1:4010/v1/events?limit=100"
        );
    }

    #[test]
    fn an_http_list_is_configured_by_pointers() {
        let text = r#"
[[source]]
name = "shop"
environment = "sandbox"
scheme = "github"
secrets_env = ["STRIPE_WEBHOOK_SECRET"]
event_key = { json = ["/delivery_id"] }
event_type = { json = "/action" }

[source.reconcile]
kind = "http-list"
url = "https://api.example.com/v2/deliveries?per_page=50"
api_key_env = "STRIPE_API_KEY"
auth_header = "X-Api-Key"
auth_scheme = ""
items = "/deliveries"
item_id = "/delivery_id"
next_cursor = "/next"
cursor_param = "cursor"
since_param = "since"
"#;
        let config = parse(text).unwrap();
        let listing = &config.sources[0].reconcile.as_ref().unwrap().listing;
        assert_eq!(listing.items, "/deliveries");
        assert_eq!(listing.auth.as_ref().unwrap().header.as_str(), "x-api-key");
        let header_key = text.replace(
            "event_type = { json = \"/action\" }",
            "event_type = { header = \"X-Event\" }",
        );
        assert_eq!(parse(&header_key).unwrap_err().key, "source[0].event_type");
        let bad_pointer = text.replace("items = \"/deliveries\"", "items = \"deliveries\"");
        assert_eq!(
            parse(&bad_pointer).unwrap_err().key,
            "source[0].reconcile.items"
        );
    }
}
