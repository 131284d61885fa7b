//! External handlers whose calls are cheap to run all at once (the broker
//! publishes) complete a claimed batch together: every event's handler runs
//! concurrently, holding the batch's one slot, and the outcomes are recorded
//! in one transaction. One commit per batch instead of one per event is what
//! lets a worker forward events faster than the database commits.

use std::time::Instant;

use super::{
    lease_lost, log_outcome, queue, record_duration, AttemptOutcome, Attempted, Event, Routed,
    Runner, Worker,
};

impl Worker {
    /// Whether `routed` goes to a handler that completes as a batch.
    pub(super) fn completes_together(&self, routed: &Routed<'_>) -> bool {
        matches!(self.runner(routed), Some(Runner::External(handler)) if handler.completes_as_a_batch())
    }

    /// Runs the batch's handlers at once, then records every outcome in one
    /// transaction, for the events whose lease is still this worker's.
    pub(super) async fn complete_together(
        &self,
        batch: Vec<Routed<'_>>,
    ) -> anyhow::Result<Vec<AttemptOutcome>> {
        let attempts = batch.iter().map(|routed| async move {
            let Some(Runner::External(handler)) = self.runner(routed) else {
                unreachable!("only external handlers complete together");
            };
            let started = Instant::now();
            let attempted = if self.may_start(&routed.claimed, started) {
                Attempted::Ran(handler.handle(&routed.claimed.event).await)
            } else {
                Attempted::NotStarted
            };
            record_duration(routed.handler, started);
            attempted
        });
        let attempted = futures_util::future::join_all(attempts).await;

        let mut transaction = self.pool.begin().await?;
        let events: Vec<&Event> = batch.iter().map(|r| &r.claimed.event).collect();
        let held = queue::lock_held(&mut transaction, &self.id, &events).await?;
        let mut finished = Vec::with_capacity(batch.len());
        let mut recorded = Vec::with_capacity(batch.len());
        let mut outcomes = Vec::with_capacity(batch.len());
        for (routed, attempted) in batch.iter().zip(attempted) {
            let event = &routed.claimed.event;
            if !held.contains(&event.id) {
                lease_lost(event);
                outcomes.push(AttemptOutcome::LeaseLost);
                continue;
            }
            let (finish, outcome) = self.decide(routed, attempted);
            finished.push(finish);
            recorded.push(event);
            outcomes.push(outcome);
        }
        queue::finish(&mut transaction, &self.id, &finished).await?;
        transaction.commit().await?;
        for (event, finish) in recorded.into_iter().zip(&finished) {
            log_outcome(event, finish);
        }
        Ok(outcomes)
    }
}
