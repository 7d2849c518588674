//! Retry pacing for the services: the [`ferry_core::error_policy`] schedules as `backon`
//! backoffs (exponential, capped, with jitter).

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use ferry_core::error_policy::Schedule;

/// The delays of `schedule`, one per retry; ends after its attempts if it is bounded.
pub fn backoff(schedule: &Schedule) -> ExponentialBackoff {
    builder(schedule).build()
}

/// The `backon` builder of `schedule`, for `Retryable::retry`.
pub fn builder(schedule: &Schedule) -> ExponentialBuilder {
    let builder = ExponentialBuilder::default()
        .with_min_delay(schedule.first)
        .with_max_delay(schedule.max)
        .with_factor(schedule.factor)
        .with_jitter();
    match schedule.attempts {
        Some(times) => builder.with_max_times(times),
        None => builder.without_max_times(),
    }
}

/// The delay before retry `attempt` (1 for the first) of `schedule`, jitter included: for
/// retries paced across processes, whose count lives in etcd rather than in an iterator.
pub fn delay(schedule: &Schedule, attempt: u32) -> Duration {
    let unbounded = Schedule {
        attempts: None,
        ..*schedule
    };
    let skip = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
    backoff(&unbounded).nth(skip).unwrap_or(schedule.max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::error_policy::{SETUP, STREAM};

    #[test]
    fn delays_carry_jitter_within_their_step() {
        for attempt in 1..12 {
            let nominal = STREAM.nominal(attempt);
            let d = delay(&STREAM, attempt);
            assert!(d >= nominal && d < nominal * 2, "{attempt}: {d:?}");
        }
        assert_eq!(backoff(&SETUP).count(), 3);
    }
}
