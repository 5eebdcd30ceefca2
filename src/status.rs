//! [`Status`]: the outcome of a call, as it crosses the wire.
//!
//! Like go-micro's errors (and HTTP's status codes, which they borrow), a status has a numeric
//! [`Code`], an id naming where it came from, and a detail for people. Handlers return
//! `Err(Status)`; callers get the same status back, whatever the codec.
//!
//! ```
//! use micromesh::{Status, status::Code};
//!
//! let status = Status::not_found("no such order 42");
//! assert_eq!(status.code(), Code::NotFound);
//! assert_eq!(status.code().as_u16(), 404);
//! assert_eq!(status.to_string(), "404 Not Found: no such order 42");
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

/// A status code. The numbers are HTTP's, as in go-micro.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
#[non_exhaustive]
pub enum Code {
    /// 200: the call succeeded.
    Ok,
    /// 400: the request was malformed or could not be decoded.
    BadRequest,
    /// 401: the caller is not authenticated.
    Unauthorized,
    /// 403: the caller may not do this.
    Forbidden,
    /// 404: no such service or endpoint.
    NotFound,
    /// 408: the deadline passed.
    Timeout,
    /// 409: a conflict with the current state.
    Conflict,
    /// 413: a message is larger than the receiver accepts.
    PayloadTooLarge,
    /// 429: too many requests; try later.
    TooManyRequests,
    /// 500: the handler failed.
    Internal,
    /// 503: the node cannot serve now (shutting down, overloaded); another node may.
    Unavailable,
    /// Any other code.
    Other(u16),
}

impl Code {
    /// The number.
    pub fn as_u16(self) -> u16 {
        self.into()
    }

    /// The standard reason phrase.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::BadRequest => "Bad Request",
            Self::Unauthorized => "Unauthorized",
            Self::Forbidden => "Forbidden",
            Self::NotFound => "Not Found",
            Self::Timeout => "Request Timeout",
            Self::Conflict => "Conflict",
            Self::PayloadTooLarge => "Payload Too Large",
            Self::TooManyRequests => "Too Many Requests",
            Self::Internal => "Internal Server Error",
            Self::Unavailable => "Service Unavailable",
            Self::Other(_) => "Error",
        }
    }
}

impl From<u16> for Code {
    fn from(code: u16) -> Self {
        match code {
            200 => Self::Ok,
            400 => Self::BadRequest,
            401 => Self::Unauthorized,
            403 => Self::Forbidden,
            404 => Self::NotFound,
            408 => Self::Timeout,
            409 => Self::Conflict,
            413 => Self::PayloadTooLarge,
            429 => Self::TooManyRequests,
            500 => Self::Internal,
            503 => Self::Unavailable,
            other => Self::Other(other),
        }
    }
}

impl From<Code> for u16 {
    fn from(code: Code) -> u16 {
        match code {
            Code::Ok => 200,
            Code::BadRequest => 400,
            Code::Unauthorized => 401,
            Code::Forbidden => 403,
            Code::NotFound => 404,
            Code::Timeout => 408,
            Code::Conflict => 409,
            Code::PayloadTooLarge => 413,
            Code::TooManyRequests => 429,
            Code::Internal => 500,
            Code::Unavailable => 503,
            Code::Other(n) => n,
        }
    }
}

/// The outcome of a call: a code, the id of where it arose, and a detail.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    code: Code,
    #[serde(default)]
    id: String,
    #[serde(default)]
    detail: String,
}

macro_rules! constructors {
    ($($(#[$doc:meta])* $name:ident => $code:ident,)*) => {$(
        $(#[$doc])*
        pub fn $name(detail: impl Into<String>) -> Self {
            Self::new(Code::$code, detail)
        }
    )*};
}

impl Status {
    /// A status with this code and detail.
    pub fn new(code: Code, detail: impl Into<String>) -> Self {
        Self {
            code,
            id: String::new(),
            detail: detail.into(),
        }
    }

    constructors! {
        /// 400.
        bad_request => BadRequest,
        /// 401.
        unauthorized => Unauthorized,
        /// 403.
        forbidden => Forbidden,
        /// 404.
        not_found => NotFound,
        /// 408.
        timeout => Timeout,
        /// 409.
        conflict => Conflict,
        /// 413.
        payload_too_large => PayloadTooLarge,
        /// 429.
        too_many_requests => TooManyRequests,
        /// 500.
        internal => Internal,
        /// 503.
        unavailable => Unavailable,
    }

    /// Sets the id: where the status arose (a service name, `micromesh.server`…).
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// The code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The id: where the status arose.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The detail.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// Whether this is a success.
    pub fn is_ok(&self) -> bool {
        self.code == Code::Ok
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code.as_u16(), self.code.reason())?;
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        if !self.id.is_empty() {
            write!(f, " (from {})", self.id)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Status")
            .field("code", &self.code.as_u16())
            .field("id", &self.id)
            .field("detail", &self.detail)
            .finish()
    }
}

impl std::error::Error for Status {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_numbers() {
        for n in [
            200u16, 400, 401, 403, 404, 408, 409, 413, 429, 500, 503, 418,
        ] {
            assert_eq!(Code::from(n).as_u16(), n);
        }
        assert_eq!(Code::from(418), Code::Other(418));
        assert_eq!(
            Status::unavailable("draining")
                .with_id("greeter")
                .to_string(),
            "503 Service Unavailable: draining (from greeter)"
        );
    }
}
