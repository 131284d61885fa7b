//! `hookbox send`: what a provider's "send test event" button does.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::Args;

use super::CommonArgs;
use crate::signature::Scheme;

#[derive(Args, Debug)]
pub struct SendArgs {
    /// The `[[source]]` whose scheme and first secret sign the payload.
    #[arg(long)]
    pub source: String,
    /// Where to POST, e.g. http://127.0.0.1:8080/webhooks/begini.
    #[arg(long)]
    pub url: String,
    /// The payload file; by default an example event for the source's scheme.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
}

pub async fn run(common: &CommonArgs, args: SendArgs) -> anyhow::Result<ExitCode> {
    let config = common.load_config()?;
    let source = config.require_source(&args.source)?;
    let body = match &args.file {
        Some(path) => {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
        }
        None => example_payload(&source.scheme),
    };
    let now = chrono::Utc::now().timestamp();
    let message_id = format!("msg_{}", uuid::Uuid::now_v7().simple());
    let headers = source.scheme.sign(&source.keys[0], &body, now, &message_id);

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout))
        .build()?;
    let mut request = client
        .post(&args.url)
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot POST to {}", args.url))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    println!("{} {}", status.as_u16(), text);
    Ok(if status == reqwest::StatusCode::OK {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A realistic event for the scheme, unique on every call.
pub fn example_payload(scheme: &Scheme) -> Vec<u8> {
    let unique = uuid::Uuid::now_v7();
    let value = match scheme {
        Scheme::Begini => serde_json::json!({
            "uid": unique.to_string().to_uppercase(),
            "integration_id": "hookbox-test",
            "event": {
                "type": "psychometric_score.complete",
                "details": { "scored_at": chrono::Utc::now().timestamp() },
                "reasons": []
            }
        }),
        _ => serde_json::json!({
            "id": format!("evt_{}", unique.simple()),
            "type": "hookbox.test",
            "created": chrono::Utc::now().timestamp(),
            "data": { "message": "test event from hookbox send" }
        }),
    };
    serde_json::to_vec(&value).expect("JSON serialises")
}
