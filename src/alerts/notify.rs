//! What an alert posts: a JSON document or a Slack message naming the alert,
//! its condition, the source and the counts. Never a payload, a user id or
//! the endpoint's URL (a Slack webhook URL is itself a credential).

use serde::Serialize;

use crate::{config::NotifyFormat, secret::Secret};

#[derive(Debug, Serialize)]
pub struct Notification<'a> {
    pub alert: &'a str,
    pub condition: &'a str,
    pub source: Option<&'a str>,
    pub counts: &'a serde_json::Value,
}

/// Why a notification did not arrive, in words safe to store and show.
#[derive(Debug)]
pub struct Failure {
    pub status: Option<u16>,
    pub reason: String,
}

impl Notification<'_> {
    pub fn body(&self, format: NotifyFormat) -> serde_json::Value {
        match format {
            NotifyFormat::Json => serde_json::json!({
                "alert": self.alert,
                "condition": self.condition,
                "source": self.source,
                "counts": self.counts,
                "at": chrono::Utc::now().to_rfc3339(),
            }),
            NotifyFormat::Slack => {
                let counts = match self.counts.as_object() {
                    Some(map) => map
                        .iter()
                        .map(|(k, v)| format!("{k}: {v}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    None => self.counts.to_string(),
                };
                serde_json::json!({
                    "text": format!(
                        ":rotating_light: hookbox alert *{}* ({}){}: {}",
                        self.alert,
                        self.condition,
                        self.source.map(|s| format!(" on source {s}")).unwrap_or_default(),
                        counts
                    )
                })
            }
        }
    }

    /// POSTs the notification; a 2xx answer means it arrived.
    pub async fn send(
        &self,
        client: &reqwest::Client,
        url: &Secret,
        format: NotifyFormat,
    ) -> Result<u16, Failure> {
        let url = String::from_utf8_lossy(url.expose()).into_owned();
        let answer = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(self.body(format).to_string())
            .send()
            .await;
        match answer {
            Ok(response) if response.status().is_success() => Ok(response.status().as_u16()),
            Ok(response) => Err(Failure {
                status: Some(response.status().as_u16()),
                reason: format!("endpoint answered HTTP {}", response.status().as_u16()),
            }),
            // Classified here, without the error's text: it would carry the URL.
            Err(error) => Err(Failure {
                status: None,
                reason: if error.is_timeout() {
                    "endpoint did not answer in time".into()
                } else if error.is_connect() {
                    "endpoint unreachable".into()
                } else {
                    "request failed".into()
                },
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_notifications_name_alert_condition_source_and_counts() {
        let counts = serde_json::json!({ "dead": 3 });
        let notification = Notification {
            alert: "dead-events",
            condition: "dead",
            source: Some("begini"),
            counts: &counts,
        };
        let body = notification.body(NotifyFormat::Json);
        assert_eq!(body["alert"], "dead-events");
        assert_eq!(body["condition"], "dead");
        assert_eq!(body["source"], "begini");
        assert_eq!(body["counts"]["dead"], 3);
        let slack = notification.body(NotifyFormat::Slack);
        let text = slack["text"].as_str().unwrap();
        assert!(
            text.contains("dead-events") && text.contains("dead: 3"),
            "{text}"
        );
    }
}
