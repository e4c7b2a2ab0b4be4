//! Identifiers: 1 to 64 characters of `[A-Za-z0-9_-]`.
//!
//! The character set keeps every identifier usable as one NATS subject token
//! and as part of a KV key without escaping.

use std::fmt;

use smol_str::SmolStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest identifier accepted.
pub const MAX_NAME_LEN: usize = 64;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is longer than {MAX_NAME_LEN} characters")]
    TooLong { what: &'static str },
    #[error("{what} may only contain A-Z, a-z, 0-9, '_' and '-'")]
    BadCharacter { what: &'static str },
}

fn check(what: &'static str, s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty { what });
    }
    if s.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { what });
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(NameError::BadCharacter { what });
    }
    Ok(())
}

// A name is held inline when it is at most 23 bytes (a 22-character
// session id, most device and account names), else shared on the heap:
// 24 bytes, and no allocation of its own for the usual name. The handler
// and the checker hold a few per session, a million sessions at a time.
macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(SmolStr);

        impl $name {
            /// Parses and validates a name.
            pub fn parse(s: &str) -> Result<Self, NameError> {
                check($what, s)?;
                Ok(Self(SmolStr::new(s)))
            }

            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        // Hash, Eq and Ord of the SmolStr are those of the str, so maps
        // keyed by the name can be searched with a plain &str.
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                self.0.as_str()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.0.as_str())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self.0.as_str(), f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::parse(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.0.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// The customer account whose devices are counted against one limit.
    AccountId,
    "account"
);
name_type!(
    /// One device of an account (a browser profile, a phone, a TV).
    DeviceId,
    "device"
);
name_type!(
    /// One playback/usage session of a device; issued with its token.
    SessionId,
    "session"
);

/// Validates an account name without building one.
pub fn check_account(s: &str) -> Result<(), NameError> {
    check("account", s)
}

/// Validates a device name without building one.
pub fn check_device(s: &str) -> Result<(), NameError> {
    check("device", s)
}

/// Validates a session id without building one.
pub fn check_session(s: &str) -> Result<(), NameError> {
    check("session", s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_set() {
        for ok in ["a", "A-z_09", &"x".repeat(64)] {
            assert!(AccountId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_everything_else() {
        assert_eq!(
            DeviceId::parse(""),
            Err(NameError::Empty { what: "device" })
        );
        assert_eq!(
            DeviceId::parse(&"x".repeat(65)),
            Err(NameError::TooLong { what: "device" })
        );
        for bad in ["a.b", "a b", "a*", "a>", "é", "a/b", "a\0"] {
            assert_eq!(
                SessionId::parse(bad),
                Err(NameError::BadCharacter { what: "session" }),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn deserializing_validates() {
        let err = serde_json::from_str::<AccountId>("\"a.b\"").unwrap_err();
        assert!(err.to_string().contains("account may only contain"));
        let ok: AccountId = serde_json::from_str("\"acme\"").unwrap();
        assert_eq!(ok.as_str(), "acme");
    }
}
