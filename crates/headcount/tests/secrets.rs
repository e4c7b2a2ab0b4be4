//! Secrets on a real `headcount up`: the data dir and the files holding
//! secrets are the owner's alone, no secret shows up in what `up` prints or
//! in the server's log, session ids tell nothing about each other, and
//! secrets of the older, guessable kind are replaced.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::Up;

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn common_prefix(a: &str, b: &str) -> usize {
    a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count()
}

/// A directory `name` under `root` holding a secrets.json with `secrets`:
/// the directory and the file.
fn dir_holding_secrets(root: &Path, name: &str, secrets: &serde_json::Value) -> (PathBuf, PathBuf) {
    let dir = root.join(name);
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join("secrets.json");
    std::fs::write(&file, secrets.to_string()).unwrap();
    (dir, file)
}

/// An empty directory of pages under `root`, for an `up` that serves none.
fn no_pages(root: &Path) -> PathBuf {
    let web = root.join("web");
    std::fs::create_dir_all(&web).unwrap();
    web
}

/// What `up` wrote before secrets came from the OS: `hc` and two NUIDs.
fn nuid_made(tail: &str) -> String {
    format!("hcQ0Zu1nLIhbJ4fWmGs8zXAB{tail}")
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn up_keeps_its_secrets_private_and_unguessable() {
    use std::os::unix::fs::PermissionsExt;

    let root = tempfile::tempdir().unwrap();
    // A data dir that others may read, holding secrets of the old kind in a
    // file others may read: `up` must tighten the one and replace the other.
    let old = serde_json::json!({
        "service_password": nuid_made("Q0Zu1nLIhbJ4fWmGs8zXA1"),
        "handler_password": nuid_made("Q0Zu1nLIhbJ4fWmGs8zXB2"),
        "device_password": nuid_made("Q0Zu1nLIhbJ4fWmGs8zXC3"),
        "operator_key": nuid_made("Q0Zu1nLIhbJ4fWmGs8zXD4"),
    });
    let (data_dir, secrets_path) = dir_holding_secrets(root.path(), "data", &old);
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&secrets_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Pages to serve, so that `up` prints the line about the live view.
    let web = root.path().join("web");
    for page in ["demo", "live"] {
        std::fs::create_dir_all(web.join(page)).unwrap();
        std::fs::write(web.join(page).join("index.html"), "<!doctype html>").unwrap();
    }

    let mut up = Up::start(&data_dir, root.path(), &web);
    up.wait_ready();

    // The data dir and everything secret in it: the owner's alone.
    assert_eq!(mode(&data_dir), 0o700, "data dir");
    assert_eq!(mode(&secrets_path), 0o600, "secrets.json");
    let up_json = data_dir.join("up.json");
    assert_eq!(mode(&up_json), 0o600, "up.json");
    assert_eq!(mode(&data_dir.join("keys")), 0o700, "keys dir");
    let keys = files_under(&data_dir.join("keys"));
    assert!(
        keys.iter()
            .any(|k| k.extension().is_some_and(|e| e == "json"))
            && keys
                .iter()
                .any(|k| k.extension().is_some_and(|e| e == "nk")),
        "{keys:?}"
    );
    for key in &keys {
        assert_eq!(mode(key), 0o600, "{}", key.display());
    }

    // Every secret of the old kind was replaced, the operator key too.
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&up_json).unwrap()).unwrap();
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&secrets_path).unwrap()).unwrap();
    for name in [
        "service_password",
        "handler_password",
        "checker_password",
        "vendor_password",
        "device_password",
        "operator_key",
    ] {
        let new = saved[name].as_str().unwrap();
        assert_ne!(Some(new), old[name].as_str(), "{name} kept");
        assert!(
            new.starts_with("hk_") && new.len() >= 40,
            "{name}: new kind"
        );
    }
    let operator_key = info["operator_key"].as_str().unwrap().to_string();
    assert_eq!(saved["operator_key"].as_str(), Some(operator_key.as_str()));
    // Every secret: the values of secrets.json, the passwords and keys of
    // up.json, and the seeds under keys/.
    let mut secrets: Vec<(String, String)> = Vec::new();
    for (name, value) in saved.as_object().unwrap() {
        secrets.push((
            format!("secrets.json {name}"),
            value.as_str().unwrap().into(),
        ));
    }
    for (name, value) in info.as_object().unwrap() {
        if (name.ends_with("_password") || name.ends_with("_key"))
            && let Some(v) = value.as_str()
        {
            assert!(v.len() >= 40, "up.json {name} is short");
            secrets.push((format!("up.json {name}"), v.into()));
        }
    }
    for key in &keys {
        let text = std::fs::read_to_string(key).unwrap();
        let seed = match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(file) => file["seed"].as_str().unwrap().to_string(),
            Err(_) => text.trim().to_string(),
        };
        assert!(seed.len() >= 40, "{}", key.display());
        secrets.push((key.display().to_string(), seed));
    }

    // Two session ids from POST /v1/tokens: unrelated, not NUID-shaped
    // (consecutive NUIDs share their first 12 characters).
    let http_url = info["http_url"].as_str().unwrap();
    let client = reqwest::Client::new();
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let reply = client
            .post(format!("{http_url}/v1/tokens"))
            .bearer_auth(&operator_key)
            .json(&serde_json::json!({"account": "acct-1", "device": "tv"}))
            .send()
            .await
            .unwrap();
        assert!(reply.status().is_success(), "{}", reply.status());
        let body: serde_json::Value = reply.json().await.unwrap();
        sessions.push(body["session"].as_str().unwrap().to_string());
    }
    let (a, b) = (&sessions[0], &sessions[1]);
    assert_ne!(a, b);
    assert!(
        common_prefix(a, b) <= 4,
        "session ids share a prefix: {a} {b}"
    );
    for s in &sessions {
        assert!(s.bytes().all(|c| c.is_ascii_alphanumeric()), "{s}");
    }

    up.stop();

    // No secret in what `up` printed, nor in the server's logs.
    secrets.extend(
        ["service_password", "operator_key"]
            .iter()
            .map(|n| (format!("old {n}"), old[n].as_str().unwrap().to_string())),
    );
    let output = up.output();
    assert!(output.contains("ready"), "{output}");
    assert!(
        output.contains("/live/") && output.contains("up.json"),
        "the live view line says where the key is:\n{output}"
    );
    assert!(
        output.contains("replaced secrets"),
        "the replacement is logged:\n{output}"
    );
    let mut logs = vec![("up output".to_string(), output)];
    for file in std::fs::read_dir(&data_dir).unwrap() {
        let path = file.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("nats") && name.ends_with(".log") {
            logs.push((name, std::fs::read_to_string(&path).unwrap()));
        }
    }
    assert!(
        logs.len() >= 2,
        "no nats log found in {}",
        data_dir.display()
    );
    for (where_, text) in &logs {
        for (name, value) in &secrets {
            assert!(!text.contains(value.as_str()), "{name} appears in {where_}");
        }
    }
}

