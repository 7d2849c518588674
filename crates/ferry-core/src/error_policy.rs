//! One error policy: what Ferry does about a failure, decided in one place.
//!
//! Each crate maps its own errors into an [`ErrorClass`] once, from what the server said:
//! ClickHouse by exception code ([`clickhouse_exception`], or the HTTP status of an answer
//! without one, [`http_status`]), Postgres by SQLSTATE ([`postgres_sqlstate`]), etcd by gRPC
//! code ([`grpc_status`]). The loops that retry (the CDC stream, snapshot partitions, Setup,
//! the coordinator's jobs) decide from the class alone, and pace their retries by a
//! [`Schedule`] of this module.
//!
//! The three classes:
//! - [`ErrorClass::Retry`]: the failure passes by itself (a server down or overloaded, a
//!   dropped connection, a lock conflict). Retried with exponential backoff and jitter, shown
//!   in the pipe's status while it lasts.
//! - [`ErrorClass::RetryAfterAction`]: a person must act, but nothing is lost by waiting for
//!   them: credentials or grants revoked, a full disk. Failing the pipe would only force a
//!   reload once the cause is fixed, so running work is retried at the same capped pace with
//!   the remedy in the status, and resumes by itself. Setup, which has nothing to resume yet,
//!   fails with it at once: the person creating the pipe is the one to act.
//! - [`ErrorClass::Permanent`]: retrying cannot help (the destination table is gone, a value
//!   the destination refuses, an unknown error): the pipe fails with the remedy. An error
//!   this module does not know is permanent: waiting on it forever would hide it.

use std::time::Duration;

/// What Ferry does about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Transient: retry with backoff.
    Retry,
    /// Waits for an operator; running work retries (visibly) rather than fails.
    RetryAfterAction,
    /// The pipe fails.
    Permanent,
}

impl ErrorClass {
    /// Whether running work tries again (everything but [`ErrorClass::Permanent`]).
    pub fn retries(self) -> bool {
        self != Self::Permanent
    }

    /// Whether trying again can succeed without anyone acting ([`ErrorClass::Retry`]).
    pub fn passes_by_itself(self) -> bool {
        self == Self::Retry
    }
}

/// A failure's class and what a person can do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// What Ferry does.
    pub class: ErrorClass,
    /// What a person can do (for a [`ErrorClass::Retry`], usually nothing).
    pub remedy: String,
}

impl Verdict {
    /// A verdict of `class` with `remedy`.
    pub fn new(class: ErrorClass, remedy: impl Into<String>) -> Self {
        Self {
            class,
            remedy: remedy.into(),
        }
    }
}

/// A ClickHouse exception code (`X-ClickHouse-Exception-Code`, `Code: N.` in the error text;
/// names as in ClickHouse's `src/Common/ErrorCodes.cpp`).
pub fn clickhouse_exception(code: u32) -> ErrorClass {
    match code {
        // TIMEOUT_EXCEEDED, TOO_SLOW, QUOTA_EXCEEDED, TOO_MANY_SIMULTANEOUS_QUERIES,
        // NO_FREE_CONNECTION, SOCKET_TIMEOUT, NETWORK_ERROR, NO_ZOOKEEPER, ABORTED,
        // MEMORY_LIMIT_EXCEEDED, TABLE_IS_READ_ONLY (replicated tables while Keeper is away),
        // UNEXPECTED_ZOOKEEPER_ERROR, TOO_MANY_PARTS, ALL_CONNECTION_TRIES_FAILED,
        // TOO_FEW_LIVE_REPLICAS, UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE, UNKNOWN_STATUS_OF_INSERT,
        // SESSION_IS_LOCKED, QUERY_WAS_CANCELLED, ALL_REPLICAS_LOST, SYSTEM_ERROR,
        // CANNOT_SCHEDULE_TASK, DEADLOCK_AVOIDED, TABLE_IS_BEING_RESTARTED,
        // QUERY_WAS_CANCELLED_BY_CLIENT, KEEPER_EXCEPTION, POCO_EXCEPTION (network trouble).
        159 | 160 | 201 | 202 | 203 | 209 | 210 | 225 | 236 | 241 | 242 | 244 | 252 | 279 | 285
        | 286 | 319 | 373 | 394 | 415 | 425 | 439 | 473 | 733 | 735 | 999 | 1000 => {
            ErrorClass::Retry
        }
        // READONLY (the user's profile), UNKNOWN_USER, REQUIRED_PASSWORD, NOT_ENOUGH_SPACE,
        // ACCESS_DENIED, AUTHENTICATION_FAILED.
        164 | 192 | 194 | 243 | 497 | 516 => ErrorClass::RetryAfterAction,
        // NO_SUCH_COLUMN_IN_TABLE (16), UNKNOWN_TABLE (60), UNKNOWN_DATABASE (81),
        // TYPE_MISMATCH (53), CANNOT_PARSE_* (6, 26, 27, 38, 41, 72), CANNOT_READ_ALL_DATA
        // (33), and everything not listed above.
        _ => ErrorClass::Permanent,
    }
}

