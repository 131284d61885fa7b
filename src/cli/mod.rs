//! The `hookbox` operator command.

mod console;
mod dev;
mod flow;
mod loadtest;
mod operate;
mod output;
mod process;
pub mod receiver;
mod reconcile;
mod send;
pub mod worker;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::{config::Config, telemetry::LogFormat};

/// Options every binary shares.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// The configuration file (else $HOOKBOX_CONFIG, else ./hookbox.toml).
    #[arg(
        long,
        global = true,
        env = "HOOKBOX_CONFIG",
        default_value = "hookbox.toml"
    )]
    pub config: PathBuf,
    /// Log format: auto is human-readable on a terminal and JSON otherwise.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
}

impl CommonArgs {
    pub fn load_config(&self) -> anyhow::Result<Config> {
        Ok(Config::load(&self.config)?)
    }

    /// Loads the configuration resolving only the secrets `role` needs.
    pub fn load_config_for(&self, role: crate::config::ProcessRole) -> anyhow::Result<Config> {
        Ok(Config::load_for(&self.config, role)?)
    }
}

#[derive(Parser, Debug)]
#[command(name = "hookbox", version, about = "Operate a hookbox webhook inbox")]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Apply the database migrations (safe to run twice, or from several hosts at once).
    Migrate,
    /// Configuration file commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Sign a payload the way the source's sender does, POST it, print the answer.
    Send(send::SendArgs),
    /// Run a complete local inbox: private PostgreSQL, receiver and worker.
    Dev(dev::DevArgs),
    /// Events per source and status, the oldest due event, recent throughput.
    Status(operate::StatusArgs),
    /// List events, or show one with its timeline.
    Events {
        #[command(subcommand)]
        command: operate::EventsCommand,
    },
    /// Run finished events again (by ids or by filter).
    Replay(operate::ReplayArgs),
    /// End waiting events as `skipped`, releasing their ordering key.
    Skip(flow::SkipArgs),
    /// Stop workers from starting new work for a source or a handler.
    Pause(flow::PauseArgs),
    /// Let workers start work for a paused source or handler again.
    Resume(flow::PauseArgs),
    /// Drop old payloads (keys stay) and old audit rows; whole old events
    /// only with --keys-older-than.
    Prune(operate::PruneArgs),
    /// Feed events obtained out of band (JSON Lines) into the inbox.
    Import(operate::ImportArgs),
    /// Signed, realistic load against a deployment, with latency percentiles.
    Loadtest(loadtest::LoadtestArgs),
    /// Ask the provider which events it sent; import those the inbox lacks.
    Reconcile(reconcile::ReconcileArgs),
    /// Serve the web console (configured in [console]).
    Console,
    /// GET a URL and succeed on a 2xx answer (container health checks).
    Probe {
        /// For example http://127.0.0.1:8080/readyz
        url: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Check a configuration file, its secrets and its references.
    Check,
}

/// `hookbox`: runs the command; prints a one-line reason and fails on error.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    process::run("hookbox", cli.common.log_format, run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Migrate => {
            let config = cli.common.load_config()?;
            let url = config.database_url()?;
            let report = crate::db::migrate(&url).await?;
            if report.applied.is_empty() {
                println!("schema is up to date");
            } else {
                println!("applied: {}", report.applied.join(", "));
            }
            // The partitions [worker] asks for, before any receiver needs
            // them (workers keep them made ahead from then on).
            let pool = crate::db::pool(&url, &crate::db::PoolSettings::operator(&config))?;
            let made = crate::db::make_partitions(
                &pool,
                crate::db::PartitionSettings::from_config(&config),
            )
            .await
            .context("cannot make the partitions ahead")?;
            if !made.is_empty() {
                println!("partitions made ahead: {}", made.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            let config = cli.common.load_config()?;
            for warning in &config.warnings {
                println!("warning: {warning}");
            }
            println!(
                "{}: ok ({} sources, {} routes, {} handlers)",
                config.path.display(),
                config.sources.len(),
                config.routes.len(),
                config.handlers.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Send(args) => send::run(&cli.common, args).await,
        Command::Dev(args) => dev::run(args).await.context("hookbox dev"),
        Command::Status(args) => operate::status(&cli.common, args).await,
        Command::Events { command } => operate::events(&cli.common, command).await,
        Command::Replay(args) => operate::replay(&cli.common, args).await,
        Command::Prune(args) => operate::prune(&cli.common, args).await,
        Command::Skip(args) => flow::skip(&cli.common, args).await,
        Command::Pause(args) => flow::pause(&cli.common, args, false).await,
        Command::Resume(args) => flow::pause(&cli.common, args, true).await,
        Command::Import(args) => operate::import(&cli.common, args).await,
        Command::Loadtest(args) => loadtest::run(&cli.common, args).await,
        Command::Reconcile(args) => reconcile::run(&cli.common, args).await,
        Command::Console => console::run(&cli.common).await,
        Command::Probe { url } => {
            crate::probe::check(&url).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