/// The local addresses of the listening TCP sockets on `port`, from the
/// kernel's tables (IPv4 and IPv6).
fn listeners_on(port: u16) -> Vec<String> {
    let mut found = Vec::new();
    for (table, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // local_address is "ADDR:PORT" in hex; state 0A is LISTEN.
            let (Some(local), Some(state)) = (cols.get(1), cols.get(3)) else {
                continue;
            };
            let Some((addr, p)) = local.split_once(':') else {
                continue;
            };
            if *state != "0A" || u16::from_str_radix(p, 16).ok() != Some(port) {
                continue;
            }
            found.push(if v6 {
                format!("[{addr}]")
            } else {
                // Little-endian IPv4.
                let n = u32::from_str_radix(addr, 16).unwrap_or(0);
                std::net::Ipv4Addr::from(n.swap_bytes()).to_string()
            });
        }
    }
    found
}

#[cfg(target_os = "linux")]
#[test]
fn every_listener_of_up_follows_bind() {
    let root = tempfile::tempdir().unwrap();
    let web = no_pages(root.path());
    let mut up = Up::start(&root.path().join("data"), root.path(), &web);
    up.wait_ready();
    // NATS clients, WebSocket (browsers), HTTP API, metrics: each one
    // listens, and only on the loopback address `--bind` names by default.
    for port in up.ports.clone() {
        let addrs = listeners_on(port);
        assert!(!addrs.is_empty(), "nothing listens on {port}");
        assert!(
            addrs.iter().all(|a| a == "127.0.0.1"),
            "port {port} listens on {addrs:?}"
        );
    }
    up.stop();
}

#[test]
fn up_insecure_runs_its_services_and_answers() {
    let root = tempfile::tempdir().unwrap();
    let web = no_pages(root.path());
    let data_dir = root.path().join("data");
    let mut up = Up::start_with(&data_dir, root.path(), &web, &["--insecure"]);
    up.wait_ready();
    // Each service logged in as its own user on the insecure server too:
    // the checker answers the console.
    let printed = common::answers(&data_dir, &up);
    assert!(printed.contains("\"account\""), "{printed}");
    up.stop();
}