/// The HTTP status of a ClickHouse answer that carried no exception code: a proxy or load
/// balancer in front of the server answered (the server itself always names its exception).
pub fn http_status(status: u16) -> ErrorClass {
    match status {
        408 | 425 | 429 | 500..=599 => ErrorClass::Retry,
        401 | 403 | 407 => ErrorClass::RetryAfterAction,
        _ => ErrorClass::Permanent,
    }
}

/// A Postgres SQLSTATE (five characters, `tokio_postgres::error::SqlState::code`).
pub fn postgres_sqlstate(code: &str) -> ErrorClass {
    match code {
        // disk_full; insufficient_privilege.
        "53100" | "42501" => ErrorClass::RetryAfterAction,
        // serialization_failure, deadlock_detected, object_in_use (a slot still active after
        // a takeover), lock_not_available, query_canceled, read_only_sql_transaction (a
        // failover in progress).
        "40001" | "40P01" | "55006" | "55P03" | "57014" | "25006" => ErrorClass::Retry,
        // database_dropped.
        "57P04" => ErrorClass::Permanent,
        // Class 28: invalid authorization (password changed, pg_hba.conf).
        _ if code.starts_with("28") => ErrorClass::RetryAfterAction,
        // Classes 08 (connection), 53 (insufficient resources), 57P (admin or crash shutdown,
        // cannot connect now), 58 (system, I/O errors).
        _ if code.starts_with("08")
            || code.starts_with("53")
            || code.starts_with("57P")
            || code.starts_with("58") =>
        {
            ErrorClass::Retry
        }
        // 42P01 undefined_table, 42703 undefined_column, class 22 data exceptions, …
        _ => ErrorClass::Permanent,
    }
}

/// A gRPC status code (`tonic::Code` as a number) of an etcd request.
pub fn grpc_status(code: i32) -> ErrorClass {
    match code {
        // Cancelled, Unknown, DeadlineExceeded, ResourceExhausted, Aborted, Internal,
        // Unavailable: a member restarting, a leader election, an overloaded cluster.
        1 | 2 | 4 | 8 | 10 | 13 | 14 => ErrorClass::Retry,
        // PermissionDenied, Unauthenticated.
        7 | 16 => ErrorClass::RetryAfterAction,
        // InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, OutOfRange (a
        // compacted revision), Unimplemented, DataLoss: the request itself is wrong.
        _ => ErrorClass::Permanent,
    }
}

/// How a retry loop paces itself: exponential from `first` by `factor` up to `max`, each delay
/// plus a random jitter of up to itself (so `[d, 2d)`), at most `attempts` tries if bounded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// The first delay.
    pub first: Duration,
    /// The largest delay before jitter.
    pub max: Duration,
    /// Growth per attempt.
    pub factor: f32,
    /// Retries before giving up, or `None` to keep trying.
    pub attempts: Option<usize>,
}

