//! The query commands as a user runs them: the `headcount` binary against
//! real nats-server processes (or none), holding each outcome to its exit
//! status (`headcount --help`, README "Exit status"): 0 success, 1 refused
//! or not found, 2 usage, 3 unreachable, 4 service error. Under `--json`
//! every error is one JSON object on stdout.
//!
//! No timing is asserted beyond generous guards against hangs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use headcount_protocol::wire::Heartbeat;
use headcount_protocol::{Limit, Policy};
use serde_json::Value;
use test_support::{Device, TestApp, free_port};

/// A command that hangs fails the test after this long.
const HANG: Duration = Duration::from_secs(10);
const BEAT: Duration = Duration::from_millis(300);

/// What one run of the binary did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// stdout as exactly one JSON value.
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {self:?}"))
    }

    /// What a failed run under `--json` printed: one JSON object, whose
    /// `code` is the exit status, which must be `code`.
    fn json_error(&self, code: i32) -> Value {
        assert_eq!(self.code, code, "{self:?}");
        let v = self.json();
        assert_eq!(v["code"], code, "{self:?}");
        v
    }
}

/// Runs `headcount args...` in `cwd` with `env` (and no other `HEADCOUNT_*`
/// variable); panics if it runs longer than [`HANG`].
async fn headcount(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_headcount"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HEADCOUNT_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let out = tokio::time::timeout(HANG, cmd.output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "`headcount {}` still running after {HANG:?}",
                args.join(" ")
            )
        })
        .expect("headcount runs");
    let run = Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(started.elapsed() < HANG, "{run:?}");
    run
}

/// The console's login to NATS at `url` with `password`, as flags.
fn login(url: &str, password: &str) -> Vec<String> {
    let mut flags = Vec::new();
    for (flag, value) in [
        ("--nats-url", url),
        ("--nats-user", "headcount"),
        ("--nats-password", password),
    ] {
        flags.extend([flag.to_string(), value.to_string()]);
    }
    flags
}

/// `headcount <args>` logged in to NATS at `url` with `password`, from a
/// directory of its own.
async fn logged_in(args: &[&str], url: &str, password: &str) -> Run {
    let cwd = tempfile::tempdir().unwrap();
    let login = login(url, password);
    let mut all: Vec<&str> = args.to_vec();
    all.extend(login.iter().map(String::as_str));
    headcount(cwd.path(), &all, &[]).await
}

/// `headcount <args>` as the console of `app`'s server.
async fn against(app: &TestApp, args: &[&str]) -> Run {
    logged_in(args, &app.nats.url(), &app.nats.service_password).await
}

/// Services with `limit` as every account's default, and acme's tv playing
/// as session s1.
async fn tv_playing(limit: Limit) -> (TestApp, Device) {
    let app = TestApp::spawn_with(limit).await;
    let fleet = app.nats.fleet_client().await;
    let tv = Device::start(fleet, "acme", "tv", "s1", BEAT, Heartbeat::default());
    app.wait_count("acme", 1).await;
    (app, tv)
}

/// An up.json as `headcount up` writes it, naming NATS at `nats_url`.
fn write_up_json(dir: &Path, nats_url: &str) {
    let up = serde_json::json!({
        "nats_url": nats_url,
        "http_url": "http://127.0.0.1:1",
        "metrics_url": "http://127.0.0.1:1/metrics",
        "service_user": "headcount",
        "service_password": "not-the-password",
        "operator_key": "not-the-key",
        "callout_issuer": "",
    });
    std::fs::write(dir.join("up.json"), up.to_string()).unwrap();
}

#[tokio::test]
async fn unreachable_nats_exits_3_naming_the_url_and_where_it_came_from() {
    let cwd = tempfile::tempdir().unwrap();
    let url = format!("nats://127.0.0.1:{}", free_port());

    let r = headcount(cwd.path(), &["active", "acct-1", "--nats-url", &url], &[]).await;
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("cannot reach NATS at {url} (from --nats-url)")),
        "{r:?}"
    );

    let r = headcount(
        cwd.path(),
        &["check", "acct-1", "phone"],
        &[("HEADCOUNT_NATS_URL", &url)],
    )
    .await;
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr.contains(&format!(
            "cannot reach NATS at {url} (from HEADCOUNT_NATS_URL)"
        )),
        "{r:?}"
    );
}