/// One entry of a [`Snapshot`]: name, owner, mode, contents.
#[cfg(unix)]
type Entry = (String, u32, u32, Vec<u8>);

/// A directory's owner and mode, and its entries.
#[cfg(unix)]
type Snapshot = (u32, u32, Vec<Entry>);

/// What a directory holds and how it is set: names with their owner, mode
/// and contents, and the directory's own owner and mode.
#[cfg(unix)]
fn snapshot(dir: &Path) -> Snapshot {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).unwrap();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                m.uid(),
                m.mode(),
                std::fs::read(&path).unwrap_or_default(),
            )
        })
        .collect();
    entries.sort();
    (meta.uid(), meta.mode(), entries)
}

/// `up` on a data dir it may not trust: it leaves within seconds, non-zero,
/// with a message naming the path, its owner and mode and the way out,
/// having written nothing into it and changed nothing about it.
#[cfg(unix)]
fn up_refuses(data_dir: &Path, logs: &Path, expect: &[&str]) {
    let web = no_pages(logs);
    let before = snapshot(data_dir);
    let started = std::time::Instant::now();
    let mut up = Up::start(data_dir, logs, &web);
    let status = up.wait_exit(std::time::Duration::from_secs(20));
    let output = up.output();
    assert!(!status.success(), "up ran on it:\n{output}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert!(!output.contains("ready"), "{output}");
    for part in expect {
        assert!(output.contains(part), "{part:?} not in:\n{output}");
    }
    assert!(
        output.contains(&data_dir.display().to_string()),
        "the path is named:\n{output}"
    );
    assert_eq!(
        snapshot(data_dir),
        before,
        "up touched {}",
        data_dir.display()
    );
}

/// The security review's attack: `nobody` makes a world-writable directory
/// holding a `secrets.json` of known values; root runs `up` on it. `up`
/// must refuse it (not use the planted operator key, not tighten a
/// directory its owner can loosen again), whatever the directory's mode.
#[cfg(unix)]
#[test]
fn up_refuses_a_data_dir_another_user_owns() {
    use std::os::unix::fs::PermissionsExt;
    let nobody = 65534;
    let root = tempfile::tempdir().unwrap();
    let planted = serde_json::json!({
        "service_password": format!("hk_{}", "s".repeat(43)),
        "handler_password": format!("hk_{}", "h".repeat(43)),
        "checker_password": format!("hk_{}", "c".repeat(43)),
        "vendor_password": format!("hk_{}", "v".repeat(43)),
        "device_password": format!("hk_{}", "d".repeat(43)),
        "operator_key": format!("hk_{}", "k".repeat(43)),
    });
    let (evil, secrets) = dir_holding_secrets(root.path(), "evil", &planted);
    for path in [&evil, &secrets] {
        match std::os::unix::fs::chown(path, Some(nobody), Some(nobody)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                eprintln!("skipped: making a directory of another user needs root ({e})");
                return;
            }
            Err(e) => panic!("chown {}: {e}", path.display()),
        }
    }
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o644)).unwrap();
    for mode in [0o777, 0o700] {
        std::fs::set_permissions(&evil, std::fs::Permissions::from_mode(mode)).unwrap();
        up_refuses(
            &evil,
            root.path(),
            &[
                "owned by",
                "uid 65534",
                &format!("mode {mode:04o}"),
                "chown",
                "--data-dir",
            ],
        );
    }
}

/// A data dir of this user's that others may write into: they may have
/// planted its secrets.json, so `up` refuses it rather than tighten it.
#[cfg(unix)]
#[test]
fn up_refuses_a_data_dir_others_may_write() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let (shared, secrets) = dir_holding_secrets(root.path(), "shared", &serde_json::json!({}));
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    up_refuses(
        &shared,
        root.path(),
        &["writable", "mode 0777", "chmod 700"],
    );
    // A secrets.json others may write, in a private data dir: refused too.
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o666)).unwrap();
    let web = no_pages(root.path());
    let mut up = Up::start(&shared, root.path(), &web);
    let status = up.wait_exit(std::time::Duration::from_secs(20));
    let output = up.output();
    assert!(!status.success(), "{output}");
    assert!(
        output.contains(&secrets.display().to_string())
            && output.contains("mode 0666")
            && output.contains("chmod 600"),
        "{output}"
    );
    assert_eq!(std::fs::read(&secrets).unwrap(), b"{}");
}
