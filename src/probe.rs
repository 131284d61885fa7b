//! `hookbox probe URL`: the health check of the container image, which ships
//! no curl.

use std::time::Duration;

use anyhow::Context;

/// GETs `url`; succeeds on a 2xx answer within three seconds.
pub async fn check(url: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()?;
    let status = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("no answer from {url}"))?
        .status();
    anyhow::ensure!(status.is_success(), "{url} answered {status}");
    Ok(())
}
