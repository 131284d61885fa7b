//! `hookbox console`: parses nothing beyond the common options and serves the
//! web console until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use super::CommonArgs;

pub async fn run(common: &CommonArgs) -> anyhow::Result<ExitCode> {
    let config = common.load_config()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::shutdown_on_signal(shutdown.clone()));
    crate::console::run(&config, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