#[tokio::test]
async fn nats_that_never_answers_is_given_up_on_after_the_connect_timeout() {
    // Accepts TCP connections (the kernel's backlog) but never speaks NATS.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("nats://{}", silent.local_addr().unwrap());
    let cwd = tempfile::tempdir().unwrap();
    let r = headcount(
        cwd.path(),
        &["stats", "--nats-url", &url],
        &[("HEADCOUNT_CONNECT_TIMEOUT", "1s")],
    )
    .await;
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("cannot reach NATS at {url} (from --nats-url)")),
        "{r:?}"
    );
    assert!(r.stderr.contains("no answer within 1s"), "{r:?}");
    drop(silent);
}

#[tokio::test]
async fn a_stale_up_json_exits_3_naming_its_path() {
    let cwd = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let url = format!("nats://127.0.0.1:{}", free_port());
    write_up_json(data.path(), &url);
    let up_json = std::path::absolute(data.path().join("up.json")).unwrap();
    let expected = format!("cannot reach NATS at {url} (from {})", up_json.display());

    let dir = data.path().to_str().unwrap();
    let r = headcount(cwd.path(), &["active", "acct-1", "--data-dir", dir], &[]).await;
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains(&expected), "{r:?}");

    // The same through the environment, for a command that keeps running.
    let r = headcount(
        cwd.path(),
        &["top", "--rows", "3"],
        &[("HEADCOUNT_DATA_DIR", dir)],
    )
    .await;
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains(&expected), "{r:?}");
}

#[tokio::test]
async fn a_missing_up_json_is_a_usage_error_naming_the_absolute_path() {
    let cwd = tempfile::tempdir().unwrap();
    // What the working directory is to the binary (no symbolic links).
    let looked_at = cwd
        .path()
        .canonicalize()
        .unwrap()
        .join(".headcount/up.json");

    let r = headcount(cwd.path(), &["kick", "acct-1", "s1"], &[]).await;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("no up.json at {}", looked_at.display())),
        "{r:?}"
    );
    for fix in ["headcount up", "--data-dir", "--nats-url"] {
        assert!(r.stderr.contains(fix), "does not suggest {fix}: {r:?}");
    }

    // A data dir given as a relative path is named absolutely too.
    let r = headcount(
        cwd.path(),
        &[
            "limits",
            "get",
            "acct-1",
            "--data-dir",
            "elsewhere",
            "--json",
        ],
        &[],
    )
    .await;
    let v = r.json_error(2);
    let path = cwd.path().canonicalize().unwrap().join("elsewhere/up.json");
    assert_eq!(v["path"], path.display().to_string(), "{r:?}");

    // backend-token reads up.json the same way.
    let r = headcount(cwd.path(), &["backend-token", "web-1"], &[]).await;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("no up.json at {}", looked_at.display())),
        "{r:?}"
    );
}

#[tokio::test]
async fn json_errors_are_one_object_on_stdout() {
    let cwd = tempfile::tempdir().unwrap();
    let url = format!("nats://127.0.0.1:{}", free_port());

    // Unreachable: exit status 3, the URL and its source as fields.
    let r = headcount(
        cwd.path(),
        &["active", "acct-1", "--json", "--nats-url", &url],
        &[],
    )
    .await;
    let v = r.json_error(3);
    assert_eq!(v["nats_url"], url.as_str());
    assert_eq!(v["from"], "--nats-url");
    assert!(v["error"].as_str().unwrap().contains(&url), "{r:?}");
    // Still a readable line for a person.
    assert!(r.stderr.starts_with("error: cannot reach NATS"), "{r:?}");

    // token-vendor unreachable: the same for backend-token.
    let http = format!("http://127.0.0.1:{}", free_port());
    let r = headcount(
        cwd.path(),
        &[
            "backend-token",
            "web-1",
            "--json",
            "--http-url",
            &http,
            "--operator-key",
            "k",
        ],
        &[],
    )
    .await;
    let v = r.json_error(3);
    assert!(
        v["error"].as_str().unwrap().contains(&format!(
            "cannot reach token-vendor at {http} (from --http-url)"
        )),
        "{r:?}"
    );

    // A usage error clap finds: status 2, still one object.
    let r = headcount(
        cwd.path(),
        &["top", "--rows", "many", "--json", "--nats-url", &url],
        &[],
    )
    .await;
    r.json_error(2);
    assert!(r.stderr.contains("--rows"), "{r:?}");
}

