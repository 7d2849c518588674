//! What a failed ClickHouse request says about itself, and the error policy's verdict on it
//! (see [`ferry_core::error_policy`]).

use ferry_core::error_policy::{self, ErrorClass};

use crate::sink::SinkError;

/// ClickHouse's exception codes Ferry names (ClickHouse's `src/Common/ErrorCodes.cpp`).
pub mod code {
    /// NO_SUCH_COLUMN_IN_TABLE.
    pub const NO_SUCH_COLUMN_IN_TABLE: u32 = 16;
    /// TYPE_MISMATCH.
    pub const TYPE_MISMATCH: u32 = 53;
    /// UNKNOWN_TABLE.
    pub const UNKNOWN_TABLE: u32 = 60;
    /// UNKNOWN_DATABASE.
    pub const UNKNOWN_DATABASE: u32 = 81;
    /// UNKNOWN_USER.
    pub const UNKNOWN_USER: u32 = 192;
    /// REQUIRED_PASSWORD.
    pub const REQUIRED_PASSWORD: u32 = 194;
    /// NOT_ENOUGH_SPACE.
    pub const NOT_ENOUGH_SPACE: u32 = 243;
    /// ACCESS_DENIED.
    pub const ACCESS_DENIED: u32 = 497;
    /// AUTHENTICATION_FAILED.
    pub const AUTHENTICATION_FAILED: u32 = 516;
}

/// How a request to ClickHouse failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The server raised exception `N` (`Code: N.`).
    Exception(u32),
    /// An HTTP error status without an exception code (a proxy in front of the server).
    Http(u16),
    /// An error answer that names neither (a proxy's page).
    Unnamed,
    /// The connection failed or timed out.
    Network,
    /// The client refused the request or the answer (a row that does not decode, …).
    Client,
}

impl Failure {
    /// Reads the failure out of the client's error: the exception code the server sends in
    /// `X-ClickHouse-Exception-Code` and at the start of its error text, which the client
    /// passes on as the text (`Code: N. DB::Exception: …`, or `Code: N` alone), or else the
    /// status line it makes up (`503 Service Unavailable`).
    pub fn of(error: &clickhouse::error::Error) -> Self {
        use clickhouse::error::Error;
        match error {
            Error::Network(_) | Error::TimedOut => Self::Network,
            Error::BadResponse(text) => Self::of_text(text),
            _ => Self::Client,
        }
    }

    fn of_text(text: &str) -> Self {
        let text = text.trim_start();
        if let Some(rest) = text.strip_prefix("Code:") {
            let digits: String = rest
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if let Ok(code) = digits.parse() {
                return Self::Exception(code);
            }
        }
        let status = text.split_once(' ').map_or(text, |(first, _)| first);
        match status.parse::<u16>() {
            Ok(status) if (400..600).contains(&status) => Self::Http(status),
            _ => Self::Unnamed,
        }
    }

    /// The exception code, if the server named one.
    pub fn code(self) -> Option<u32> {
        match self {
            Self::Exception(code) => Some(code),
            _ => None,
        }
    }

    /// What the error policy does about it.
    pub fn class(self) -> ErrorClass {
        match self {
            Self::Exception(code) => error_policy::clickhouse_exception(code),
            Self::Http(status) => error_policy::http_status(status),
            // Only something between Ferry and the server answers without a code.
            Self::Unnamed | Self::Network => ErrorClass::Retry,
            Self::Client => ErrorClass::Permanent,
        }
    }
}

impl SinkError {
    /// What the error policy does about it.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::AuthFailed { .. } => ErrorClass::RetryAfterAction,
            Self::Unreachable { .. } => ErrorClass::Retry,
            Self::Statement { failure, .. } => failure.class(),
            Self::Ddl(_)
            | Self::Mismatch { .. }
            | Self::ShadowTaken { .. }
            | Self::NoExchange { .. }
            | Self::ShadowMissing { .. } => ErrorClass::Permanent,
        }
    }

    /// The server's exception code, if it named one.
    pub fn code(&self) -> Option<u32> {
        match self {
            Self::Statement { failure, .. } => failure.code(),
            Self::AuthFailed { .. } => Some(code::AUTHENTICATION_FAILED),
            _ => None,
        }
    }

    /// Whether the destination table is gone or no longer takes what Ferry writes: dropped,
    /// or a column dropped or retyped in ClickHouse.
    pub fn table_changed(&self) -> bool {
        matches!(
            self.code(),
            Some(
                code::UNKNOWN_TABLE
                    | code::UNKNOWN_DATABASE
                    | code::NO_SUCH_COLUMN_IN_TABLE
                    | code::TYPE_MISMATCH
                    // CANNOT_PARSE_*, CANNOT_READ_ALL_DATA, INCORRECT_DATA: RowBinary read
                    // with the types of a retyped column.
                    | 6 | 26 | 27 | 33 | 38 | 41 | 72 | 117
            )
        )
    }

    /// What the user should do about a failed statement, by its exception code.
    pub(crate) fn statement_remedy(failure: Failure) -> String {
        match failure.code() {
            Some(code::NOT_ENOUGH_SPACE) => {
                "free disk space on the ClickHouse server; Ferry resumes by itself".into()
            }
            Some(code::ACCESS_DENIED) => "grant the user in spec.destination what Ferry needs on the destination database (SELECT, INSERT, CREATE TABLE, ALTER, DROP, TRUNCATE); Ferry resumes by itself".into(),
            Some(code::UNKNOWN_TABLE | code::UNKNOWN_DATABASE) => "the destination table was dropped: reload it with ferry resync <pipe> --table <schema.table>, which creates it anew".into(),
            _ if failure.class() == ErrorClass::Retry => {
                "none needed: ClickHouse is unavailable or overloaded for now, and Ferry retries by itself".into()
            }
            _ => "check the ClickHouse server log; the error text says what it refused".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickhouse::error::Error;

    fn failure(text: &str) -> Failure {
        Failure::of(&Error::BadResponse(text.into()))
    }

    #[test]
    fn the_exception_code_decides() {
        let gone = "Code: 60. DB::Exception: Table dest.items does not exist. (UNKNOWN_TABLE)";
        assert_eq!(failure(gone), Failure::Exception(60));
        assert_eq!(failure(gone).class(), ErrorClass::Permanent);
        assert_eq!(failure("Code: 252").class(), ErrorClass::Retry);
        assert_eq!(
            failure("Code: 241. DB::Exception: Memory limit (total) exceeded").class(),
            ErrorClass::Retry
        );
        assert_eq!(failure("503 Service Unavailable"), Failure::Http(503));
        assert_eq!(
            failure("503 Service Unavailable").class(),
            ErrorClass::Retry
        );
        assert_eq!(failure("<html>bad gateway</html>"), Failure::Unnamed);
        assert_eq!(Failure::of(&Error::TimedOut).class(), ErrorClass::Retry);
        assert_eq!(
            Failure::of(&Error::RowNotFound).class(),
            ErrorClass::Permanent
        );
    }
}
