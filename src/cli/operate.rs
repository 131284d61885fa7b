//! `status`, `events`, `replay`, `prune`, `import`.

use std::{io::BufReader, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Args, Subcommand};
use sqlx::PgPool;
use uuid::Uuid;

use super::{output, CommonArgs};
use crate::{
    db,
    duration::HumanDuration,
    ops::{
        self,
        events::EventReference,
        filter::{parse_status, parse_time, EventFilter},
        import::ImportRequest,
        prune::PruneRequest,
        replay::ReplayRequest,
    },
    status::EventStatus,
};

#[derive(Args, Debug, Clone)]
pub struct FilterArgs {
    /// Only this source.
    #[arg(long)]
    pub source: Option<String>,
    /// Only these statuses (repeat or comma-separate).
    #[arg(long, value_delimiter = ',', value_parser = parse_status)]
    pub status: Vec<EventStatus>,
    /// Only event types matching this glob (`*`, `?`).
    #[arg(long = "type")]
    pub event_type: Option<String>,
    /// Received at or after: RFC 3339, or a duration meaning that long ago (6h).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Received before: RFC 3339, or a duration ago.
    #[arg(long, value_parser = parse_time)]
    pub until: Option<chrono::DateTime<chrono::Utc>>,
}

impl FilterArgs {
    fn filter(&self) -> anyhow::Result<EventFilter> {
        Ok(EventFilter {
            source: self.source.clone(),
            statuses: self.status.clone(),
            event_type: self.event_type.clone(),
            since: self.since,
            until: self.until,
        })
    }
}

