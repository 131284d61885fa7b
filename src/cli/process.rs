//! What every hookbox process does around its work: logging, a runtime,
//! configuration, a pool, the stop signal, and a one-line reason with a
//! non-zero exit on failure.

use std::{future::Future, process::ExitCode};

use clap::{Args, FromArgMatches};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::CommonArgs;
use crate::{
    config::{Config, ProcessRole},
    db::PoolSettings,
    telemetry::LogFormat,
};

/// Parses a long-running process's arguments (only the common ones), loads
/// its configuration and pool, and runs `work` until SIGTERM or Ctrl-C
/// cancels the token it is given.
pub fn serve<Work, Done>(
    binary: &'static str,
    about: &'static str,
    role: ProcessRole,
    pool_settings: fn(&Config) -> PoolSettings,
    work: Work,
) -> ExitCode
where
    Work: FnOnce(Config, PgPool, CancellationToken) -> Done,
    Done: Future<Output = anyhow::Result<()>>,
{
    let command = clap::Command::new(binary)
        .version(env!("CARGO_PKG_VERSION"))
        .about(about);
    let common =
        match CommonArgs::from_arg_matches(&CommonArgs::augment_args(command).get_matches()) {
            Ok(common) => common,
            Err(error) => error.exit(),
        };
    run(binary, common.log_format, async move {
        // Each process resolves only the secrets of its own job.
        let config = common.load_config_for(role)?;
        let pool = crate::db::pool(&config.database_url()?, &pool_settings(&config))?;
        let shutdown = CancellationToken::new();
        tokio::spawn(crate::shutdown_on_signal(shutdown.clone()));
        work(config, pool, shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Sets up logging and a runtime, runs `work`, and turns an error into a
/// one-line reason on stderr and a failing exit code.
pub fn run(
    binary: &str,
    log_format: LogFormat,
    work: impl Future<Output = anyhow::Result<ExitCode>>,
) -> ExitCode {
    crate::telemetry::init_logging(log_format);
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    match runtime.block_on(work) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("{binary}: {error:#}");
            ExitCode::FAILURE
        }
    }
}
