//! Why a call did not get its reply: [`ClientError`], and
//! [`service_error_of`], which reads an endpoint's refusal from a reply.

use std::time::Duration;

use async_nats::RequestErrorKind;
use headcount_protocol::ServiceError;

/// Why a call did not return its reply.
///
/// [`ClientError::Service`] is the endpoint's own answer (retrying the
/// same request gets the same answer); [`ClientError::Timeout`] and
/// [`ClientError::NoResponders`] mean no service answered (one may, later);
/// the others are the caller's side: the connection, or a reply this client
/// cannot read.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint refused the request (400), found nothing by that name
    /// (404) or failed (500).
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// No answer within the client's timeout. A connection that may not
    /// publish on the subject gets this too: the server drops the request
    /// and reports the violation only to the connection's error callback.
    #[error("no answer from {subject} within {after:?}")]
    Timeout { subject: String, after: Duration },
    /// Nothing listens on the subject.
    #[error("no service answers {subject}")]
    NoResponders { subject: String },
    /// The request was not sent, or its answer was lost: the connection
    /// closed, the body is over the server's payload limit, the subject is
    /// not one.
    #[error("calling {subject}: {source}")]
    Transport {
        subject: String,
        #[source]
        source: async_nats::RequestError,
    },
    /// The reply is not the JSON the endpoint answers with.
    #[error("unreadable reply from {subject}: {source}")]
    Unreadable {
        subject: String,
        #[source]
        source: serde_json::Error,
    },
    /// The request body cannot be written as JSON (a map with non-string
    /// keys, a failing `Serialize`): nothing was sent.
    #[error("request to {subject} cannot be written as JSON: {source}")]
    Encode {
        subject: String,
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// What a failed NATS request means for a call on `subject` that waited
    /// `after` at most.
    pub(crate) fn of_request(
        subject: String,
        error: async_nats::RequestError,
        after: Duration,
    ) -> Self {
        match error.kind() {
            RequestErrorKind::TimedOut => ClientError::Timeout { subject, after },
            RequestErrorKind::NoResponders => ClientError::NoResponders { subject },
            RequestErrorKind::InvalidSubject
            | RequestErrorKind::MaxPayloadExceeded
            | RequestErrorKind::Other => ClientError::Transport {
                subject,
                source: error,
            },
        }
    }

    /// The endpoint's refusal, when that is what this is.
    pub fn service_error(&self) -> Option<&ServiceError> {
        match self {
            ClientError::Service(e) => Some(e),
            _ => None,
        }
    }

    /// The endpoint found the request wrong (400): sending it again
    /// unchanged cannot help.
    pub fn is_bad_request(&self) -> bool {
        self.service_error()
            .is_some_and(ServiceError::is_bad_request)
    }

    /// The endpoint knows nothing by the name asked for (404).
    pub fn is_not_found(&self) -> bool {
        self.service_error().is_some_and(ServiceError::is_not_found)
    }

    /// No service answered, in time or at all: the same call may work once
    /// one runs.
    pub fn is_unanswered(&self) -> bool {
        matches!(
            self,
            ClientError::Timeout { .. } | ClientError::NoResponders { .. }
        )
    }

    /// The subject called, when the error names one (a service error
    /// carries only the endpoint's words).
    pub fn subject(&self) -> Option<&str> {
        match self {
            ClientError::Service(_) => None,
            ClientError::Timeout { subject, .. }
            | ClientError::NoResponders { subject }
            | ClientError::Transport { subject, .. }
            | ClientError::Unreadable { subject, .. }
            | ClientError::Encode { subject, .. } => Some(subject),
        }
    }
}

/// The refusal a reply carries, if it is one: endpoints answer an error as
/// an empty reply whose NATS micro headers hold the code
/// (`Nats-Service-Error-Code`) and the message (`Nats-Service-Error`).
/// A code that is not a number reads as 0.
pub fn service_error_of(msg: &async_nats::Message) -> Option<ServiceError> {
    let headers = msg.headers.as_ref()?;
    let code = headers.get(async_nats::service::NATS_SERVICE_ERROR_CODE)?;
    let message = headers
        .get(async_nats::service::NATS_SERVICE_ERROR)
        .map(|v| v.to_string())
        .unwrap_or_default();
    Some(ServiceError {
        code: code.as_str().parse().unwrap_or(0),
        message,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn reply(headers: &[(&'static str, &str)]) -> async_nats::Message {
        let mut map = async_nats::HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, *value);
        }
        async_nats::Message {
            subject: "_INBOX.x".into(),
            reply: None,
            payload: bytes::Bytes::new(),
            headers: (!headers.is_empty()).then_some(map),
            status: None,
            description: None,
            length: 0,
        }
    }

    #[test]
    fn the_micro_error_headers_are_the_service_error() {
        use async_nats::service::{NATS_SERVICE_ERROR, NATS_SERVICE_ERROR_CODE};
        assert_eq!(service_error_of(&reply(&[])), None);
        assert_eq!(
            service_error_of(&reply(&[
                (NATS_SERVICE_ERROR_CODE, "400"),
                (NATS_SERVICE_ERROR, "unknown plan \"gold\""),
            ])),
            Some(ServiceError::bad_request("unknown plan \"gold\""))
        );
        // A code alone is still an error; a message alone is not one.
        assert_eq!(
            service_error_of(&reply(&[(NATS_SERVICE_ERROR_CODE, "500")])),
            Some(ServiceError::internal(""))
        );
        assert_eq!(service_error_of(&reply(&[(NATS_SERVICE_ERROR, "x")])), None);
        assert_eq!(
            service_error_of(&reply(&[(NATS_SERVICE_ERROR_CODE, "many")]))
                .unwrap()
                .code,
            0
        );
    }

    #[test]
    fn request_failures_are_told_apart() {
        let after = Duration::from_secs(5);
        let of = |kind| {
            ClientError::of_request(
                "headcount.active".into(),
                async_nats::RequestError::new(kind),
                after,
            )
        };
        let timeout = of(RequestErrorKind::TimedOut);
        assert!(matches!(timeout, ClientError::Timeout { after: a, .. } if a == after));
        assert_eq!(
            timeout.to_string(),
            "no answer from headcount.active within 5s"
        );
        let nobody = of(RequestErrorKind::NoResponders);
        assert!(nobody.is_unanswered() && timeout.is_unanswered());
        assert_eq!(nobody.to_string(), "no service answers headcount.active");
        for kind in [
            RequestErrorKind::Other,
            RequestErrorKind::MaxPayloadExceeded,
            RequestErrorKind::InvalidSubject,
        ] {
            let e = of(kind);
            assert!(matches!(e, ClientError::Transport { .. }), "{e:?}");
            assert!(!e.is_unanswered() && e.service_error().is_none());
            assert_eq!(e.subject(), Some("headcount.active"));
        }
    }

    #[test]
    fn service_errors_classify_like_their_codes() {
        let bad = ClientError::from(ServiceError::bad_request("no account"));
        assert!(bad.is_bad_request() && !bad.is_not_found() && !bad.is_unanswered());
        assert_eq!(bad.to_string(), "no account (400)");
        assert_eq!(bad.subject(), None);
        assert_eq!(bad.service_error().map(|e| e.code), Some(400));
        let unknown = ClientError::from(ServiceError::not_found("no such account"));
        assert!(unknown.is_not_found() && !unknown.is_bad_request());
    }
}
