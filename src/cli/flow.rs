//! `skip`, `pause`, `resume`: flow control from the command line.

use std::process::ExitCode;

use clap::Args;
use uuid::Uuid;

use super::{operate::connect, CommonArgs};
use crate::ops::{
    self,
    flow::{PauseTarget, SkipReport},
};

#[derive(Args, Debug)]
pub struct SkipArgs {
    /// Events to end as `skipped` (waiting ones only: pending, retrying, dead).
    #[arg(required = true)]
    pub ids: Vec<Uuid>,
    /// Why: recorded with the action.
    #[arg(long)]
    pub reason: String,
    /// Who: recorded with the action (default: the OS user).
    #[arg(long)]
    pub actor: Option<String>,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false, id = "target")]
pub struct TargetArgs {
    /// A source: its events wait; the receiver keeps accepting them.
    #[arg(long, group = "target")]
    pub source: Option<String>,
    /// A handler: the events routed to it wait.
    #[arg(long, group = "target")]
    pub handler: Option<String>,
}

#[derive(Args, Debug)]
pub struct PauseArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Why: recorded with the action.
    #[arg(long)]
    pub reason: String,
    /// Who: recorded with the action (default: the OS user).
    #[arg(long)]
    pub actor: Option<String>,
}

impl TargetArgs {
    fn target(&self) -> PauseTarget {
        match (&self.source, &self.handler) {
            (Some(source), _) => PauseTarget::Source(source.clone()),
            (None, Some(handler)) => PauseTarget::Handler(handler.clone()),
            (None, None) => unreachable!("clap requires one of --source and --handler"),
        }
    }
}

pub async fn skip(common: &CommonArgs, args: SkipArgs) -> anyhow::Result<ExitCode> {
    let (_, pool) = connect(common).await?;
    let actor = args.actor.unwrap_or_else(ops::os_user);
    let SkipReport {
        action_id,
        skipped,
        not_skipped,
    } = ops::flow::skip(&pool, &args.ids, &actor, &args.reason).await?;
    println!("skipped {skipped} events (action {action_id})");
    for id in &not_skipped {
        println!("  not skipped: {id} (in flight, finished or unknown)");
    }
    Ok(if not_skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn pause(common: &CommonArgs, args: PauseArgs, resume: bool) -> anyhow::Result<ExitCode> {
    let (config, pool) = connect(common).await?;
    let target = args.target.target();
    let known = match &target {
        PauseTarget::Source(name) => config.source(name).is_some(),
        PauseTarget::Handler(name) => config.handlers.contains_key(name),
    };
    if !known {
        anyhow::bail!(
            "{}: no {target} in {}",
            if resume { "resume" } else { "pause" },
            config.path.display()
        );
    }
    let actor = args.actor.unwrap_or_else(ops::os_user);
    let changed = if resume {
        ops::flow::resume(&pool, &target, &actor, &args.reason).await?
    } else {
        ops::flow::pause(&pool, &target, &actor, &args.reason).await?
    };
    match (resume, changed) {
        (false, true) => println!("paused {target}: workers start no new work for it"),
        (false, false) => println!("{target} was paused already"),
        (true, true) => println!("resumed {target}"),
        (true, false) => println!("{target} was not paused"),
    }
    Ok(ExitCode::SUCCESS)
}
