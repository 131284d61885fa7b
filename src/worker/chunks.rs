//! How many events of a batch a handler runs in one call
//! ([`Handler::handle_batch`](super::Handler::handle_batch)).
//!
//! The worker checks, between calls, whether a handler may still start (the
//! lease has time left, no SIGTERM): a call of 500 slow statements would hold
//! both for as long as it runs. So each handler's calls start at one event
//! and grow while they stay short: a fast statement soon runs for the whole
//! batch in one call; a slow one stays at one event per call, checked before
//! each, as it always was.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::Duration,
};

/// A call that takes longer than this is too coarse a step between checks.
pub const TARGET: Duration = Duration::from_millis(50);

/// The largest call, whatever the batch size.
pub const MOST: usize = 1000;

/// The next call's size after a call of `size` events took `elapsed`:
/// doubles while calls take under half of [`TARGET`], halves when one takes
/// longer than it.
///
/// ```
/// use std::time::Duration;
/// use hookbox::worker::chunks::next_size;
///
/// assert_eq!(next_size(1, Duration::from_millis(1)), 2);
/// assert_eq!(next_size(64, Duration::from_millis(40)), 64);
/// assert_eq!(next_size(64, Duration::from_millis(300)), 32);
/// assert_eq!(next_size(1, Duration::from_secs(2)), 1);
/// ```
pub fn next_size(size: usize, elapsed: Duration) -> usize {
    if elapsed > TARGET {
        (size / 2).max(1)
    } else if elapsed < TARGET / 2 {
        (size * 2).min(MOST)
    } else {
        size
    }
}

/// Each transactional handler's current call size, shared by the worker's
/// tasks (a stale read only makes one call a step too large or too small).
#[derive(Default)]
pub(super) struct ChunkSizes(HashMap<String, Chunk>);

struct Chunk {
    size: AtomicUsize,
    /// Cleared once the handler showed it has no call for several events.
    batches: AtomicBool,
}

impl ChunkSizes {
    pub(super) fn new<'a>(handlers: impl IntoIterator<Item = &'a String>) -> Self {
        Self(
            handlers
                .into_iter()
                .map(|name| {
                    let chunk = Chunk {
                        size: AtomicUsize::new(1),
                        batches: AtomicBool::new(true),
                    };
                    (name.clone(), chunk)
                })
                .collect(),
        )
    }

    /// How many events `handler`'s next call may take.
    pub(super) fn size(&self, handler: &str) -> usize {
        match self.0.get(handler) {
            Some(chunk) if chunk.batches.load(Ordering::Relaxed) => {
                chunk.size.load(Ordering::Relaxed).max(1)
            }
            _ => 1,
        }
    }

    /// A call of `size` events took `elapsed`.
    pub(super) fn record(&self, handler: &str, size: usize, elapsed: Duration) {
        if let Some(chunk) = self.0.get(handler) {
            chunk
                .size
                .store(next_size(size, elapsed), Ordering::Relaxed);
        }
    }

    /// `handler` runs one event per call for good: it has no call for several.
    pub(super) fn one_at_a_time(&self, handler: &str) {
        if let Some(chunk) = self.0.get(handler) {
            chunk.batches.store(false, Ordering::Relaxed);
        }
    }
}
