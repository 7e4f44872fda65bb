//! A rate limit for uploads: requests per second and bytes per second.
//!
//! Each request reserves its slot in a virtual schedule (the earliest time
//! both budgets allow it) and sleeps until then, so bursts are smoothed and
//! concurrent uploaders share the budget fairly. Zero disables a budget.

use parking_lot::Mutex;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct RateLimit {
    per_request: Duration,
    per_byte_ns: f64,
    next: Mutex<Option<Instant>>,
}

impl RateLimit {
    pub(crate) fn new(requests_per_s: u32, bytes_per_s: u64) -> Self {
        Self {
            per_request: if requests_per_s == 0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(1.0 / f64::from(requests_per_s))
            },
            per_byte_ns: if bytes_per_s == 0 {
                0.0
            } else {
                1e9 / bytes_per_s as f64
            },
            next: Mutex::new(None),
        }
    }

    /// The time one request of `bytes` costs against the budgets.
    fn cost(&self, bytes: u64) -> Duration {
        let by_bytes = Duration::from_nanos((self.per_byte_ns * bytes as f64) as u64);
        self.per_request.max(by_bytes)
    }

    /// Waits until a request of `bytes` may start.
    pub(crate) async fn acquire(&self, bytes: u64) {
        let cost = self.cost(bytes);
        if cost.is_zero() {
            return;
        }
        let start = {
            let mut next = self.next.lock();
            let now = Instant::now();
            let start = next.map_or(now, |n| n.max(now));
            *next = Some(start + cost);
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn spaces_requests_by_the_tighter_budget() {
        // 10 requests/s and 1000 bytes/s: a 500-byte request costs 0.5 s.
        let l = RateLimit::new(10, 1000);
        let t0 = Instant::now();
        for _ in 0..4 {
            l.acquire(500).await;
        }
        // Starts at 0, 0.5, 1.0, 1.5 s.
        assert_eq!(Instant::now() - t0, Duration::from_millis(1500));
        // Small requests: the request budget rules (0.1 s each).
        let l = RateLimit::new(10, 1000);
        let t0 = Instant::now();
        for _ in 0..5 {
            l.acquire(1).await;
        }
        assert_eq!(Instant::now() - t0, Duration::from_millis(400));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_is_unlimited() {
        let l = RateLimit::new(0, 0);
        let t0 = Instant::now();
        for _ in 0..100 {
            l.acquire(1 << 30).await;
        }
        assert_eq!(Instant::now(), t0);
    }
}