/// What every changing command records, and its dry run.
#[derive(Args, Debug, Clone)]
pub struct ActionArgs {
    /// Why: recorded with the action (required by replay).
    #[arg(long)]
    pub reason: Option<String>,
    /// Who: recorded with the action (default: the OS user).
    #[arg(long)]
    pub actor: Option<String>,
    /// Print what would change; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

impl ActionArgs {
    pub(super) fn actor(&self) -> String {
        self.actor.clone().unwrap_or_else(ops::os_user)
    }
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum EventsCommand {
    /// List events, newest first.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Only ordered events held back, with the event that holds each.
        #[arg(long)]
        blocked: bool,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// One event and its timeline: deliveries, attempts and operator actions.
    Show {
        /// An event id, or source:key.
        event: String,
        /// Also print the payload.
        #[arg(long)]
        payload: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// Event ids to replay (or use the filter options).
    pub ids: Vec<Uuid>,
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub action: ActionArgs,
    /// Also replay succeeded events (their handlers run again).
    #[arg(long)]
    pub include_succeeded: bool,
    #[arg(long, default_value_t = 1000)]
    pub batch_size: i64,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Drop payload, payload_json and headers of events finished longer ago (keys stay).
    #[arg(long)]
    pub older_than: Option<HumanDuration>,
    /// Prune dead events' payloads too (they can then no longer be replayed).
    #[arg(long)]
    pub include_dead: bool,
    /// Delete delivery audit rows older than this.
    #[arg(long)]
    pub deliveries_older_than: Option<HumanDuration>,
    /// Delete finished attempt rows older than this.
    #[arg(long)]
    pub attempts_older_than: Option<HumanDuration>,
    /// Delete whole events finished longer ago, keys included: a later
    /// delivery of one is stored as a new event (dead ones only with
    /// --include-dead).
    #[arg(long)]
    pub keys_older_than: Option<HumanDuration>,
    #[command(flatten)]
    pub action: ActionArgs,
    #[arg(long, default_value_t = 1000)]
    pub batch_size: i64,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The source the events belong to.
    #[arg(long)]
    pub source: String,
    /// JSON Lines, one payload per line; `-` for standard input.
    pub file: PathBuf,
    #[command(flatten)]
    pub action: ActionArgs,
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
}

pub(super) async fn connect(
    common: &CommonArgs,
) -> anyhow::Result<(crate::config::Config, PgPool)> {
    let config = common.load_config()?;
    let pool = db::pool(
        &config.database_url()?,
        &db::PoolSettings::operator(&config),
    )?;
    Ok((config, pool))
}

pub async fn status(common: &CommonArgs, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let (_, pool) = connect(common).await?;
    let sources = ops::status::status(&pool)
        .await
        .context("cannot read the inbox")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&sources)?);
        return Ok(ExitCode::SUCCESS);
    }
    if sources.is_empty() {
        println!("no events yet");
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = sources
        .iter()
        .map(|s| {
            vec![
                s.source.clone(),
                s.pending.to_string(),
                s.processing.to_string(),
                s.retrying.to_string(),
                s.succeeded.to_string(),
                s.dead.to_string(),
                s.skipped.to_string(),
                s.oldest_due_seconds.map_or("-".into(), output::age),
                format!("{}/{}", s.deliveries_5m, s.deliveries_1h),
                format!("{}/{}", s.completed_5m, s.completed_1h),
                output::time(s.last_failure_at),
            ]
        })
        .collect();
    let headers = [
        "SOURCE",
        "PENDING",
        "PROCESSING",
        "RETRYING",
        "SUCCEEDED",
        "DEAD",
        "SKIPPED",
        "OLDEST DUE",
        "DELIVERED 5m/1h",
        "COMPLETED 5m/1h",
        "LAST FAILURE",
    ];
    print!("{}", output::table(&headers, &rows));
    for pause in ops::flow::pauses(&pool).await? {
        println!(
            "paused: {} {} since {} by {}: {}",
            pause.kind,
            pause.name,
            output::time(Some(pause.paused_at)),
            pause.actor,
            pause.reason
        );
    }
    for circuit in ops::flow::open_circuits(&pool).await? {
        println!(
            "circuit {}: handler {} after {} failures, until {}",
            circuit.circuit,
            circuit.handler,
            circuit.failures,
            output::time(circuit.open_until)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn events(common: &CommonArgs, command: EventsCommand) -> anyhow::Result<ExitCode> {
    let (_, pool) = connect(common).await?;
    match command {
        EventsCommand::List {
            blocked: true,
            filter,
            limit,
            json,
        } => {
            let blocked = ops::flow::blocked(&pool, filter.source.as_deref(), limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&blocked)?);
            } else {
                let rows: Vec<Vec<String>> = blocked
                    .iter()
                    .map(|b| {
                        vec![
                            b.id.to_string(),
                            b.source.clone(),
                            b.ordering_key.clone(),
                            b.status.to_string(),
                            b.blocked_by.to_string(),
                            b.blocked_by_status.to_string(),
                            b.blocked_by_error
                                .as_deref()
                                .map(|s| s.chars().take(50).collect())
                                .unwrap_or_default(),
                        ]
                    })
                    .collect();
                let headers = [
                    "ID",
                    "SOURCE",
                    "ORDERING KEY",
                    "STATUS",
                    "BLOCKED BY",
                    "ITS STATUS",
                    "ITS ERROR",
                ];
                print!("{}", output::table(&headers, &rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        EventsCommand::List {
            blocked: false,
            filter,
            limit,
            json,
        } => {
            let events = ops::events::list(&pool, &filter.filter()?, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&events)?);
            } else {
                let rows: Vec<Vec<String>> = events
                    .iter()
                    .map(|e| {
                        vec![
                            e.id.to_string(),
                            output::time(Some(e.received_at)),
                            e.source.clone(),
                            e.event_type.clone().unwrap_or_else(|| "-".into()),
                            e.status.to_string(),
                            e.attempts.to_string(),
                            e.last_error
                                .as_deref()
                                .map(|s| s.chars().take(60).collect())
                                .unwrap_or_default(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    output::table(
                        &[
                            "ID",
                            "RECEIVED",
                            "SOURCE",
                            "TYPE",
                            "STATUS",
                            "ATTEMPTS",
                            "LAST ERROR"
                        ],
                        &rows
                    )
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        EventsCommand::Show {
            event,
            payload,
            json,
        } => {
            let reference: EventReference = event.parse().map_err(anyhow::Error::msg)?;
            let (detail, timeline) = ops::events::show(&pool, &reference, payload)
                .await?
                .with_context(|| format!("no event {event}"))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({ "event": detail, "timeline": timeline })
                    )?
                );
                return Ok(ExitCode::SUCCESS);
            }
            let fields = [
                ("id", detail.id.to_string()),
                (
                    "source",
                    format!("{} ({})", detail.source, detail.environment),
                ),
                ("key", detail.event_key.clone()),
                (
                    "type",
                    detail.event_type.clone().unwrap_or_else(|| "-".into()),
                ),
                ("status", detail.status.to_string()),
                ("attempts", detail.attempts.to_string()),
                ("received", output::time(Some(detail.received_at))),
                ("next attempt", output::time(Some(detail.next_attempt_at))),
                ("processed", output::time(detail.processed_at)),
                (
                    "locked by",
                    detail.locked_by.clone().unwrap_or_else(|| "-".into()),
                ),
                (
                    "last error",
                    detail.last_error.clone().unwrap_or_else(|| "-".into()),
                ),
                (
                    "payload sha256",
                    format!(
                        "{}{}",
                        detail.payload_sha256,
                        if detail.payload_pruned {
                            " (payload pruned)"
                        } else {
                            ""
                        }
                    ),
                ),
            ];
            for (name, value) in fields {
                println!("{name:>15}: {value}");
            }
            println!();
            let rows: Vec<Vec<String>> = timeline
                .iter()
                .map(|t| {
                    vec![
                        output::time(Some(t.at)),
                        t.kind.clone(),
                        t.outcome.clone(),
                        t.detail.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                output::table(&["AT", "KIND", "OUTCOME", "DETAIL"], &rows)
            );
            if let Some(body) = detail.payload {
                println!("\n{body}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub async fn replay(common: &CommonArgs, args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let (_, pool) = connect(common).await?;
    let request = ReplayRequest {
        ids: args.ids,
        filter: args.filter.filter()?,
        include_succeeded: args.include_succeeded,
        reason: args.action.reason.clone().unwrap_or_default(),
        actor: args.action.actor(),
        batch_size: args.batch_size.max(1),
    };
    let (count, sample) = ops::replay::preview(&pool, &request, 20).await?;
    if args.action.dry_run {
        println!("would replay {count} events");
        for event in sample {
            println!(
                "  {}  {}  {}  {}",
                event.id,
                event.source,
                event.event_type.unwrap_or_default(),
                event.status
            );
        }
        if count > 20 {
            println!("  ... and {} more", count - 20);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let bar = output::progress(Some(count as u64), "replaying");
    let report = ops::replay::replay(&pool, &request, |n| bar.inc(n)).await?;
    bar.finish_and_clear();
    println!(
        "replayed {} events (action {})",
        report.replayed,
        report.action_id.unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn prune(common: &CommonArgs, args: PruneArgs) -> anyhow::Result<ExitCode> {
    if args.older_than.is_none()
        && args.deliveries_older_than.is_none()
        && args.attempts_older_than.is_none()
        && args.keys_older_than.is_none()
    {
        anyhow::bail!(
            "say what to prune: --older-than, --deliveries-older-than, --attempts-older-than or --keys-older-than"
        );
    }
    let (_, pool) = connect(common).await?;
    let request = PruneRequest {
        payloads_older_than: args.older_than.map(|d| d.0),
        include_dead: args.include_dead,
        deliveries_older_than: args.deliveries_older_than.map(|d| d.0),
        attempts_older_than: args.attempts_older_than.map(|d| d.0),
        keys_older_than: args.keys_older_than.map(|d| d.0),
        dry_run: args.action.dry_run,
        actor: args.action.actor(),
        reason: args.action.reason.clone(),
        batch_size: args.batch_size.max(1),
    };
    let bar = output::progress(None, "pruning");
    let report = ops::prune::prune(&pool, &request, |n| bar.inc(n)).await?;
    bar.finish_and_clear();
    let verb = if args.action.dry_run {
        "would prune"
    } else {
        "pruned"
    };
    println!(
        "{verb}: {} payloads, {} deliveries, {} attempts, {} events",
        report.payloads, report.deliveries, report.attempts, report.events
    );
    if !report.partitions.is_empty() {
        let verb = if args.action.dry_run {
            "would drop"
        } else {
            "dropped"
        };
        println!("{verb} partitions: {}", report.partitions.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn import(common: &CommonArgs, args: ImportArgs) -> anyhow::Result<ExitCode> {
    let (config, pool) = connect(common).await?;
    let source = config.require_source(&args.source)?;
    let request = ImportRequest {
        file_name: args.file.display().to_string(),
        dry_run: args.action.dry_run,
        actor: args.action.actor(),
        reason: args.action.reason.clone(),
        batch_size: args.batch_size.max(1),
    };
    let bar = output::progress(None, "importing");
    let report = if args.file.as_os_str() == "-" {
        ops::import::import(&pool, source, std::io::stdin().lock(), &request, |n| {
            bar.inc(n)
        })
        .await?
    } else {
        let file = std::fs::File::open(&args.file)
            .with_context(|| format!("cannot open {}", args.file.display()))?;
        ops::import::import(&pool, source, BufReader::new(file), &request, |n| {
            bar.inc(n)
        })
        .await?
    };
    bar.finish_and_clear();
    let verb = if args.action.dry_run {
        "would import"
    } else {
        "imported"
    };
    println!(
        "{verb} {} lines: {} new, {} already stored, {} conflicting, {} invalid",
        report.lines,
        report.stored,
        report.duplicates,
        report.conflicts,
        report.invalid.len()
    );
    for (line, why) in report.invalid.iter().take(20) {
        eprintln!("line {line}: {why}");
    }
    Ok(if report.invalid.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
