//! One type per endpoint, pairing its name with its request and reply.
//!
//! [`Client::call`](crate::Client::call) takes any of them, so a request
//! of the wrong shape for an endpoint is a compile error, not a 400.

use headcount_protocol::subjects::endpoint;
use headcount_protocol::wire::{
    AccountRequest, ActiveReply, CheckReply, CheckRequest, KickReply, KickRequest, LimitsReply,
    LimitsSetRequest, StatsReply, StatsRequest, TokenReply, TokenRequest,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A request-reply endpoint: its name under `headcount.` and the JSON
/// bodies it takes and answers with.
pub trait Endpoint {
    /// The endpoint's name, one of [`headcount_protocol::subjects::endpoint`].
    const NAME: &'static str;
    type Request: Serialize;
    type Reply: DeserializeOwned;
}

macro_rules! endpoints {
    ($($(#[$doc:meta])* $name:ident = $subject:path, $request:ty => $reply:ty;)*) => {
        $(
            $(#[$doc])*
            #[derive(Debug, Clone, Copy, PartialEq, Eq)]
            pub struct $name;

            impl Endpoint for $name {
                const NAME: &'static str = $subject;
                type Request = $request;
                type Reply = $reply;
            }
        )*

        /// Every endpoint's name, as [`Endpoint::NAME`] spells it.
        #[cfg(test)]
        const NAMES: &[&str] = &[$(<$name as Endpoint>::NAME),*];
    };
}

endpoints! {
    /// `headcount.active`: an account's active sessions (checker).
    Active = endpoint::ACTIVE, AccountRequest => ActiveReply;
    /// `headcount.check`: whether a device may play, evicting to make room
    /// under the account's policy (checker).
    Check = endpoint::CHECK, CheckRequest => CheckReply;
    /// `headcount.limits.get`: an account's limit, policy and plan (checker).
    LimitsGet = endpoint::LIMITS_GET, AccountRequest => LimitsReply;
    /// `headcount.limits.set`: changes an account's limits (checker).
    LimitsSet = endpoint::LIMITS_SET, LimitsSetRequest => LimitsReply;
    /// `headcount.kick`: ends one session (checker).
    Kick = endpoint::KICK, KickRequest => KickReply;
    /// `headcount.token`: a device token (token-vendor).
    Token = endpoint::TOKEN, TokenRequest => TokenReply;
    /// `headcount.stats`: usage of one account or of all (checker).
    Stats = endpoint::STATS, StatsRequest => StatsReply;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_has_its_type_and_no_other() {
        let mut ours = NAMES.to_vec();
        let mut all = endpoint::ALL.to_vec();
        ours.sort_unstable();
        all.sort_unstable();
        assert_eq!(ours, all);
    }
}
