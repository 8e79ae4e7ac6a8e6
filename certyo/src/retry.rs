//! When to try again. Pure functions, so the policy is tested without a clock.

use std::time::Duration;

/// The pause before retry `retry` (0-based) of a request answered 429: 1 s, doubling, and never
/// less than the server's `Retry-After`. Never zero: a 429 is never retried at once.
pub fn rate_limit_delay(retry: u32, retry_after: Option<Duration>) -> Duration {
    let doubling = Duration::from_secs(1u64 << retry.min(16));
    retry_after.map_or(doubling, |server| server.max(doubling))
}

/// The default longest wait between two attempts (`certyo.max_retry_interval`).
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// How long something that failed transiently `attempts` times (≥ 1) waits before the next try:
/// 1 s doubling up to `cap`, scaled by `jitter` in [0, 1) to between half and all of it, so
/// records that failed together do not all come back together.
pub fn next_attempt_delay(attempts: u32, jitter: f64, cap: Duration) -> Duration {
    let exponent = attempts.saturating_sub(1).min(16);
    let full = Duration::from_secs(1u64 << exponent).min(cap.max(Duration::from_secs(1)));
    full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_back_off_from_one_second_doubling_and_honour_a_larger_retry_after() {
        assert_eq!(rate_limit_delay(0, None), Duration::from_secs(1));
        assert_eq!(rate_limit_delay(1, None), Duration::from_secs(2));
        assert_eq!(rate_limit_delay(2, None), Duration::from_secs(4));
        assert_eq!(
            rate_limit_delay(0, Some(Duration::from_secs(5))),
            Duration::from_secs(5)
        );
        assert_eq!(
            rate_limit_delay(2, Some(Duration::from_secs(1))),
            Duration::from_secs(4)
        );
        assert_eq!(
            rate_limit_delay(0, Some(Duration::ZERO)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn transient_failures_back_off_exponentially_with_jitter_and_a_cap() {
        assert_eq!(
            next_attempt_delay(1, 1.0, MAX_BACKOFF),
            Duration::from_secs(1)
        );
        assert_eq!(
            next_attempt_delay(3, 1.0, MAX_BACKOFF),
            Duration::from_secs(4)
        );
        assert_eq!(
            next_attempt_delay(3, 0.0, MAX_BACKOFF),
            Duration::from_secs(2)
        );
        assert_eq!(next_attempt_delay(40, 1.0, MAX_BACKOFF), MAX_BACKOFF);
        assert!(next_attempt_delay(40, 0.0, MAX_BACKOFF) >= MAX_BACKOFF / 2);
        let minute = Duration::from_secs(60);
        assert_eq!(
            next_attempt_delay(40, 1.0, minute),
            minute,
            "the cap is a setting"
        );
    }
}
