//! How many events of a batch a handler is handed in one call
//! ([`Handler::handle_batch`](super::Handler::handle_batch)), and how long a
//! call may run.
//!
//! The worker checks, between calls, whether the rest of a batch may still
//! start (the lease has time left, no SIGTERM), so a call is bounded by time
//! ([`CALL_BUDGET`]): it stops after the event during which the budget ran
//! out and says how many events it ran. What a call is handed is bounded too,
//! by what recent calls managed: a slow statement is not sent a whole
//! batch's payloads again at every call.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

/// A call runs events until this much time has passed (the first event runs
/// whatever it takes, as it did alone): the longest step between two checks
/// that the rest of the batch may still start.
pub const CALL_BUDGET: Duration = Duration::from_millis(50);

/// The most events one call is handed, whatever the batch size.
pub const MOST: usize = 1000;

/// How many events to hand the next call, after a call handed `handed` events
/// ran `ran` of them within its budget: twice as many while calls run all
/// they are handed, and what fitted otherwise.
///
/// ```
/// use hookbox::worker::chunks::next_size;
///
/// assert_eq!(next_size(1, 1), 2);
/// assert_eq!(next_size(600, 600), 1000);
/// assert_eq!(next_size(64, 10), 10);
/// assert_eq!(next_size(64, 0), 1);
/// ```
pub fn next_size(handed: usize, ran: usize) -> usize {
    if ran >= handed {
        (handed * 2).min(MOST)
    } else {
        ran.max(1)
    }
}

/// Each transactional handler's current call size, shared by the worker's
/// tasks (a stale read only hands one call a step too many or too few).
pub(super) struct ChunkSizes(HashMap<String, AtomicUsize>);

impl ChunkSizes {
    /// Every handler starts at one event per call.
    pub(super) fn new<'a>(handlers: impl IntoIterator<Item = &'a String>) -> Self {
        Self(
            handlers
                .into_iter()
                .map(|name| (name.clone(), AtomicUsize::new(1)))
                .collect(),
        )
    }

    /// How many events `handler`'s next call may be handed.
    pub(super) fn size(&self, handler: &str) -> usize {
        self.0
            .get(handler)
            .map_or(1, |size| size.load(Ordering::Relaxed).max(1))
    }

    /// A call of `handler` was handed `handed` events and ran `ran`.
    pub(super) fn record(&self, handler: &str, handed: usize, ran: usize) {
        if let Some(size) = self.0.get(handler) {
            size.store(next_size(handed, ran), Ordering::Relaxed);
        }
    }
}
