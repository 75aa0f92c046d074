//! Capped exponential back-off with jitter: the one retry schedule of every push.

use std::time::Duration;

use rand::Rng;

/// Retry `n` waits between half and all of `base · 2^(n-1)`, never more than `cap`. Jitter
/// spreads the retries of many subscriptions failing together; the half-to-full range keeps
/// each wait at least as long as the previous one, so the schedule still doubles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first retry's delay (before jitter).
    pub base: Duration,
    /// The longest delay.
    pub cap: Duration,
}

impl Backoff {
    /// The delay before retry `attempt` (1 for the first retry); `unit` in `[0, 1)` picks
    /// where in the jitter range it falls.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let full = self.ceiling(attempt);
        let half = full / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The delay before retry `attempt` without jitter: the top of its range.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(31);
        self.base
            .checked_mul(1u32 << exp)
            .unwrap_or(self.cap)
            .min(self.cap)
    }

    /// [`Backoff::delay`] with a random jitter.
    pub fn delay_random(&self, attempt: u32) -> Duration {
        self.delay(attempt, rand::rng().random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let b = Backoff {
            base: Duration::from_secs(5),
            cap: Duration::from_secs(3600),
        };
        assert_eq!(b.delay(1, 0.0), Duration::from_millis(2500));
        assert_eq!(b.delay(1, 1.0), Duration::from_secs(5));
        assert_eq!(b.delay(2, 1.0), Duration::from_secs(10));
        assert_eq!(b.delay(3, 0.5), Duration::from_millis(15_000));
        for attempt in 1..200 {
            for u in [0.0, 0.3, 0.999] {
                let d = b.delay(attempt, u);
                assert!(d <= b.cap, "attempt {attempt} waits {d:?}");
                assert!(d >= b.delay(attempt.min(11), 0.0).min(b.cap / 2));
            }
        }
        // The first retry does not wait an hour (the shipped `1 << n.max(6)` bug).
        assert!(b.delay(1, 1.0) < Duration::from_secs(60));
        assert_eq!(b.delay(100, 1.0), b.cap);
        assert!(b.delay(0, 1.0) <= b.base);
    }

    #[test]
    fn a_jittered_wait_is_never_shorter_than_the_one_before() {
        let b = Backoff {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(60),
        };
        for attempt in 1..20 {
            // The shortest next wait is the longest previous one.
            assert!(b.delay(attempt + 1, 0.0) >= b.delay(attempt, 1.0).min(b.cap / 2));
        }
    }
}
