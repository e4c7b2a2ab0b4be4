//! The error a service endpoint answers with.
//!
//! It travels in the NATS micro headers `Nats-Service-Error-Code` (the code)
//! and `Nats-Service-Error` (the message) of an otherwise empty reply; the
//! codes borrow HTTP's meanings ([`crate::wire::error_code`]).

use crate::wire::error_code;

/// A refusal from an endpoint: a code callers branch on and a message for
/// people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({code})")]
pub struct ServiceError {
    /// 400 bad request, 401 unauthorized, 404 unknown, 500 internal, ...
    pub code: u16,
    pub message: String,
}

impl ServiceError {
    pub fn new(code: usize, message: impl std::fmt::Display) -> Self {
        Self {
            code: u16::try_from(code).unwrap_or(u16::MAX),
            message: message.to_string(),
        }
    }

    /// The request itself was wrong: retrying it unchanged cannot help.
    pub fn bad_request(message: impl std::fmt::Display) -> Self {
        Self::new(error_code::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl std::fmt::Display) -> Self {
        Self::new(error_code::NOT_FOUND, message)
    }

    pub fn internal(message: impl std::fmt::Display) -> Self {
        Self::new(error_code::INTERNAL, message)
    }

    pub fn is_bad_request(&self) -> bool {
        usize::from(self.code) == error_code::BAD_REQUEST
    }

    pub fn is_not_found(&self) -> bool {
        usize::from(self.code) == error_code::NOT_FOUND
    }

    pub fn is_unauthorized(&self) -> bool {
        usize::from(self.code) == error_code::UNAUTHORIZED
    }

    /// The code as the micro error header carries it.
    pub fn header_code(&self) -> usize {
        usize::from(self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_classify() {
        let e = ServiceError::bad_request("no account");
        assert_eq!(e.code, 400);
        assert!(e.is_bad_request() && !e.is_not_found());
        assert_eq!(e.header_code(), 400);
        assert_eq!(e.to_string(), "no account (400)");
        assert!(ServiceError::not_found("x").is_not_found());
        assert_eq!(ServiceError::internal("x").code, 500);
        assert_eq!(ServiceError::new(70_000, "x").code, u16::MAX);
    }
}
