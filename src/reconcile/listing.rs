//! Paging through a provider's list of events: Stripe's `GET /v1/events` or
//! any cursor-paged JSON list described by `[source.reconcile]`.

use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, Utc};
use reqwest::{header::HeaderValue, StatusCode};
use serde_json::value::RawValue;

use crate::config::Listing;

/// Requests one page may make: the first and the retries after `429`, `5xx`
/// or a network failure.
const ATTEMPTS_PER_PAGE: u32 = 6;
/// The longest `Retry-After` honoured; a provider asking for more ends the
/// run (the next one tries again) rather than holding a worker.
const LONGEST_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Waits between retries of a `5xx` or a network failure: 1s, 2s, 4s, ...
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a page could not be listed, classified where it happened.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// Rate limits, server errors, timeouts: the next run may succeed.
    #[error("{0}")]
    Retryable(String),
    /// The provider refused the request or answered something that is not
    /// the configured list (a wrong key, URL or pointer): retrying cannot help.
    #[error("{0}")]
    Permanent(String),
}

impl ListError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable(_))
    }
}

/// One page: each event's JSON exactly as the provider serialised it, with
/// its id, and the cursor of the next page (`None` after the last).
#[derive(Debug)]
pub struct Page {
    pub events: Vec<ListedEvent>,
    pub next: Option<String>,
}

#[derive(Debug)]
pub struct ListedEvent {
    pub id: String,
    pub bytes: Vec<u8>,
}

pub struct Lister<'a> {
    client: reqwest::Client,
    listing: &'a Listing,
    since: DateTime<Utc>,
}

impl<'a> Lister<'a> {
    /// Lists the events created at or after `since` (when the list can be
    /// asked for that; otherwise all of them).
    pub fn new(listing: &'a Listing, since: DateTime<Utc>) -> Result<Self, ListError> {
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("hookbox/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ListError::Permanent(format!("cannot build an HTTP client: {e}")))?;
        Ok(Self {
            client,
            listing,
            since,
        })
    }

    /// The page after `cursor` (the first page for `None`), waiting out
    /// `429` (its `Retry-After`) and retrying `5xx` and network failures with
    /// backoff, a bounded number of times.
    pub async fn page(&self, cursor: Option<&str>) -> Result<Page, ListError> {
        let mut backoff = FIRST_BACKOFF;
        let mut last_failure = String::new();
        for _ in 0..ATTEMPTS_PER_PAGE {
            let wait = match self.request(cursor).send().await {
                Ok(response) if response.status().is_success() => {
                    let body = response.bytes().await.map_err(|e| {
                        ListError::Retryable(format!("the list's body was cut off: {e}"))
                    });
                    match body {
                        Ok(body) => return parse_page(self.listing, &body),
                        Err(error) => {
                            last_failure = error.to_string();
                            backoff
                        }
                    }
                }
                Ok(response) if response.status() == StatusCode::TOO_MANY_REQUESTS => {
                    let asked = retry_after(response.headers().get("retry-after"));
                    last_failure = "the provider kept answering 429 Too Many Requests".into();
                    match asked {
                        Some(asked) if asked > LONGEST_RETRY_AFTER => {
                            return Err(ListError::Retryable(format!(
                                "the provider asked to wait {}s (429); the next run tries again",
                                asked.as_secs()
                            )));
                        }
                        Some(asked) => asked,
                        None => backoff,
                    }
                }
                Ok(response) if response.status().is_server_error() => {
                    last_failure = format!("the provider answered {}", response.status());
                    backoff
                }
                // A refusal (401, 403, 404, 400...) is the configuration's
                // fault. The body is not repeated: it may echo the request.
                Ok(response) => {
                    return Err(ListError::Permanent(format!(
                        "the provider answered {} to {}: check api_key_env and the URL",
                        response.status(),
                        self.listing.url
                    )));
                }
                Err(error) => {
                    last_failure = format!("cannot reach the provider: {}", failure_kind(&error));
                    backoff
                }
            };
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(LONGEST_RETRY_AFTER);
        }
        Err(ListError::Retryable(format!(
            "{last_failure} ({ATTEMPTS_PER_PAGE} tries)"
        )))
    }

    fn request(&self, cursor: Option<&str>) -> reqwest::RequestBuilder {
        let mut url = self.listing.url.clone();
        {
            let mut query = url.query_pairs_mut();
            if let Some(param) = &self.listing.since_param {
                query.append_pair(param, &self.since.timestamp().to_string());
            }
            if let Some(cursor) = cursor {
                query.append_pair(&self.listing.cursor_param, cursor);
            }
        }
        let mut request = self.client.get(url);
        if let Some(auth) = &self.listing.auth {
            let mut value = Vec::with_capacity(auth.scheme.len() + 1 + auth.key.expose().len());
            if !auth.scheme.is_empty() {
                value.extend_from_slice(auth.scheme.as_bytes());
                value.push(b' ');
            }
            value.extend_from_slice(auth.key.expose());
            // A key that is not a valid header value is sent as nothing and
            // refused by the provider; it is never echoed in an error.
            if let Ok(mut value) = HeaderValue::from_bytes(&value) {
                value.set_sensitive(true);
                request = request.header(auth.header.clone(), value);
            }
        }
        request
    }
}

/// `Retry-After` in seconds (the form APIs use); an HTTP date counts as absent.
fn retry_after(value: Option<&HeaderValue>) -> Option<Duration> {
    let seconds: u64 = value?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds))
}

