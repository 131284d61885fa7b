//! Where an event's unique key and its type come from: the body's hash, JSON
//! pointers into the payload, or a header.

use serde::{de, Deserialize, Deserializer};
use sha2::{Digest, Sha256};

use crate::headers::HeaderLookup;

/// How a source derives the key that makes an event unique within it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKeySpec {
    /// Hex SHA-256 of the raw body: identical bytes are the same event.
    BodySha256,
    /// Values at these JSON pointers, joined with `:` (each escaped so the
    /// join cannot be ambiguous).
    Json(Vec<String>),
    /// The value of one header, such as `webhook-id`.
    Header(String),
}

/// Where a single field (the event type) is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldSpec {
    Json(String),
    Header(String),
}

/// Why a key or type could not be extracted: a 400 for the sender.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    #[error("payload is not valid JSON")]
    NotJson,
    #[error("event key field {0} is missing")]
    MissingJsonField(String),
    #[error("event key header {0} is missing")]
    MissingHeader(String),
    #[error("event key header {0} is not valid UTF-8")]
    BadHeader(String),
    #[error("ordering key field {0} is missing")]
    MissingOrderingKey(String),
    #[error("order_by field {0} is missing or not a time (integer seconds or RFC 3339)")]
    BadOrderBy(String),
    #[error("the event key is longer than {MAX_EVENT_KEY_BYTES} bytes")]
    KeyTooLong,
    #[error("the {0} contains a NUL character")]
    NulCharacter(&'static str),
}

/// The longest event key stored. PostgreSQL cannot index much more than 2.7 KB
/// in one row of the unique key; real senders' ids are far shorter, so a longer
/// key is refused with `400` rather than hashed into something the sender
/// would not recognise.
pub const MAX_EVENT_KEY_BYTES: usize = 1024;

impl ExtractError {
    /// The `reason` recorded in `inbox_deliveries`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotJson => "invalid_json",
            Self::MissingJsonField(_) | Self::MissingHeader(_) => "missing_event_key",
            Self::MissingOrderingKey(_) => "missing_ordering_key",
            Self::BadOrderBy(_) => "invalid_order_by",
            Self::BadHeader(_) | Self::NulCharacter(_) => "invalid_event_key",
            Self::KeyTooLong => "event_key_too_long",
        }
    }
}

/// What the inbox stores about a payload besides its bytes.
#[derive(Clone, Debug)]
pub struct EventFields<'a> {
    pub event_key: String,
    pub event_type: Option<String>,
    /// The payload as JSON text, when it is JSON PostgreSQL's `jsonb` can hold
    /// (it cannot hold `\u0000`; such payloads keep their bytes only).
    pub json_text: Option<&'a str>,
    /// Where it stands among its source's events, for a source with an `ordering_key`.
    pub ordering: Option<EventOrdering>,
}

/// How a source orders its events (`ordering_key`, `order_by`, `on_dead`, `stale`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderingSpec {
    /// Events with the same key run one at a time, in order.
    pub key: EventKeySpec,
    /// The sender's time (a JSON pointer to integer seconds or RFC 3339);
    /// `None`: the order received.
    pub order_by: Option<String>,
    /// `on_dead = "block"`: a dead event holds back the rest of its key.
    pub dead_blocks: bool,
    /// `stale = "skip"`: an event older than one already finished ends `skipped`.
    pub skip_if_stale: bool,
}

/// An ordered event's place, as stored with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventOrdering {
    pub key: String,
    /// The sender's time; `None`: the time it is stored.
    pub ordered_at: Option<chrono::DateTime<chrono::Utc>>,
    pub dead_blocks: bool,
    pub skip_if_stale: bool,
}

impl OrderingSpec {
    pub fn needs_json(&self) -> bool {
        self.key.needs_json() || self.order_by.is_some()
    }

