//! The secrets `headcount up` generates on its first run and keeps in its
//! data dir: the NATS users' passwords and the operator key.

use std::path::Path;

use anyhow::Context;
use headcount_runtime::secret::{is_random_secret, random_secret, write_private};
use serde::{Deserialize, Serialize};

use crate::server::Passwords;

/// Secrets generated on first run and kept in the data dir (mode 0600), each
/// made by [`random_secret`].
#[derive(Clone, Serialize, Deserialize)]
pub struct Secrets {
    /// The console user `headcount` (CLI, `up` itself): the whole of the
    /// services' account.
    pub service_password: String,
    /// Each service's own user, with only what it uses.
    #[serde(default = "random_secret")]
    pub handler_password: String,
    #[serde(default = "random_secret")]
    pub checker_password: String,
    #[serde(default = "random_secret")]
    pub vendor_password: String,
    /// Used only with `--insecure`.
    pub device_password: String,
    pub operator_key: String,
}

/// Never prints the values.
impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets").finish_non_exhaustive()
    }
}

/// The secrets of `<dir>/secrets.json`, made (and saved) when there is none.
/// A file another user could have planted or changed (not this user's or
/// root's, or writable by others, see
/// [`headcount_runtime::secret::read_private`]) stops the start.
pub fn load_secrets(dir: &Path) -> anyhow::Result<Secrets> {
    let path = dir.join("secrets.json");
    if let Some(text) = headcount_runtime::secret::read_private(&path)? {
        let parsed: serde_json::Value =
            serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
        let mut s: Secrets = serde_json::from_value(parsed.clone())
            .with_context(|| format!("parsing {}", path.display()))?;
        // Secrets this generator did not make are replaced: NUID-made ones
        // (guessable from a session id or two) and ones nats-server may
        // misread. `up` hands the server its passwords at every start, so
        // only a copy taken from an older up.json goes stale.
        let mut replaced = Vec::new();
        for (name, secret) in [
            ("service_password", &mut s.service_password),
            ("handler_password", &mut s.handler_password),
            ("checker_password", &mut s.checker_password),
            ("vendor_password", &mut s.vendor_password),
            ("device_password", &mut s.device_password),
            ("operator_key", &mut s.operator_key),
        ] {
            if !is_random_secret(secret) {
                *secret = random_secret();
                replaced.push(name);
            }
        }
        // One the file lacked was just made (serde default): keep it.
        let added = ["handler_password", "checker_password", "vendor_password"]
            .into_iter()
            .any(|name| parsed.get(name).is_none());
        if !replaced.is_empty() || added {
            write_private(&path, &serde_json::to_vec_pretty(&s)?)?;
        }
        if !replaced.is_empty() {
            tracing::warn!(
                file = %path.display(),
                replaced = %replaced.join(","),
                "replaced secrets of an older, guessable kind; clients holding the old ones must read up.json again"
            );
        }
        return Ok(s);
    }
    let s = Secrets {
        service_password: random_secret(),
        handler_password: random_secret(),
        checker_password: random_secret(),
        vendor_password: random_secret(),
        device_password: random_secret(),
        operator_key: random_secret(),
    };
    write_private(&path, &serde_json::to_vec_pretty(&s)?)?;
    Ok(s)
}

impl Secrets {
    /// The passwords a server started with these secrets is given.
    pub fn passwords(&self) -> Passwords {
        Passwords {
            console: self.service_password.clone(),
            handler: self.handler_password.clone(),
            checker: self.checker_password.clone(),
            vendor: self.vendor_password.clone(),
            device: self.device_password.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_of_an_older_kind_are_all_replaced_and_saved_privately() {
        let dir = tempfile::tempdir().unwrap();
        // What `up` wrote before: NUID-made (guessable), or unsafe for
        // nats-server; the operator key included.
        let old = serde_json::json!({
            "service_password": "3e5Old",
            "handler_password": format!("hc{}{}", "A".repeat(22), "B".repeat(22)),
            "device_password": "9device",
            "operator_key": "hcOLDOPERATORKEYmadebyNUIDxxxxxxxxxxxxxxxxxxxx",
        });
        std::fs::write(dir.path().join("secrets.json"), old.to_string()).unwrap();
        let s = load_secrets(dir.path()).unwrap();
        for (name, new) in [
            ("service_password", &s.service_password),
            ("handler_password", &s.handler_password),
            ("device_password", &s.device_password),
            ("operator_key", &s.operator_key),
        ] {
            assert!(is_random_secret(new), "{name} not replaced");
            assert_ne!(old[name].as_str(), Some(new.as_str()));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("secrets.json"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Written back, so the next start reads the same secrets.
        let again = load_secrets(dir.path()).unwrap();
        assert_eq!(again.service_password, s.service_password);
        assert_eq!(again.operator_key, s.operator_key);
        // A fresh data dir gets new-kind secrets, all different.
        let fresh = tempfile::tempdir().unwrap();
        let f = load_secrets(fresh.path()).unwrap();
        let all = [
            &f.service_password,
            &f.handler_password,
            &f.checker_password,
            &f.vendor_password,
            &f.device_password,
            &f.operator_key,
        ];
        assert!(all.iter().all(|v| is_random_secret(v)));
        // A secret the file lacks is made once and kept.
        let partial = tempfile::tempdir().unwrap();
        let mut without = serde_json::to_value(&f).unwrap();
        without.as_object_mut().unwrap().remove("vendor_password");
        std::fs::write(partial.path().join("secrets.json"), without.to_string()).unwrap();
        let first = load_secrets(partial.path()).unwrap();
        let second = load_secrets(partial.path()).unwrap();
        assert_eq!(first.vendor_password, second.vendor_password);
        assert_eq!(first.operator_key, f.operator_key);
        assert_eq!(
            all.iter().collect::<std::collections::HashSet<_>>().len(),
            all.len()
        );
        // Debug output never shows them.
        assert!(!format!("{f:?}").contains(&f.operator_key));
    }
}
