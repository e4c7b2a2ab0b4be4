//! How the query commands end: an [`Exit`] status for every outcome, and
//! [`CliError`], the failure a command returns, which carries its status.
//!
//! The table is `headcount --help`'s (see [`EXIT_STATUS_HELP`]) and the
//! README's "Exit status"; `crates/headcount/tests/cli.rs` holds the
//! commands to it.

use headcount_client::ClientError;
use serde_json::{Map, Value, json};

/// The exit status of a query command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done; for `check`, the device may play.
    Success = 0,
    /// The answer is no: `check` refused the device, `kick` found no such
    /// active session.
    Refused = 1,
    /// The command cannot tell what to do: bad flags (clap's own errors),
    /// no up.json where it looked, an unreadable up.json.
    Usage = 2,
    /// NATS or token-vendor could not be reached (or refused the
    /// credentials), or no service answered the request.
    Unreachable = 3,
    /// The service answered with an error (NATS service error 400/404/500,
    /// HTTP 4xx/5xx), or with something unreadable.
    ServiceError = 4,
}

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// The exit statuses, as `headcount --help` shows them.
pub const EXIT_STATUS_HELP: &str = "\
Exit status (active, check, limits, kick, token, backend-token, stats, top):
  0  success; `check`: the device may play
  1  refused or not found: `check` refused the device, `kick` matched no active session
  2  usage: bad flags, or no up.json where it looked (pass --data-dir or --nats-url)
  3  NATS or token-vendor unreachable (or refused the credentials), or no service answered
  4  the service answered with an error (400/404/500, HTTP 4xx/5xx)