/// What kind of network failure it was, in words (reqwest's own message
/// repeats the URL, noise in a one-line reason).
fn failure_kind(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    kind.to_owned()
}

/// A page's events (their bytes exactly as listed) and the next cursor.
pub fn parse_page(listing: &Listing, body: &[u8]) -> Result<Page, ListError> {
    let not_a_list = |why: &str| {
        ListError::Permanent(format!(
            "the provider's answer is not the configured list: {why}"
        ))
    };
    let text = std::str::from_utf8(body).map_err(|_| not_a_list("not UTF-8"))?;
    let document: &RawValue = serde_json::from_str(text).map_err(|_| not_a_list("not JSON"))?;
    let items = at_pointer(document, &listing.items)
        .ok_or_else(|| not_a_list(&format!("nothing at {}", listing.items)))?;
    let items: Vec<&RawValue> = serde_json::from_str(items.get())
        .map_err(|_| not_a_list(&format!("{} is not an array", listing.items)))?;
    let mut events = Vec::with_capacity(items.len());
    for item in items {
        let id = at_pointer(item, &listing.item_id)
            .and_then(scalar)
            .ok_or_else(|| not_a_list(&format!("an event has no id at {}", listing.item_id)))?;
        events.push(ListedEvent {
            id,
            bytes: item.get().as_bytes().to_vec(),
        });
    }
    let more = match &listing.has_more {
        None => true,
        Some(pointer) => match at_pointer(document, pointer).map(|raw| raw.get()) {
            Some("true") => true,
            Some("false") => false,
            _ => return Err(not_a_list(&format!("{pointer} is not true or false"))),
        },
    };
    let next = match &listing.next_cursor {
        Some(pointer) => at_pointer(document, pointer).and_then(scalar),
        None => events.last().map(|event| event.id.clone()),
    };
    Ok(Page {
        next: next.filter(|_| more && !events.is_empty()),
        events,
    })
}

