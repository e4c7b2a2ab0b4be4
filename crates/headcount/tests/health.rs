//! `/healthz` and `/readyz` on real processes: the `headcount` binary's
//! handler and checker run as children against a NATS URL where nothing
//! listens yet, then a nats-server comes up on that port and is killed
//! again; `headcount up` answers for all its services on one listener; an
//! in-process token vendor's readiness follows its connection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{Up, headcount};

use test_support::{Login, NatsServer, TestApp, free_port};

/// A standalone service (`headcount handler|checker`) as a child process.
struct Service {
    child: Child,
    log: PathBuf,
    metrics_port: u16,
    _dir: tempfile::TempDir,
}

impl Service {
    fn start(kind: &str, nats_port: u16, login: Login, console_password: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let metrics_port = free_port();
        let log = dir.path().join(format!("{kind}.log"));
        let child = headcount()
            .arg(kind)
            .args(["--nats-url", &format!("nats://127.0.0.1:{nats_port}")])
            .args(["--nats-user", login.user()])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .arg("--data-dir")
            .arg(dir.path())
            .env(
                "HEADCOUNT_NATS_PASSWORD",
                test_support::password_of(login, console_password),
            )
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("headcount binary starts");
        Self {
            child,
            log,
            metrics_port,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.metrics_port)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- service log ----\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// Status and body of a GET, or None when nothing answers.
async fn get(url: &str) -> Option<(u16, String)> {
    let r = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.unwrap_or_default()))
}

/// Polls `url` until it answers with `status`; returns the body.
async fn wait_for(url: &str, status: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let got = get(url).await;
        if let Some((s, body)) = &got
            && *s == status
        {
            return body.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{url} did not answer {status} within {within:?}; last answer: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The whole story for one standalone service: alive but not ready without
/// NATS, ready once a server is up and the watches have replayed, not
/// ready again (still alive) once the server is gone, ready again once it
/// is back.
async fn readiness_follows_nats(kind: &str, scope: &str, login: Login) {
    let port = free_port();
    let password = format!("svc-health-{port}");
    let service = Service::start(kind, port, login, &password);

    assert_eq!(
        wait_for(&service.url("/healthz"), 200, Duration::from_secs(20)).await,
        "ok\n"
    );
    let (status, body) = get(&service.url("/readyz")).await.expect("readyz answers");
    assert_eq!(status, 503, "ready without NATS: {body}");
    assert!(
        body.contains(&format!("{scope}/nats")),
        "the body names the connection: {body}"
    );

    let mut nats = NatsServer::start_on_with_password(port, &password);
    assert_eq!(
        wait_for(&service.url("/readyz"), 200, Duration::from_secs(60)).await,
        "ok\n"
    );
    assert_eq!(get(&service.url("/healthz")).await.unwrap().0, 200);

    nats.stop();
    let body = wait_for(&service.url("/readyz"), 503, Duration::from_secs(30)).await;
    assert!(
        body.contains(&format!("{scope}/nats")),
        "the body names the connection: {body}"
    );
    assert_eq!(
        get(&service.url("/healthz")).await,
        Some((200, "ok\n".to_string()))
    );

    nats.restart();
    wait_for(&service.url("/readyz"), 200, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_is_alive_at_once_and_ready_only_while_nats_is_there() {
    readiness_follows_nats("handler", "heartbeat-handler", Login::Handler).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checker_is_alive_at_once_and_ready_only_while_nats_is_there() {
    readiness_follows_nats("checker", "checker", Login::Checker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_vendor_is_ready_while_connected_and_serving() {
    let mut app = TestApp::spawn().await;
    let tv = app.start_token_vendor("operator-key").await;
    let readyz = format!("{}/readyz", tv.http);
    assert_eq!(
        wait_for(&readyz, 200, Duration::from_secs(15)).await,
        "ok\n"
    );
    assert!(tv.running.health.is_ready());

    app.nats.stop();
    let body = wait_for(&readyz, 503, Duration::from_secs(30)).await;
    assert!(body.contains("token-vendor/nats"), "{body}");
    assert_eq!(
        get(&format!("{}/healthz", tv.http)).await,
        Some((200, "ok\n".to_string()))
    );
    // The handler and the checker of the same server say the same.
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.handlers[0].health.is_ready() || app.checkers[0].health.is_ready() {
        assert!(Instant::now() < deadline, "handler or checker still ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        app.checkers[0]
            .health
            .status()
            .not_ready
            .contains(&"checker/nats".to_string())
    );
}

/// `headcount up`: one listener answers for every service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_is_ready_on_its_metrics_listener_when_all_its_services_are() {
    let root = tempfile::tempdir().unwrap();
    let web = root.path().join("web");
    std::fs::create_dir_all(&web).unwrap();
    let up = Up::start(&root.path().join("data"), root.path(), &web);
    let ports = up.ports.clone();

    let base = format!("http://127.0.0.1:{}", ports[3]);
    assert_eq!(
        wait_for(&format!("{base}/readyz"), 200, Duration::from_secs(90)).await,
        "ok\n"
    );
    assert_eq!(
        get(&format!("{base}/healthz")).await,
        Some((200, "ok\n".to_string()))
    );
    let (status, _) = get(&format!("{base}/metrics")).await.unwrap();
    assert_eq!(status, 200);
}