With --json, an error is also one JSON object on stdout: {\"error\": \"...\", \"code\": <status>, ...}.";

/// A query command's failure: what to tell the user, the exit status, and
/// the fields its `--json` object carries besides `error` and `code`.
#[derive(Debug)]
pub struct CliError {
    pub exit: Exit,
    pub message: String,
    pub fields: Map<String, Value>,
    /// The command already printed the message as its answer (`check`'s
    /// refusal): without `--json`, stderr does not repeat it.
    pub said: bool,
}

impl CliError {
    fn new(exit: Exit, message: impl Into<String>) -> Self {
        Self {
            exit,
            message: message.into(),
            fields: Map::new(),
            said: false,
        }
    }

    /// Marks the message as printed already (the `said` field).
    pub fn already_said(mut self) -> Self {
        self.said = true;
        self
    }

    /// Exit 1: the service said no.
    pub fn refused(message: impl Into<String>) -> Self {
        Self::new(Exit::Refused, message)
    }

    /// Exit 2: the command cannot tell what to do.
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(Exit::Usage, message)
    }

    /// Exit 3: NATS, token-vendor or the service cannot be reached.
    pub fn unreachable(message: impl Into<String>) -> Self {
        Self::new(Exit::Unreachable, message)
    }

    /// Exit 4: the service answered with an error (`status`: its code).
    pub fn service(message: impl Into<String>, status: Option<u16>) -> Self {
        let e = Self::new(Exit::ServiceError, message);
        match status {
            Some(s) => e.with("status", s),
            None => e,
        }
    }

    /// A call to an endpoint that did not get its reply: no answer is exit
    /// status 3 (naming the NATS URLs `urls` and the service, `server`,
    /// that should have answered), the endpoint's error (its code as
    /// `status`) or an unreadable reply 4.
    pub fn of_call(e: ClientError, urls: &str, server: &str) -> Self {
        let no_answer = |message: String, subject: String| {
            Self::unreachable(message)
                .with("nats_url", urls)
                .with("subject", subject)
        };
        match e {
            ClientError::Service(e) => Self::service(e.to_string(), Some(e.code)),
            e @ ClientError::Unreadable { .. } => Self::service(e.to_string(), None),
            ClientError::NoResponders { subject } => no_answer(
                format!(
                    "no service answers {subject} on NATS at {urls} (is the {server} running?)"
                ),
                subject,
            ),
            ClientError::Timeout { subject, after } => no_answer(
                format!("no answer from {subject} within {after:?} (is the {server} running?)"),
                subject,
            ),
            ClientError::Transport { subject, source } => no_answer(
                format!(
                    "calling {subject} on NATS at {urls}: {}",
                    error_chain(&source)
                ),
                subject,
            ),
            // Every body the commands send is JSON by construction.
            e @ ClientError::Encode { .. } => Self::usage(e.to_string()),
        }
    }

    /// Adds a field to the `--json` object.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.fields.insert(key.to_string(), value.into());
        self
    }

    /// Adds every field of a JSON object (a reply) to the `--json` object.
    pub fn with_reply(mut self, reply: Value) -> Self {
        if let Value::Object(map) = reply {
            for (k, v) in map {
                self.fields.entry(k).or_insert(v);
            }
        }
        self
    }

    /// The `--json` form: `{"error": ..., "code": ..., <fields>}`.
    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("error".into(), json!(self.message));
        obj.insert("code".into(), json!(self.exit.code()));
        for (k, v) in &self.fields {
            obj.entry(k.clone()).or_insert_with(|| v.clone());
        }
        Value::Object(obj)
    }

    /// Says what went wrong (a line on stderr; with `json`, the object on
    /// stdout too) and gives the exit status.
    pub fn report(&self, json: bool) -> std::process::ExitCode {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&self.to_json()).unwrap_or_default()
            );
        }
        if json || !self.said {
            eprintln!("error: {}", self.message);
        }
        std::process::ExitCode::from(self.exit.code())
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// An error and its sources, `: `-separated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// The end of a query command: its status, and under `--json` the error
/// object on stdout.
pub fn finish(result: Result<(), CliError>, json: bool) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::from(Exit::Success.code()),
        Err(e) => e.report(json),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_object_carries_error_code_and_fields() {
        let e = CliError::unreachable("cannot reach NATS at nats://x:1 (from --nats-url)")
            .with("nats_url", "nats://x:1")
            .with("code", 99); // never overrides the status
        let v = e.to_json();
        assert_eq!(v["code"], 3);
        assert_eq!(v["nats_url"], "nats://x:1");
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|s| s.contains("nats://x:1"))
        );
        let r = CliError::refused("no").with_reply(json!({"kicked": false, "error": "x"}));
        assert_eq!(r.to_json()["kicked"], false);
        assert_eq!(r.to_json()["error"], "no");
        assert_eq!(CliError::service("bad", Some(400)).to_json()["status"], 400);
    }

    #[test]
    fn failed_calls_exit_by_whose_fault_it_was() {
        use headcount_protocol::ServiceError;
        let urls = "nats://x:1";
        let refused = CliError::of_call(
            ServiceError::bad_request("unknown plan \"gold\"").into(),
            urls,
            "checker",
        );
        assert_eq!(refused.exit, Exit::ServiceError);
        assert_eq!(refused.message, "unknown plan \"gold\" (400)");
        assert_eq!(refused.to_json()["status"], 400);

        let nobody = CliError::of_call(
            ClientError::NoResponders {
                subject: "headcount.active".into(),
            },
            urls,
            "checker",
        );
        assert_eq!(nobody.exit, Exit::Unreachable);
        assert_eq!(
            nobody.message,
            "no service answers headcount.active on NATS at nats://x:1 (is the checker running?)"
        );
        assert_eq!(nobody.to_json()["subject"], "headcount.active");
        assert_eq!(nobody.to_json()["nats_url"], urls);

        let late = CliError::of_call(
            ClientError::Timeout {
                subject: "headcount.token".into(),
                after: std::time::Duration::from_secs(5),
            },
            urls,
            "token-vendor",
        );
        assert_eq!(late.exit, Exit::Unreachable);
        assert_eq!(
            late.message,
            "no answer from headcount.token within 5s (is the token-vendor running?)"
        );

        let garbled = CliError::of_call(
            ClientError::Unreadable {
                subject: "headcount.stats".into(),
                source: serde_json::from_str::<Value>("{").unwrap_err(),
            },
            urls,
            "checker",
        );
        assert_eq!(garbled.exit, Exit::ServiceError);
        assert!(
            garbled
                .message
                .starts_with("unreadable reply from headcount.stats: ")
        );
        assert!(garbled.to_json().get("status").is_none());
    }

    #[test]
    fn statuses_are_the_documented_ones() {
        let codes: Vec<u8> = [
            Exit::Success,
            Exit::Refused,
            Exit::Usage,
            Exit::Unreachable,
            Exit::ServiceError,
        ]
        .iter()
        .map(|e| e.code())
        .collect();
        assert_eq!(codes, [0, 1, 2, 3, 4]);
        for code in 0..=4 {
            assert!(EXIT_STATUS_HELP.contains(&format!("\n  {code}  ")));
        }
    }
}
