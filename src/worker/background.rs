//! What runs beside the claim loop: LISTEN for new events, lease rescue, the
//! queue gauges and the history's partitions.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use sqlx::{postgres::PgListener, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{queue, Worker};

/// The channel the inbox's trigger notifies when events are stored.
const CHANNEL: &str = "hookbox_events";

/// Lease rescue, the queue gauges and the partitions, on their own task: a
/// slow count over a large table never holds up claiming.
pub(super) async fn housekeeping(worker: Arc<Worker>, shutdown: CancellationToken) {
    let every = (worker.lease / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        maintain_partitions(&worker).await;
        match worker.rescue_expired_leases().await {
            Ok(0) => {}
            Ok(n) => {
                metrics::counter!("hookbox_lease_rescues_total").increment(n);
                tracing::warn!(rescued = n, "expired leases rescued");
            }
            Err(error) => tracing::warn!(error = format!("{error:#}"), "lease rescue failed"),
        }
        if let Err(error) = queue::clear_ordering_locks(&worker.pool).await {
            tracing::warn!(error = %error, "cannot clear idle ordering keys");
        }
        record_gauges(&worker).await;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// The task name partition making is elected under (`inbox_housekeeping`).
const PARTITIONS_TASK: &str = "partitions";

/// If this worker is elected for the period, makes the partitions the
/// history needs ahead; the other workers leave it to the elected one.
async fn maintain_partitions(worker: &Worker) {
    let settings = worker.partitions;
    let elected = crate::db::partitions::elect(
        &worker.pool,
        PARTITIONS_TASK,
        &worker.id,
        settings.check_every(),
    )
    .await;
    match elected {
        Ok(true) => {}
        Ok(false) => return,
        Err(error) => {
            tracing::warn!(error = %error, "cannot take part in the partitions election");
            return;
        }
    }
    let outcome = crate::db::make_partitions(&worker.pool, settings).await;
    let error = match &outcome {
        Ok(made) => {
            if !made.is_empty() {
                tracing::info!(partitions = ?made, "partitions made ahead");
            }
            None
        }
        Err(error) => {
            tracing::warn!(error = %error, "cannot make partitions ahead; the next run tries again");
            Some(error.to_string())
        }
    };
    if let Err(error) =
        crate::db::partitions::record_run(&worker.pool, PARTITIONS_TASK, error.as_deref()).await
    {
        tracing::warn!(error = %error, "cannot record the partitions run");
    }
}

/// Queue depth, the oldest due event's age and pool usage, as gauges.
async fn record_gauges(worker: &Worker) {
    crate::telemetry::record_pool("worker", &worker.pool);
    let Ok((counts, oldest)) = queue::depth(&worker.pool).await else {
        return;
    };
    // Every status of every source with open events, zeros included, so a
    // drained queue reads 0 rather than its last value.
    let sources: BTreeSet<&str> = counts
        .iter()
        .map(|(source, _, _)| source.as_str())
        .chain(worker.sources.iter().map(String::as_str))
        .collect();
    for source in sources {
        for status in queue::GAUGED_STATUSES {
            let n = counts
                .iter()
                .find(|(s, st, _)| s == source && *st == status)
                .map_or(0, |(_, _, n)| *n);
            metrics::gauge!("hookbox_events", "source" => source.to_owned(), "status" => status.as_str())
                .set(n as f64);
        }
    }
    metrics::gauge!("hookbox_oldest_due_seconds").set(oldest.unwrap_or(0.0));
    if let Ok(flow) = queue::flow_state(&worker.pool).await {
        record_flow(worker, &flow);
    }
}

/// Pauses (1 while paused), circuits (1 while open or probing) and every
/// circuit change, from the database.
fn record_flow(worker: &Worker, flow: &queue::FlowState) {
    let paused = |kind: &str, name: &str| flow.pauses.iter().any(|(k, n)| k == kind && n == name);
    for source in &worker.sources {
        metrics::gauge!("hookbox_paused", "kind" => "source", "name" => source.clone())
            .set(f64::from(u8::from(paused("source", source))));
    }
    for handler in worker.handlers.keys() {
        metrics::gauge!("hookbox_paused", "kind" => "handler", "name" => handler.clone())
            .set(f64::from(u8::from(paused("handler", handler))));
    }
    for (handler, circuit) in &flow.circuits {
        metrics::gauge!("hookbox_circuit_open", "handler" => handler.clone())
            .set(f64::from(u8::from(circuit != "closed")));
    }
    for (handler, change, n) in &flow.changes {
        metrics::counter!("hookbox_circuit_changes_total", "handler" => handler.clone(), "change" => change.clone())
            .absolute(*n as u64);
    }
}

/// Wakes the claim loop on every notification; reconnects after a database
/// restart (polling covers the gap).
pub(super) async fn listen(pool: PgPool, wake: Arc<Notify>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        }
        .await;
        let mut listener = match connected {
            Ok(listener) => listener,
            Err(_) => {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                received = listener.try_recv() => match received {
                    Ok(Some(_)) => wake.notify_one(),
                    // The connection dropped: events may have come meanwhile.
                    Ok(None) => wake.notify_one(),
                    Err(_) => break,
                },
            }
        }
    }
}
