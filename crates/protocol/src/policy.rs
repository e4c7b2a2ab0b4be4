//! What happens when an account has more active sessions than its limit.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The largest limit accepted; anything larger is a typo, not a plan.
pub const MAX_LIMIT: u32 = 10_000;

/// The enforcement policy of an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// New sessions always get in; the oldest sessions beyond the limit are
    /// evicted (the device-limit seed's behaviour).
    #[default]
    EvictOldest,
    /// Sessions beyond the limit are refused; those already active stay.
    RejectNew,
}

impl Policy {
    pub fn as_str(&self) -> &'static str {
        match self {
            Policy::EvictOldest => "evict-oldest",
            Policy::RejectNew => "reject-new",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy {0:?}: expected evict-oldest or reject-new")]
pub struct UnknownPolicy(pub String);

impl FromStr for Policy {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "evict-oldest" => Ok(Policy::EvictOldest),
            "reject-new" => Ok(Policy::RejectNew),
            other => Err(UnknownPolicy(other.to_string())),
        }
    }
}

/// An account's limit: how many sessions may be active at once, and what
/// happens beyond that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    pub limit: u32,
    #[serde(default)]
    pub policy: Policy,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("limit must be between 1 and {MAX_LIMIT}, got {0}")]
    OutOfRange(i64),
}

impl Limit {
    /// Validates a requested limit (given as a signed number so that a
    /// negative request is reported as such rather than as a parse error).
    pub fn new(limit: i64, policy: Policy) -> Result<Self, LimitError> {
        if !(1..=MAX_LIMIT as i64).contains(&limit) {
            return Err(LimitError::OutOfRange(limit));
        }
        Ok(Self {
            limit: limit as u32,
            policy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names() {
        assert_eq!("evict-oldest".parse(), Ok(Policy::EvictOldest));
        assert_eq!("reject-new".parse(), Ok(Policy::RejectNew));
        assert!("evict".parse::<Policy>().is_err());
        assert_eq!(
            serde_json::to_string(&Policy::RejectNew).unwrap(),
            "\"reject-new\""
        );
    }

    #[test]
    fn limits_are_bounded() {
        assert!(Limit::new(0, Policy::EvictOldest).is_err());
        assert!(Limit::new(-3, Policy::EvictOldest).is_err());
        assert!(Limit::new(10_001, Policy::EvictOldest).is_err());
        assert_eq!(Limit::new(2, Policy::RejectNew).unwrap().limit, 2);
    }
}