#[tokio::test]
async fn service_answers_and_errors_have_their_statuses() {
    let app = TestApp::spawn().await;

    // The service refuses the request: status 4, its code as `status`.
    let r = against(
        &app,
        &["limits", "set", "acct-1", "--plan", "gold", "--json"],
    )
    .await;
    let v = r.json_error(4);
    assert_eq!(v["status"], 400);
    assert!(v["error"].as_str().unwrap().contains("gold"), "{r:?}");
    assert!(r.stderr.contains("unknown plan"), "{r:?}");

    // Success: the reply itself, status 0.
    let r = against(&app, &["limits", "get", "acct-1", "--json"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["limit"], 2, "{r:?}");

    // A wrong password: NATS refuses, status 3, naming the URL.
    let url = app.nats.url();
    let r = logged_in(&["active", "acct-1"], &url, "wrong").await;
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("NATS at {url} (from --nats-url) refused")),
        "{r:?}"
    );

    // No token-vendor on this server: nobody answers headcount.token (the
    // checker hears every headcount.* subject, so this is a time-out).
    let r = against(&app, &["token", "acct-1", "tv"]).await;
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("headcount.token"), "{r:?}");
    assert!(r.stderr.contains("token-vendor running?"), "{r:?}");
}

#[tokio::test]
async fn kick_of_an_unknown_session_exits_1() {
    let (app, tv) = tv_playing(Limit::new(2, Policy::EvictOldest).unwrap()).await;

    let r = against(&app, &["kick", "acme", "nosuchsession"]).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("no active session nosuchsession on account acme"),
        "{r:?}"
    );

    let r = against(&app, &["kick", "acme", "nosuchsession", "--json"]).await;
    let v = r.json_error(1);
    assert_eq!(v["kicked"], false);
    assert!(v["error"].as_str().unwrap().contains("nosuchsession"));

    // The session that is there: kicked, status 0; a second kick finds nothing.
    let r = against(&app, &["kick", "acme", "s1"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("kicked"), "{r:?}");
    let r = against(&app, &["kick", "acme", "s1"]).await;
    assert_eq!(r.code, 1, "{r:?}");
    tv.silence().await;
}

#[tokio::test]
async fn check_refused_under_reject_new_at_the_limit_exits_1() {
    let (app, tv) = tv_playing(Limit::new(1, Policy::RejectNew).unwrap()).await;

    let r = against(&app, &["check", "acme", "phone"]).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("phone is refused"), "{r:?}");

    let r = against(&app, &["check", "acme", "phone", "--json"]).await;
    let v = r.json_error(1);
    assert_eq!(v["allowed"], false, "{r:?}");
    assert!(v["error"].as_str().unwrap().contains("refused"));
    assert!(r.stderr.contains("phone is refused"), "{r:?}");

    // The device already playing may go on: status 0.
    let r = against(&app, &["check", "acme", "tv"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("tv may play"), "{r:?}");
    tv.silence().await;
}

#[tokio::test]
async fn top_and_stats_say_how_many_accounts_they_left_out() {
    let app = TestApp::spawn().await;
    let fleet = app.nats.fleet_client().await;
    let accounts: Vec<String> = (0..5).map(|i| format!("acct-{i}")).collect();
    let devices: Vec<Device> = accounts
        .iter()
        .map(|a| Device::start(fleet.clone(), a, "tv", "s1", BEAT, Heartbeat::default()))
        .collect();
    for a in &accounts {
        app.wait_count(a, 1).await;
    }

    let r = against(&app, &["top", "--once", "--rows", "2"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("... and 3 more accounts"), "{r:?}");
    let listed = accounts.iter().filter(|a| r.stdout.contains(*a)).count();
    assert_eq!(listed, 2, "{r:?}");

    let r = against(&app, &["top", "--once", "--rows", "10"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!r.stdout.contains("more account"), "{r:?}");
    assert!(accounts.iter().all(|a| r.stdout.contains(a)), "{r:?}");

    let r = against(&app, &["top", "--once", "--rows", "4", "--json"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    let v = r.json();
    assert_eq!(v["top"].as_array().unwrap().len(), 4, "{r:?}");
    assert_eq!(v["more_accounts"], 1, "{r:?}");

    let r = against(&app, &["stats", "--top", "1"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("... and 4 more accounts"), "{r:?}");

    Device::silence_all(devices).await;
}

#[tokio::test]
async fn nats_without_a_checker_exits_3() {
    // A server and nothing else: nobody answers headcount.*.
    let nats = test_support::NatsServer::start();
    let args = ["active", "acct-1", "--json"];
    let r = logged_in(&args, &nats.url(), &nats.service_password).await;
    let v = r.json_error(3);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("no service answers headcount.active"),
        "{r:?}"
    );
}

#[tokio::test]
async fn help_documents_the_exit_statuses() {
    let cwd = tempfile::tempdir().unwrap();
    let r = headcount(cwd.path(), &["--help"], &[]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("Exit status"), "{r:?}");
    for line in ["  0  ", "  1  ", "  2  ", "  3  ", "  4  "] {
        assert!(r.stdout.contains(line), "no {line:?} in {r:?}");
    }
}