    /// The event's key and time; a missing key or time is the sender's error (a 400).
    pub fn extract(
        &self,
        json: Option<&serde_json::Value>,
        headers: &(impl HeaderLookup + ?Sized),
    ) -> Result<EventOrdering, ExtractError> {
        let key = self
            .key
            .extract("", json, headers)
            .map_err(|error| match error {
                ExtractError::MissingJsonField(field) | ExtractError::MissingHeader(field) => {
                    ExtractError::MissingOrderingKey(field)
                }
                other => other,
            })?;
        let ordered_at = match &self.order_by {
            None => None,
            Some(pointer) => Some(
                json.and_then(|json| json.pointer(pointer))
                    .and_then(sender_time)
                    .ok_or_else(|| ExtractError::BadOrderBy(pointer.clone()))?,
            ),
        };
        Ok(EventOrdering {
            key,
            ordered_at,
            dead_blocks: self.dead_blocks,
            skip_if_stale: self.skip_if_stale,
        })
    }
}

/// Integer (or fractional) seconds since the epoch, or an RFC 3339 time.
fn sender_time(value: &serde_json::Value) -> Option<chrono::DateTime<chrono::Utc>> {
    match value {
        serde_json::Value::Number(n) => {
            let seconds = n.as_f64()?;
            chrono::DateTime::from_timestamp_micros((seconds * 1e6).round() as i64)
        }
        serde_json::Value::String(text) => chrono::DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc)),
        _ => None,
    }
}

/// Whether every number in `json` (valid JSON) fits PostgreSQL's `numeric`,
/// which `jsonb` stores numbers as: at most 16,383 digits after the point and
/// about 131,000 before it. serde_json reads `1e-20000` as 0.0, but
/// PostgreSQL refuses it ("value overflows numeric format"), and a stored
/// payload that `jsonb` cannot hold would fail every query of its
/// `payload_json`. Also whether the numbers, printed in full as `jsonb`
/// prints them, stay within 16 times the payload's length (and 64 KiB):
/// `0e-16383` fits, but prints as 16,385 characters, and 66,000 of them in a
/// 600 KB payload would take a query reading `payload_json` past 1 GB.
/// Conservative: a number near the limits counts as not fitting, and its
/// payload keeps its bytes only.
fn numbers_fit_numeric(json: &str) -> bool {
    const MOST_SCALE: i64 = 16_383;
    const MOST_WHOLE_DIGITS: i64 = 131_000;
    let most_printed = 16 * json.len() as i64 + 65_536;
    let mut printed = 0;
    let bytes = json.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                // Skip the string, escapes included.
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len()
                    && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                let number = &json[start..i];
                let (mantissa, exponent) = match number.find(['e', 'E']) {
                    Some(at) => (
                        &number[..at],
                        number[at + 1..].parse::<i64>().unwrap_or(i64::MAX),
                    ),
                    None => (number, 0),
                };
                let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
                let whole_digits = whole.trim_start_matches('-').len() as i64;
                let fraction_digits = fraction.len() as i64;
                if exponent.unsigned_abs() > 1_000_000
                    || fraction_digits - exponent > MOST_SCALE
                    || whole_digits + exponent > MOST_WHOLE_DIGITS
                {
                    return false;
                }
                printed +=
                    (whole_digits + exponent).max(1) + (fraction_digits - exponent).max(0) + 2;
                if printed > most_printed {
                    return false;
                }
            }
            _ => i += 1,
        }
    }
    true
}