/// The CDC stream: it must keep trying while ClickHouse or Postgres is away (the slot keeps
/// the changes), checking often enough that an outage's end is noticed within ~20 s.
pub const STREAM: Schedule = Schedule {
    first: Duration::from_secs(1),
    max: Duration::from_secs(10),
    factor: 2.0,
    attempts: None,
};

/// A snapshot partition: paced per partition (the schedule picks the delay from the
/// partition's count of failures, kept in etcd), never giving up on a transient failure.
pub const PARTITION: Schedule = STREAM;

/// Setup: bounded, since the person creating the pipe waits for its outcome: three retries
/// within about 4 to 7 seconds ride out a dropped connection or a server's quick restart; a
/// pipe refused by a longer outage is brought back with `ferry resync` once the server is up.
pub const SETUP: Schedule = Schedule {
    first: Duration::from_millis(500),
    max: Duration::from_secs(4),
    factor: 2.0,
    attempts: Some(3),
};

/// The coordinator's jobs interrupted by etcd: they run until done or deposed.
pub const JOB: Schedule = Schedule {
    first: Duration::from_millis(500),
    max: Duration::from_secs(10),
    factor: 2.0,
    attempts: None,
};

impl Schedule {
    /// The delay before retry `attempt` (1 for the first retry) without jitter.
    pub fn nominal(&self, attempt: u32) -> Duration {
        let grown = self.first.as_secs_f64()
            * f64::from(self.factor).powi(i32::try_from(attempt.saturating_sub(1)).unwrap_or(0));
        Duration::from_secs_f64(grown.min(self.max.as_secs_f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clickhouse_outage_codes_are_retried_and_schema_codes_are_not() {
        for code in [241, 242, 252, 425, 999, 159, 209, 210] {
            assert_eq!(clickhouse_exception(code), ErrorClass::Retry, "{code}");
        }
        for code in [16, 60, 81, 53, 6, 27, 33, 62, 12345] {
            assert_eq!(clickhouse_exception(code), ErrorClass::Permanent, "{code}");
        }
        for code in [516, 497, 243] {
            assert_eq!(clickhouse_exception(code), ErrorClass::RetryAfterAction);
        }
        assert_eq!(http_status(503), ErrorClass::Retry);
        assert_eq!(http_status(403), ErrorClass::RetryAfterAction);
        assert_eq!(http_status(404), ErrorClass::Permanent);
    }

    #[test]
    fn postgres_by_sqlstate() {
        for code in [
            "08006", "08P01", "53300", "57P01", "40001", "40P01", "55006",
        ] {
            assert_eq!(postgres_sqlstate(code), ErrorClass::Retry, "{code}");
        }
        for code in ["28P01", "28000", "42501", "53100"] {
            assert_eq!(
                postgres_sqlstate(code),
                ErrorClass::RetryAfterAction,
                "{code}"
            );
        }
        for code in ["42P01", "42703", "22003", "57P04", "XX000"] {
            assert_eq!(postgres_sqlstate(code), ErrorClass::Permanent, "{code}");
        }
    }

    #[test]
    fn etcd_by_grpc_code() {
        assert_eq!(grpc_status(14), ErrorClass::Retry);
        assert_eq!(grpc_status(4), ErrorClass::Retry);
        assert_eq!(grpc_status(16), ErrorClass::RetryAfterAction);
        assert_eq!(grpc_status(3), ErrorClass::Permanent);
    }

    #[test]
    fn schedules_grow_to_their_cap() {
        assert_eq!(STREAM.nominal(1), Duration::from_secs(1));
        assert_eq!(STREAM.nominal(3), Duration::from_secs(4));
        assert_eq!(STREAM.nominal(30), STREAM.max);
        assert!(SETUP.attempts.is_some() && STREAM.attempts.is_none());
        assert!(ErrorClass::RetryAfterAction.retries());
        assert!(!ErrorClass::RetryAfterAction.passes_by_itself());
        assert!(!ErrorClass::Permanent.retries());
    }
}
