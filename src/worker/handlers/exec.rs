//! `kind = "exec"`: run a program with the payload on stdin.
//!
//! The program gets a cleared environment: `PATH`, the `HOOKBOX_*` event
//! variables and the variables the handler's `env` allow-list names, nothing
//! else (no database URL, no secret). It runs in a process group of its own,
//! which is killed whole on timeout.

use std::{process::Stdio, time::Duration};

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::worker::handler::{Event, ExternalHandler, HandlerError};

/// Exit status that marks a permanent failure (EX_DATAERR).
const EXIT_PERMANENT: i32 = 65;
/// How much of the program's stderr is kept for the attempt's `error`.
const STDERR_KEPT: usize = 2048;
/// `PATH` when the worker has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Runs a program with the payload on stdin.
pub struct ExecHandler {
    command: Vec<String>,
    timeout: Duration,
    /// What the program's environment holds besides the event's variables.
    environment: Vec<(String, String)>,
}

impl ExecHandler {
    /// `command[0]` with the rest as arguments, killed after `timeout`.
    pub fn new(command: &[String], timeout: Duration) -> Self {
        let path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.into());
        Self {
            command: command.to_vec(),
            timeout,
            environment: vec![("PATH".into(), path)],
        }
    }

    /// Passes these variables on from the worker's environment (those set).
    pub fn passing(mut self, names: &[String]) -> Self {
        for name in names {
            if let Ok(value) = std::env::var(name) {
                self.environment.retain(|(existing, _)| existing != name);
                self.environment.push((name.clone(), value));
            }
        }
        self
    }
}

#[async_trait]
impl ExternalHandler for ExecHandler {
    async fn handle(&self, event: &Event) -> Result<(), HandlerError> {
        let mut child = tokio::process::Command::new(&self.command[0])
            .args(&self.command[1..])
            .env_clear()
            .envs(self.environment.iter().map(|(k, v)| (k, v)))
            .env("HOOKBOX_EVENT_ID", event.id.to_string())
            .env(
                "HOOKBOX_EVENT_TYPE",
                event.event_type.as_deref().unwrap_or(""),
            )
            .env("HOOKBOX_SOURCE", &event.source)
            .env("HOOKBOX_EVENT_KEY", &event.event_key)
            .env("HOOKBOX_ATTEMPT", event.attempt.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own group, so that a timeout ends everything it started.
            .process_group(0)
            .spawn()
            .map_err(|e| {
                HandlerError::retryable(format!("cannot start {}: {e}", self.command[0]))
            })?;

        let group = child.id().and_then(|pid| i32::try_from(pid).ok());
        let mut stdin = child.stdin.take().expect("piped stdin");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let payload = event.payload.clone();
        let run = async move {
            // A program that exits without reading its input is its own business.
            let feed = async move {
                let _ = stdin.write_all(&payload).await;
                drop(stdin);
            };
            let drain = async move {
                let mut kept = Vec::new();
                let mut buffer = [0u8; 4096];
                while let Ok(n) = stderr.read(&mut buffer).await {
                    if n == 0 {
                        break;
                    }
                    let room = STDERR_KEPT.saturating_sub(kept.len());
                    kept.extend_from_slice(&buffer[..n.min(room)]);
                }
                kept
            };
            let (_, kept, status) = tokio::join!(feed, drain, child.wait());
            (kept, status)
        };
        let (stderr, status) = tokio::time::timeout(self.timeout, run).await.map_err(|_| {
            if let Some(group) = group {
                // SAFETY: killpg(2) on the group this handler created;
                // the child is not yet reaped, so the id is still ours.
                unsafe { libc::killpg(group, libc::SIGKILL) };
            }
            HandlerError::retryable(format!("timed out after {:?}", self.timeout))
        })?;
        let status = status
            .map_err(|e| HandlerError::retryable(format!("cannot wait for the program: {e}")))?;
        let stderr = String::from_utf8_lossy(&stderr).trim().to_owned();
        let describe = |what: String| {
            if stderr.is_empty() {
                what
            } else {
                format!("{what}: {stderr}")
            }
        };
        match status.code() {
            Some(0) => Ok(()),
            Some(EXIT_PERMANENT) => Err(HandlerError::permanent(describe(format!(
                "exited with {EXIT_PERMANENT}"
            )))),
            Some(code) => Err(HandlerError::retryable(describe(format!(
                "exited with {code}"
            )))),
            None => Err(HandlerError::retryable(describe(
                "killed by a signal".into(),
            ))),
        }
    }
}
