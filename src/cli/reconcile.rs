//! `hookbox reconcile`: parses the arguments and prints what
//! [`crate::reconcile::reconcile`] found.

use std::process::ExitCode;

use clap::Args;

use super::{
    operate::{connect, ActionArgs},
    CommonArgs,
};
use crate::{
    ops::filter::parse_time,
    reconcile::{self, ReconcileRequest},
};

#[derive(Args, Debug)]
pub struct ReconcileArgs {
    /// The source whose provider is asked (it needs a [source.reconcile] table).
    #[arg(long)]
    pub source: String,
    /// List events created from here (RFC 3339, or a duration ago such as 3d)
    /// instead of `lookback` before the cursor.
    #[arg(long, value_parser = parse_time)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    #[command(flatten)]
    pub action: ActionArgs,
}

pub async fn run(common: &CommonArgs, args: ReconcileArgs) -> anyhow::Result<ExitCode> {
    let (config, pool) = connect(common).await?;
    let source = config.require_source(&args.source)?;
    let request = ReconcileRequest {
        since: args.since,
        dry_run: args.action.dry_run,
        actor: args.action.actor(),
        reason: args.action.reason.clone(),
    };
    let report = reconcile::reconcile(&pool, source, &request).await?;
    let verb = if request.dry_run {
        "would import"
    } else {
        "imported"
    };
    println!(
        "{}: listed {} events created since {} ({} pages): {} already stored, {verb} {}, {} invalid",
        source.name,
        report.listed,
        report.from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        report.pages,
        report.already_stored,
        report.imported,
        report.invalid.len()
    );
    if let Some(action_id) = report.action_id {
        println!("recorded as action {action_id}");
    }
    for (position, why) in report.invalid.iter().take(20) {
        eprintln!("listed event {position}: {why}");
    }
    Ok(if report.invalid.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
