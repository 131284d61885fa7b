//! Which events an operator means: by source, status, type and time.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::{duration::HumanDuration, status::EventStatus};

/// A filter over `inbox_events`; every part is optional.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EventFilter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub statuses: Vec<EventStatus>,
    /// A glob (`*`, `?`) over the event type.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// On `received_at`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

impl EventFilter {
    pub fn is_empty(&self) -> bool {
        self.source.is_none()
            && self.statuses.is_empty()
            && self.event_type.is_none()
            && self.since.is_none()
            && self.until.is_none()
    }

    /// The type glob as a `LIKE` pattern (`NULL` when there is none).
    pub fn type_pattern(&self) -> Option<String> {
        self.event_type.as_deref().map(crate::glob::to_like)
    }
}

/// `--status`: one of the statuses the SQL contract names.
pub fn parse_status(text: &str) -> Result<EventStatus, String> {
    text.parse().map_err(|_| {
        let known: Vec<&str> = EventStatus::ALL.iter().map(|s| s.as_str()).collect();
        format!("not one of {}", known.join(", "))
    })
}

/// `--since`/`--until`: RFC 3339, or a duration meaning "that long ago".
pub fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    let ago: HumanDuration = text.parse().map_err(|_| {
        format!("`{text}` is neither an RFC 3339 time (2026-11-22T10:00:00Z) nor a duration (6h)")
    })?;
    let ago = chrono::Duration::from_std(ago.0).map_err(|_| format!("`{text}` is too long ago"))?;
    Ok(Utc::now() - ago)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_durations_ago() {
        assert_eq!(
            parse_time("2026-11-22T10:00:00Z").unwrap().to_rfc3339(),
            "2026-11-22T10:00:00+00:00"
        );
        let hour_ago = parse_time("1h").unwrap();
        let expected = Utc::now() - chrono::Duration::hours(1);
        assert!((hour_ago - expected).num_seconds().abs() < 5);
        assert!(parse_time("yesterday").is_err());
    }
}
