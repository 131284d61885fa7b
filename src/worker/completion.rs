//! Completing claimed events: running their handlers and recording each
//! outcome with its attempt row, only while the lease is still this worker's.
//!
//! Every path ends the same way ([`Worker::record_and_commit`]): the outcomes
//! are written in one statement that re-checks each lease, and committed only
//! if every one of them still held.

use std::{collections::HashSet, sync::Arc};

use sqlx::{PgConnection, Postgres, Transaction};
use uuid::Uuid;

use super::{
    chunks,
    outcome::{self, Attempted, Processed},
    queue::{self, Claimed},
    registry::Runner,
    Error, Event, Handler, Result, Routed, Worker,
};

impl Worker {
    /// One transaction for the whole batch. Handlers usually succeed, so the
    /// batch first runs without savepoints and takes its events' row locks at
    /// the end, with the outcomes; if a handler fails or a lease turns out to
    /// be lost, that transaction is rolled back (nothing of it survives) and
    /// the batch runs again the careful way.
    pub(super) async fn complete_in_one_transaction(
        &self,
        batch: &[Routed<'_>],
    ) -> Result<Vec<Processed>> {
        match self.complete_optimistically(batch).await? {
            Some(processed) => Ok(processed),
            None => self.complete_carefully(batch).await,
        }
    }

    /// `None` if the batch needs the careful way; its transaction is rolled back.
    async fn complete_optimistically(
        &self,
        batch: &[Routed<'_>],
    ) -> Result<Option<Vec<Processed>>> {
        // The connection stays ours after a failed COMMIT (see below).
        let mut connection = self.pool.acquire().await?;
        let mut transaction = sqlx::Connection::begin(&mut *connection).await?;
        let Some(attempted) = self.run_handlers(batch, &mut transaction).await? else {
            transaction.rollback().await?;
            return Ok(None);
        };
        let mut recorded = Vec::with_capacity(batch.len());
        for (routed, attempted) in batch.iter().zip(attempted) {
            recorded.push((&routed.claimed.event, self.decide(routed, attempted)));
        }
        let processed = recorded
            .iter()
            .map(|(_, finish)| Processed::Recorded(finish.attempt_outcome))
            .collect();
        match self.record_and_commit(transaction, recorded).await {
            Ok(committed) => Ok(committed.then_some(processed)),
            // A deferred constraint, a serialization failure or a broken
            // connection at COMMIT: nothing of the batch survived. The careful
            // way finds which event (if any) is to blame.
            Err(error) => {
                tracing::warn!(
                    error = format!("{:#}", anyhow::Error::from(error)),
                    "the batch failed at commit; completing it the careful way"
                );
                // The server sends a COMMIT's error before it has rolled the
                // transaction back and released its row locks; the careful
                // way, on another connection, skips locked rows and would
                // take these for leases lost. Once this connection is ready
                // again, the rollback is done. (A broken connection: the
                // leases expire and a rescue retries, as always.)
                let _ = sqlx::Connection::ping(&mut *connection).await;
                Ok(None)
            }
        }
    }

    /// Locks the batch's events first, skipping those whose lease was lost;
    /// each handler runs in a savepoint, so a failing event rolls back alone
    /// while the others' effects commit together with their outcomes.
    async fn complete_carefully(&self, batch: &[Routed<'_>]) -> Result<Vec<Processed>> {
        let claims: Vec<&Claimed> = batch.iter().map(|r| &r.claimed).collect();
        let (mut transaction, held) = self.begin_holding(&claims).await?;
        let mut savepoint = Savepoint::default();
        let mut recorded = Vec::with_capacity(batch.len());
        let mut processed = Vec::with_capacity(batch.len());
        for routed in batch {
            let event = &routed.claimed.event;
            if !held.contains(&event.id) {
                outcome::log_lease_lost(event);
                processed.push(Processed::LeaseLost);
                continue;
            }
            let attempted = self
                .attempt_in(routed, &mut transaction, &mut savepoint)
                .await?;
            let finish = self.decide(routed, attempted);
            processed.push(Processed::Recorded(finish.attempt_outcome));
            recorded.push((event, finish));
        }
        if self.record_and_commit(transaction, recorded).await? {
            Ok(processed)
        } else {
            // Unreachable while the row locks hold (they were taken for these
            // very claims); nothing was committed.
            Ok(vec![Processed::LeaseLost; batch.len()])
        }
    }

    /// The first pass of a batch: runs every handler, each for its events of
    /// the batch in claim order, several events per call where the handler
    /// can ([`chunks`](super::chunks)). Whether the events may still start is
    /// checked before each call. Returns what each event's attempt came to,
    /// or `None` if a handler failed (the batch then runs the careful way).
    async fn run_handlers(
        &self,
        batch: &[Routed<'_>],
        transaction: &mut PgConnection,
    ) -> Result<Option<Vec<Attempted>>> {
        let now = std::time::Instant::now();
        let mut attempted: Vec<Option<Attempted>> = batch.iter().map(|_| None).collect();
        let mut groups: Vec<(&str, &Arc<dyn Handler>, Vec<usize>)> = Vec::new();
        for (position, routed) in batch.iter().enumerate() {
            match self.handler_to_run(routed, now) {
                Err(not_run) => attempted[position] = Some(not_run),
                Ok((name, handler)) => {
                    match groups.iter_mut().find(|(group, _, _)| *group == name) {
                        Some((_, _, positions)) => positions.push(position),
                        None => groups.push((name, handler, vec![position])),
                    }
                }
            }
        }
        for (name, handler, positions) in groups {
            let histogram =
                metrics::histogram!("hookbox_handler_seconds", "handler" => name.to_owned());
            let mut rest = positions.as_slice();
            while let Some(&first) = rest.first() {
                // One claim: its events share the lease and its deadline.
                if !self.may_start(&batch[first].claimed, std::time::Instant::now()) {
                    for &position in rest {
                        attempted[position] = Some(Attempted::NotStarted);
                    }
                    break;
                }
                let handed: Vec<&Event> = rest[..self.chunks.size(name).min(rest.len())]
                    .iter()
                    .map(|&position| &batch[position].claimed.event)
                    .collect();
                let started = std::time::Instant::now();
                // Never past the point where events stop starting.
                let budget = chunks::CALL_BUDGET.min(
                    batch[first]
                        .claimed
                        .start_by
                        .saturating_duration_since(started),
                );
                let called = match handed.as_slice() {
                    [_, _, ..] => handler.handle_batch(&handed, budget, transaction).await,
                    _ => None,
                };
                let ran = match called {
                    Some(Ok(ran)) if ran > 0 => ran.min(handed.len()),
                    Some(Err(_)) => return Ok(None),
                    // No call for several (or one that ran none): the first alone.
                    Some(Ok(_)) | None => match handler.handle(handed[0], transaction).await {
                        Ok(()) => 1,
                        Err(_) => return Ok(None),
                    },
                };
                self.chunks.record(name, handed.len(), ran);
                // Each event's share of the call.
                let each = started.elapsed().as_secs_f64() / ran as f64;
                let (done, tail) = rest.split_at(ran);
                for &position in done {
                    histogram.record(each);
                    attempted[position] = Some(Attempted::Ran(Ok(())));
                }
                rest = tail;
            }
        }
        Ok(Some(
            attempted
                .into_iter()
                .map(|a| a.expect("every event's attempt was decided"))
                .collect(),
        ))
    }

    /// The transactional handler `routed` goes to, by name, if it is to run
    /// now; otherwise what its attempt comes to without running.
    fn handler_to_run<'h>(
        &'h self,
        routed: &Routed<'h>,
        now: std::time::Instant,
    ) -> std::result::Result<(&'h str, &'h Arc<dyn Handler>), Attempted> {
        let Some((name, runner)) = routed
            .handler
            .and_then(|name| self.handlers.get(name).map(|runner| (name, runner)))
        else {
            return Err(Attempted::NoRoute);
        };
        match runner {
            _ if !self.may_start(&routed.claimed, now) => Err(Attempted::NotStarted),
            _ if routed.claimed.stale => Err(Attempted::Stale),
            _ if routed.claimed.payload_missing => Err(Attempted::PayloadPruned),
            Runner::External(_) => unreachable!("external handlers complete on their own"),
            Runner::InTransaction(handler) => Ok((name, handler)),
        }
    }

    /// Runs one event's handler in `transaction`, inside `savepoint`.
    async fn attempt_in(
        &self,
        routed: &Routed<'_>,
        transaction: &mut PgConnection,
        savepoint: &mut Savepoint,
    ) -> Result<Attempted> {
        let started = std::time::Instant::now();
        let attempted = match self.handler_to_run(routed, started) {
            Err(not_run) => not_run,
            Ok((_, handler)) => {
                savepoint.enter(transaction).await?;
                let mut result = handler.handle(&routed.claimed.event, transaction).await;
                if result.is_ok() {
                    // Deferred constraints are checked now, inside the
                    // event's savepoint, not at COMMIT where one event's
                    // violation would sink the batch.
                    if let Err(error) = check_deferred_constraints(transaction).await {
                        result = Err(super::handlers::sql::classify(error));
                    }
                }
                savepoint.leave(transaction, result.is_ok()).await?;
                Attempted::Ran(result)
            }
        };
        record_duration(routed.handler, started);
        Ok(attempted)
    }

    /// External effects happen outside any transaction (and hold no
    /// connection); their outcome is recorded afterwards if the lease still holds.
    pub(super) async fn complete_external(&self, routed: Routed<'_>) -> Result<Processed> {
        let _slot = self.slots.acquire().await.map_err(|_| Error::Stopped)?;
        let event = &routed.claimed.event;
        let Some(Runner::External(handler)) = self.runner(&routed) else {
            unreachable!("only external handlers complete on their own");
        };
        let started = std::time::Instant::now();
        let attempted = if !self.may_start(&routed.claimed, started) {
            Attempted::NotStarted
        } else {
            Attempted::Ran(handler.handle(event).await)
        };
        record_duration(routed.handler, started);
        let (mut transaction, held) = self.begin_holding(&[&routed.claimed]).await?;
        if held.is_empty() {
            outcome::log_lease_lost(event);
            return Ok(Processed::LeaseLost);
        }
        self.record_circuit(&mut transaction, &routed, &attempted)
            .await?;
        let finish = self.decide(&routed, attempted);
        let processed = Processed::Recorded(finish.attempt_outcome);
        if self
            .record_and_commit(transaction, vec![(event, finish)])
            .await?
        {
            Ok(processed)
        } else {
            Ok(Processed::LeaseLost)
        }
    }

    /// Whether `routed` goes to a handler that completes a batch at once
    /// (the broker publishes).
    pub(super) fn completes_together(&self, routed: &Routed<'_>) -> bool {
        matches!(self.runner(routed), Some(Runner::External(handler)) if handler.completes_as_a_batch())
    }

    /// Runs the batch's handlers at once (one slot for all), then records
    /// every outcome in one transaction, for the events whose lease is still
    /// this worker's: one commit per batch instead of one per event.
    pub(super) async fn complete_together(&self, batch: &[Routed<'_>]) -> Result<Vec<Processed>> {
        let attempts = batch.iter().map(|routed| async move {
            let Some(Runner::External(handler)) = self.runner(routed) else {
                unreachable!("only external handlers complete together");
            };
            let started = std::time::Instant::now();
            let attempted = if self.may_start(&routed.claimed, started) {
                Attempted::Ran(handler.handle(&routed.claimed.event).await)
            } else {
                Attempted::NotStarted
            };
            record_duration(routed.handler, started);
            attempted
        });
        let attempted = futures_util::future::join_all(attempts).await;
        let claims: Vec<&Claimed> = batch.iter().map(|r| &r.claimed).collect();
        let (mut transaction, held) = self.begin_holding(&claims).await?;
        // Circuits are recorded in handler-name order, the order in which
        // claims lock handlers too: batches that share handlers never wait
        // for each other in a cycle.
        let mut by_handler: Vec<(&Routed<'_>, &Attempted)> = batch
            .iter()
            .zip(&attempted)
            .filter(|(routed, _)| held.contains(&routed.claimed.event.id))
            .collect();
        by_handler.sort_by_key(|(routed, _)| routed.handler);
        for (routed, attempted) in by_handler {
            self.record_circuit(&mut transaction, routed, attempted)
                .await?;
        }
        let mut recorded = Vec::with_capacity(batch.len());
        let mut processed = Vec::with_capacity(batch.len());
        for (routed, attempted) in batch.iter().zip(attempted) {
            let event = &routed.claimed.event;
            if !held.contains(&event.id) {
                outcome::log_lease_lost(event);
                processed.push(Processed::LeaseLost);
                continue;
            }
            let finish = self.decide(routed, attempted);
            processed.push(Processed::Recorded(finish.attempt_outcome));
            recorded.push((event, finish));
        }
        if self.record_and_commit(transaction, recorded).await? {
            Ok(processed)
        } else {
            Ok(vec![Processed::LeaseLost; batch.len()])
        }
    }

    /// What the attempt does to its handler's circuit, if it has one, in the
    /// transaction that records the attempt.
    async fn record_circuit(
        &self,
        transaction: &mut PgConnection,
        routed: &Routed<'_>,
        attempted: &Attempted,
    ) -> Result<()> {
        if let (Some(name), Attempted::Ran(result)) = (routed.handler, attempted) {
            if let Some(circuit) = self.circuits.get(name) {
                let event = routed.claimed.event.id;
                queue::record_circuit(transaction, name, event, circuit, result, self.policy.max)
                    .await?;
            }
        }
        Ok(())
    }

    fn decide<'a>(&self, routed: &Routed<'a>, attempted: Attempted) -> queue::Finish<'a> {
        outcome::decide(
            &self.policy,
            &routed.claimed.event,
            routed.claimed.attempt,
            routed.handler,
            attempted,
            rand::random_range(-1.0..=1.0),
        )
    }

    /// Begins a transaction and locks the events of those `claims` this
    /// worker still holds.
    async fn begin_holding(
        &self,
        claims: &[&Claimed],
    ) -> Result<(Transaction<'static, Postgres>, HashSet<Uuid>)> {
        let mut transaction = self.pool.begin().await?;
        let held = queue::lock_held(&mut transaction, &self.id, claims).await?;
        Ok((transaction, held))
    }

    /// Records the outcomes and commits, if every event is still held in this
    /// attempt; otherwise rolls back and returns `false`. Logs after the commit.
    async fn record_and_commit(
        &self,
        mut transaction: Transaction<'_, Postgres>,
        recorded: Vec<(&Event, queue::Finish<'_>)>,
    ) -> Result<bool> {
        let finishes: Vec<&queue::Finish<'_>> = recorded.iter().map(|(_, f)| f).collect();
        if queue::finish(&mut transaction, &self.id, &finishes).await? < finishes.len() {
            transaction.rollback().await?;
            return Ok(false);
        }
        transaction.commit().await?;
        for (event, finish) in &recorded {
            outcome::log_outcome(event, finish);
        }
        Ok(true)
    }
}

/// One savepoint reused through a batch: a success releases it and sets the
/// next in the same round trip; a failure rolls back to it, which keeps it.
#[derive(Default)]
struct Savepoint {
    open: bool,
    needs_renewal: bool,
}

impl Savepoint {
    async fn enter(&mut self, transaction: &mut PgConnection) -> Result<(), sqlx::Error> {
        let statement = match (self.open, self.needs_renewal) {
            (false, _) => "SAVEPOINT hookbox_event",
            (true, true) => "RELEASE SAVEPOINT hookbox_event; SAVEPOINT hookbox_event",
            (true, false) => return Ok(()),
        };
        sqlx::Executor::execute(transaction, statement).await?;
        self.open = true;
        self.needs_renewal = false;
        Ok(())
    }

    async fn leave(
        &mut self,
        transaction: &mut PgConnection,
        succeeded: bool,
    ) -> Result<(), sqlx::Error> {
        if succeeded {
            self.needs_renewal = true;
        } else {
            sqlx::Executor::execute(transaction, "ROLLBACK TO SAVEPOINT hookbox_event").await?;
        }
        Ok(())
    }
}

/// Checks the constraints deferred so far (`SET CONSTRAINTS ALL IMMEDIATE`
/// checks them at once), then defers again for the next event's handler.
async fn check_deferred_constraints(transaction: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::Executor::execute(
        transaction,
        "SET CONSTRAINTS ALL IMMEDIATE; SET CONSTRAINTS ALL DEFERRED",
    )
    .await?;
    Ok(())
}

fn record_duration(handler: Option<&str>, started: std::time::Instant) {
    if let Some(name) = handler {
        metrics::histogram!("hookbox_handler_seconds", "handler" => name.to_owned())
            .record(started.elapsed().as_secs_f64());
    }
}
