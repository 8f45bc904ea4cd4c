//! When to sync: kube-proxy's bounded-frequency runner, as pure logic over instants.
//!
//! - At least `min_interval` passes between the end of one sync and the start of the
//!   next; requests arriving meanwhile are coalesced into one sync.
//! - After a failure the sync runs again within `retry_interval`, even without a request.
//! - A sync runs at least every `max_interval` (kproxy makes that one a full sync, which
//!   re-reads the kernel and repairs drift).
//!
//! The runner holds no clock: callers pass `now`, so tests need no sleeping.
//!
//! ```
//! use kproxy::sync_runner::Runner;
//! use std::time::{Duration, Instant};
//! let t0 = Instant::now();
//! let mut r = Runner::new(Duration::from_secs(1), Duration::from_secs(30), Duration::from_secs(3600));
//! r.request();
//! assert!(r.due(t0));
//! r.finished(t0, true);
//! r.request();
//! assert!(!r.due(t0 + Duration::from_millis(500)), "coalesced until min_interval has passed");
//! assert!(r.due(t0 + Duration::from_secs(1)));
//! ```

use std::time::{Duration, Instant};

/// Why a sync is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Something changed.
    Requested,
    /// The previous sync failed.
    Retry,
    /// `max_interval` passed: a periodic full sync.
    Periodic,
}

/// The bounded-frequency runner's state.
#[derive(Debug, Clone)]
pub struct Runner {
    min_interval: Duration,
    retry_interval: Duration,
    max_interval: Duration,
    last_end: Option<Instant>,
    requested: bool,
    retry_at: Option<Instant>,
}

impl Runner {
    pub fn new(min_interval: Duration, retry_interval: Duration, max_interval: Duration) -> Self {
        Runner {
            min_interval,
            retry_interval,
            max_interval,
            last_end: None,
            requested: false,
            retry_at: None,
        }
    }

    /// Asks for a sync as soon as the minimum interval allows.
    pub fn request(&mut self) {
        self.requested = true;
    }

    /// Whether a request is waiting.
    pub fn pending(&self) -> bool {
        self.requested
    }

    fn earliest(&self) -> Option<Instant> {
        self.last_end.map(|t| t + self.min_interval)
    }

    /// Whether a sync should start now, and why.
    pub fn due_reason(&self, now: Instant) -> Option<Reason> {
        let allowed = self.earliest().is_none_or(|t| now >= t);
        if self.requested && allowed {
            return Some(Reason::Requested);
        }
        if self.retry_at.is_some_and(|t| now >= t) && allowed {
            return Some(Reason::Retry);
        }
        if self.last_end.is_some_and(|t| now >= t + self.max_interval) {
            return Some(Reason::Periodic);
        }
        None
    }

    /// Whether a sync should start now.
    pub fn due(&self, now: Instant) -> bool {
        self.due_reason(now).is_some()
    }

    /// When the runner next needs attention (a deadline to sleep until).
    pub fn next_deadline(&self, now: Instant) -> Instant {
        let mut next = self
            .last_end
            .map_or(now + self.max_interval, |t| t + self.max_interval);
        if self.requested {
            next = next.min(self.earliest().unwrap_or(now));
        }
        if let Some(r) = self.retry_at {
            next = next.min(r.max(self.earliest().unwrap_or(r)));
        }
        next.max(now)
    }

    /// Records a finished sync attempt.
    pub fn finished(&mut self, now: Instant, ok: bool) {
        self.last_end = Some(now);
        self.requested = false;
        self.retry_at = (!ok).then(|| now + self.retry_interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner() -> Runner {
        Runner::new(
            Duration::from_secs(1),
            Duration::from_secs(30),
            Duration::from_secs(3600),
        )
    }

    #[test]
    fn first_request_runs_at_once_and_bursts_coalesce() {
        let t0 = Instant::now();
        let mut r = runner();
        assert!(!r.due(t0), "nothing requested");
        r.request();
        r.request();
        assert_eq!(r.due_reason(t0), Some(Reason::Requested));
        r.finished(t0, true);
        for ms in [1, 200, 999] {
            r.request();
            assert!(!r.due(t0 + Duration::from_millis(ms)));
        }
        assert_eq!(r.next_deadline(t0), t0 + Duration::from_secs(1));
        assert!(r.due(t0 + Duration::from_secs(1)));
        r.finished(t0 + Duration::from_secs(1), true);
        assert!(!r.pending(), "one sync served the whole burst");
    }

    #[test]
    fn failure_retries_within_retry_interval_without_a_request() {
        let t0 = Instant::now();
        let mut r = runner();
        r.request();
        r.finished(t0, false);
        assert!(!r.due(t0 + Duration::from_secs(29)));
        assert_eq!(r.next_deadline(t0), t0 + Duration::from_secs(30));
        assert_eq!(
            r.due_reason(t0 + Duration::from_secs(30)),
            Some(Reason::Retry)
        );
        // A new request after a failure runs as soon as min_interval allows.
        r.request();
        assert!(r.due(t0 + Duration::from_secs(1)));
        r.finished(t0 + Duration::from_secs(1), true);
        assert!(
            !r.due(t0 + Duration::from_secs(31)),
            "success clears the retry"
        );
    }

    #[test]
    fn periodic_sync_after_max_interval() {
        let t0 = Instant::now();
        let mut r = runner();
        r.request();
        r.finished(t0, true);
        assert!(!r.due(t0 + Duration::from_secs(3599)));
        assert_eq!(
            r.next_deadline(t0 + Duration::from_secs(5)),
            t0 + Duration::from_secs(3600)
        );
        assert_eq!(
            r.due_reason(t0 + Duration::from_secs(3600)),
            Some(Reason::Periodic)
        );
    }

    #[test]
    fn deadline_is_never_in_the_past() {
        let t0 = Instant::now();
        let mut r = runner();
        r.request();
        r.finished(t0, true);
        r.request();
        let late = t0 + Duration::from_secs(10);
        assert_eq!(r.next_deadline(late), late);
    }
}