/// A string or number as text; anything else (null included) is no value.
fn scalar(raw: &RawValue) -> Option<String> {
    match serde_json::from_str::<serde_json::Value>(raw.get()).ok()? {
        serde_json::Value::String(text) if !text.is_empty() => Some(text),
        serde_json::Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// The value at a JSON pointer (RFC 6901), as the raw text of the document,
/// so a listed event keeps the exact bytes the provider sent.
fn at_pointer<'a>(document: &'a RawValue, pointer: &str) -> Option<&'a RawValue> {
    let mut value = document;
    if pointer.is_empty() {
        return Some(value);
    }
    for token in pointer.strip_prefix('/')?.split('/') {
        let token = token.replace("~1", "/").replace("~0", "~");
        let text: &'a str = value.get();
        value = match text.trim_start().as_bytes().first()? {
            b'{' => serde_json::from_str::<BTreeMap<String, &'a RawValue>>(text)
                .ok()?
                .remove(&token)?,
            b'[' => {
                let index: usize = token.parse().ok()?;
                serde_json::from_str::<Vec<&'a RawValue>>(text)
                    .ok()?
                    .get(index)
                    .copied()?
            }
            _ => return None,
        };
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stripe_listing() -> Listing {
        Listing {
            url: "https://api.stripe.com/v1/events?limit=100"
                .parse()
                .unwrap(),
            auth: None,
            items: "/data".into(),
            item_id: "/id".into(),
            next_cursor: None,
            cursor_param: "starting_after".into(),
            has_more: Some("/has_more".into()),
            since_param: Some("created[gte]".into()),
        }
    }

    const PAGE: &str = r#"{
  "object": "list",
  "data": [
    {
      "id": "evt_2",
      "object": "event",
      "type": "charge.succeeded"
    },
    {"id":"evt_1","object":"event","type":"charge.failed"}
  ],
  "has_more": true,
  "url": "/v1/events"
}"#;

    #[test]
    fn a_stripe_page_keeps_each_event_s_bytes_and_pages_after_the_last_id() {
        let page = parse_page(&stripe_listing(), PAGE.as_bytes()).unwrap();
        assert_eq!(page.events.len(), 2);
        assert_eq!(page.events[0].id, "evt_2");
        assert!(std::str::from_utf8(&page.events[0].bytes)
            .unwrap()
            .starts_with("{\n      \"id\": \"evt_2\""));
        assert_eq!(
            page.events[1].bytes,
            br#"{"id":"evt_1","object":"event","type":"charge.failed"}"#
        );
        assert_eq!(page.next.as_deref(), Some("evt_1"));
        let last = PAGE.replace("\"has_more\": true", "\"has_more\": false");
        assert!(parse_page(&stripe_listing(), last.as_bytes())
            .unwrap()
            .next
            .is_none());
    }

    #[test]
    fn a_cursor_can_come_from_the_page() {
        let listing = Listing {
            items: "/result/items".into(),
            item_id: "/meta/delivery".into(),
            next_cursor: Some("/result/next".into()),
            has_more: None,
            ..stripe_listing()
        };
        let body = r#"{"result":{"items":[{"meta":{"delivery":17}}],"next":"c2"}}"#;
        let page = parse_page(&listing, body.as_bytes()).unwrap();
        assert_eq!(page.events[0].id, "17");
        assert_eq!(page.next.as_deref(), Some("c2"));
        let end = r#"{"result":{"items":[{"meta":{"delivery":18}}],"next":null}}"#;
        assert!(parse_page(&listing, end.as_bytes()).unwrap().next.is_none());
    }

    #[test]
    fn an_answer_that_is_not_the_list_is_a_permanent_error() {
        let error = parse_page(&stripe_listing(), br#"{"error":{"type":"x"}}"#).unwrap_err();
        assert!(!error.is_retryable());
        assert!(error.to_string().contains("nothing at /data"));
    }

    #[test]
    fn pointers_follow_rfc_6901_escapes_and_indices() {
        let document: &RawValue = serde_json::from_str(r#"{"a/b":[1,{"c~d":"x"}]}"#).unwrap();
        assert_eq!(at_pointer(document, "/a~1b/1/c~0d").unwrap().get(), "\"x\"");
        assert!(at_pointer(document, "/a~1b/2").is_none());
    }
}