impl<'a> EventFields<'a> {
    /// Derives key, type and JSON text the same way for every way in (HTTP
    /// delivery or import).
    pub fn extract(
        key: &EventKeySpec,
        kind: Option<&FieldSpec>,
        ordering: Option<&OrderingSpec>,
        payload: &'a [u8],
        payload_sha256: &str,
        headers: &(impl HeaderLookup + ?Sized),
    ) -> Result<Self, ExtractError> {
        let json: Option<serde_json::Value> = serde_json::from_slice(payload).ok();
        if json.is_none()
            && (key.needs_json()
                || kind.is_some_and(FieldSpec::needs_json)
                || ordering.is_some_and(OrderingSpec::needs_json))
        {
            return Err(ExtractError::NotJson);
        }
        let event_key = key.extract(payload_sha256, json.as_ref(), headers)?;
        if event_key.len() > MAX_EVENT_KEY_BYTES {
            return Err(ExtractError::KeyTooLong);
        }
        // PostgreSQL text cannot hold NUL: refused here, the sender learns why.
        if event_key.contains('\0') {
            return Err(ExtractError::NulCharacter("event key"));
        }
        let event_type = kind.and_then(|spec| spec.extract(json.as_ref(), headers));
        if event_type.as_deref().is_some_and(|t| t.contains('\0')) {
            return Err(ExtractError::NulCharacter("event type"));
        }
        let ordering = ordering
            .map(|spec| spec.extract(json.as_ref(), headers))
            .transpose()?;
        let json_text = json
            .as_ref()
            .and_then(|_| std::str::from_utf8(payload).ok())
            .filter(|text| !text.contains("\\u0000") && numbers_fit_numeric(text));
        Ok(Self {
            event_key,
            event_type,
            json_text,
            ordering,
        })
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl EventKeySpec {
    pub fn needs_json(&self) -> bool {
        matches!(self, Self::Json(_))
    }

    pub fn extract(
        &self,
        body_sha256: &str,
        json: Option<&serde_json::Value>,
        headers: &(impl HeaderLookup + ?Sized),
    ) -> Result<String, ExtractError> {
        match self {
            Self::BodySha256 => Ok(body_sha256.to_owned()),
            Self::Header(name) => header_value(headers, name),
            Self::Json(pointers) => {
                let json = json.ok_or(ExtractError::NotJson)?;
                let parts = pointers
                    .iter()
                    .map(|pointer| match json.pointer(pointer) {
                        None | Some(serde_json::Value::Null) => {
                            Err(ExtractError::MissingJsonField(pointer.clone()))
                        }
                        Some(value) => Ok(escape_part(&scalar_text(value))),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(parts.join(":"))
            }
        }
    }
}

impl FieldSpec {
    pub fn needs_json(&self) -> bool {
        matches!(self, Self::Json(_))
    }

    /// The field's value, or `None` when the payload does not carry it (an
    /// event without a type is still stored; only routes by type skip it).
    pub fn extract(
        &self,
        json: Option<&serde_json::Value>,
        headers: &(impl HeaderLookup + ?Sized),
    ) -> Option<String> {
        match self {
            Self::Json(pointer) => json?
                .pointer(pointer)
                .filter(|v| !v.is_null())
                .map(scalar_text),
            Self::Header(name) => header_value(headers, name).ok(),
        }
    }
}

fn header_value(
    headers: &(impl HeaderLookup + ?Sized),
    name: &str,
) -> Result<String, ExtractError> {
    let values = headers.values(name);
    let value = values
        .first()
        .ok_or_else(|| ExtractError::MissingHeader(name.to_owned()))?;
    let text = std::str::from_utf8(value).map_err(|_| ExtractError::BadHeader(name.to_owned()))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(ExtractError::MissingHeader(name.to_owned()));
    }
    Ok(text.to_owned())
}

fn scalar_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `%` and `:` are escaped so that `["a:b","c"]` and `["a","b:c"]` differ.
fn escape_part(part: &str) -> String {
    part.replace('%', "%25").replace(':', "%3A")
}

fn pointer_is_valid(pointer: &str) -> bool {
    pointer.is_empty() || pointer.starts_with('/')
}

/// `"body_sha256"`, `{ json = ["/a", "/b"] }` or `{ header = "webhook-id" }`.
impl<'de> Deserialize<'de> for EventKeySpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const EXPECTED: &str =
            r#"expected "body_sha256", { json = ["/pointer", ...] } or { header = "name" }"#;
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Named(String),
            Table(std::collections::BTreeMap<String, toml::Value>),
        }
        let raw = Raw::deserialize(deserializer).map_err(|_| de::Error::custom(EXPECTED))?;
        match raw {
            Raw::Named(name) if name == "body_sha256" => Ok(Self::BodySha256),
            Raw::Table(table) if table.len() == 1 => {
                let (kind, value) = table.into_iter().next().expect("one entry");
                match (kind.as_str(), value) {
                    ("json", toml::Value::Array(items)) if !items.is_empty() => {
                        let pointers = items
                            .into_iter()
                            .map(|item| match item {
                                toml::Value::String(p) if pointer_is_valid(&p) => Ok(p),
                                _ => Err(de::Error::custom(
                                    "each JSON pointer is a string starting with `/`",
                                )),
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        Ok(Self::Json(pointers))
                    }
                    ("header", toml::Value::String(name)) if !name.is_empty() => {
                        Ok(Self::Header(name))
                    }
                    _ => Err(de::Error::custom(EXPECTED)),
                }
            }
            _ => Err(de::Error::custom(EXPECTED)),
        }
    }
}

/// `{ json = "/event/type" }` or `{ header = "X-GitHub-Event" }`.
impl<'de> Deserialize<'de> for FieldSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const EXPECTED: &str = r#"expected { json = "/pointer" } or { header = "name" }"#;
        let table = std::collections::BTreeMap::<String, String>::deserialize(deserializer)
            .map_err(|_| de::Error::custom(EXPECTED))?;
        let mut entries = table.into_iter();
        match (entries.next(), entries.next()) {
            (Some((kind, value)), None) if kind == "json" && pointer_is_valid(&value) => {
                Ok(Self::Json(value))
            }
            (Some((kind, value)), None) if kind == "header" && !value.is_empty() => {
                Ok(Self::Header(value))
            }
            _ => Err(de::Error::custom(EXPECTED)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_HEADERS: &[(&str, &str)] = &[];

    #[test]
    fn json_key_joins_fields_unambiguously() {
        let spec = EventKeySpec::Json(vec!["/a".into(), "/b".into()]);
        let one = serde_json::json!({"a": "x:y", "b": "z"});
        let two = serde_json::json!({"a": "x", "b": "y:z"});
        let key_one = spec.extract("", Some(&one), NO_HEADERS).unwrap();
        let key_two = spec.extract("", Some(&two), NO_HEADERS).unwrap();
        assert_ne!(key_one, key_two);
        assert_eq!(key_one, "x%3Ay:z");
    }

    #[test]
    fn a_missing_key_field_is_named() {
        let spec = EventKeySpec::Json(vec!["/uid".into()]);
        let err = spec
            .extract("", Some(&serde_json::json!({})), NO_HEADERS)
            .unwrap_err();
        assert_eq!(err.to_string(), "event key field /uid is missing");
    }

    #[test]
    fn numbers_postgresql_numeric_cannot_hold_are_found_outside_strings_only() {
        assert!(numbers_fit_numeric(
            r#"{"a":1.5e-300,"b":-12345678901234567890123,"c":[0,1e10]}"#
        ));
        assert!(numbers_fit_numeric(r#"{"a":"1e-20000","b\"1e-20000":1}"#));
        assert!(!numbers_fit_numeric(r#"{"a":1e-20000}"#));
        assert!(!numbers_fit_numeric(r#"[0e99999999999]"#));
        assert!(!numbers_fit_numeric(r#"{"a":[1,2,1e999999]}"#));
        let tiny_but_long = format!("[{}0e-16383]", "0e-16383,".repeat(66_000));
        assert!(!numbers_fit_numeric(&tiny_but_long));
        assert!(numbers_fit_numeric("[0e-16383]"));
    }

    #[test]
    fn numbers_become_their_json_text() {
        let spec = EventKeySpec::Json(vec!["/n".into()]);
        let key = spec
            .extract("", Some(&serde_json::json!({"n": 12})), NO_HEADERS)
            .unwrap();
        assert_eq!(key, "12");
    }

    #[test]
    fn header_key_reads_the_header() {
        let spec = EventKeySpec::Header("webhook-id".into());
        let headers = [("Webhook-Id", "msg_1")];
        assert_eq!(spec.extract("", None, headers.as_slice()).unwrap(), "msg_1");
        assert!(spec.extract("", None, NO_HEADERS).is_err());
    }

    fn extract(body: &[u8]) -> Result<EventFields<'_>, ExtractError> {
        EventFields::extract(
            &EventKeySpec::Json(vec!["/uid".into()]),
            Some(&FieldSpec::Json("/type".into())),
            None,
            body,
            "",
            NO_HEADERS,
        )
    }

    #[test]
    fn an_over_long_key_and_a_nul_in_key_or_type_are_refused() {
        let long = format!(r#"{{"uid":"{}"}}"#, "x".repeat(MAX_EVENT_KEY_BYTES + 1));
        assert_eq!(
            extract(long.as_bytes()).unwrap_err(),
            ExtractError::KeyTooLong
        );
        let longest = format!(r#"{{"uid":"{}"}}"#, "x".repeat(MAX_EVENT_KEY_BYTES));
        assert!(extract(longest.as_bytes()).is_ok());
        assert_eq!(
            extract(br#"{"uid":"a\u0000"}"#).unwrap_err().reason(),
            "invalid_event_key"
        );
        assert_eq!(
            extract(br#"{"uid":"a","type":"t\u0000"}"#).unwrap_err(),
            ExtractError::NulCharacter("event type")
        );
    }

    #[test]
    fn an_ordering_key_and_the_senders_time_are_read_from_the_payload() {
        let spec = OrderingSpec {
            key: EventKeySpec::Json(vec!["/uid".into()]),
            order_by: Some("/created".into()),
            dead_blocks: true,
            skip_if_stale: false,
        };
        let seconds = serde_json::json!({"uid": "u1", "created": 1_700_000_000});
        let ordering = spec.extract(Some(&seconds), NO_HEADERS).unwrap();
        assert_eq!(ordering.key, "u1");
        assert_eq!(ordering.ordered_at.unwrap().timestamp(), 1_700_000_000);
        let text = serde_json::json!({"uid": "u1", "created": "2026-11-22T10:00:00Z"});
        let ordering = spec.extract(Some(&text), NO_HEADERS).unwrap();
        assert_eq!(
            ordering.ordered_at.unwrap().to_rfc3339(),
            "2026-11-22T10:00:00+00:00"
        );
    }

    #[test]
    fn a_missing_ordering_key_or_time_is_named() {
        let spec = OrderingSpec {
            key: EventKeySpec::Json(vec!["/uid".into()]),
            order_by: Some("/created".into()),
            dead_blocks: true,
            skip_if_stale: false,
        };
        let no_key = spec.extract(Some(&serde_json::json!({"created": 1})), NO_HEADERS);
        assert_eq!(
            no_key.unwrap_err().to_string(),
            "ordering key field /uid is missing"
        );
        let no_time = spec.extract(
            Some(&serde_json::json!({"uid": "u", "created": "soon"})),
            NO_HEADERS,
        );
        assert_eq!(no_time.unwrap_err().reason(), "invalid_order_by");
    }

    #[test]
    fn specs_parse_from_toml() {
        #[derive(Deserialize)]
        struct Wrapper {
            key: EventKeySpec,
            kind: FieldSpec,
        }
        let parsed: Wrapper =
            toml::from_str("key = { json = [\"/a\"] }\nkind = { header = \"X-T\" }").unwrap();
        assert_eq!(parsed.key, EventKeySpec::Json(vec!["/a".into()]));
        assert_eq!(parsed.kind, FieldSpec::Header("X-T".into()));
        assert!(toml::from_str::<Wrapper>("key = \"md5\"\nkind = { json = \"/t\" }").is_err());
    }
}
