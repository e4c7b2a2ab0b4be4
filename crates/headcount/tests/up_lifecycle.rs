//! The life of a real `headcount up`, for a newcomer's sake: a second `up`
//! on the same data dir is refused and leaves the first alone, a port in
//! use is named before anything starts, a killed `up` takes its nats-server
//! along (and a server left running on the store is refused, not joined),
//! and what `up` prints to a file is plain text ending with
//! `headcount stopped`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;
#[cfg(target_os = "linux")]
use std::time::Instant;

use common::{Up, UpOptions, answers};
use test_support::free_port;

/// A temp root holding the data dir, the output files and (empty) pages.
struct Scene {
    root: tempfile::TempDir,
    data_dir: PathBuf,
    web: PathBuf,
}

impl Scene {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let web = root.path().join("web");
        std::fs::create_dir_all(&web).unwrap();
        Self {
            data_dir: root.path().join("data"),
            web,
            root,
        }
    }

    /// How to start an `up` on this scene whose output files are named
    /// `name`.
    fn up(&self, name: &str) -> UpOptions<'_> {
        let mut o = UpOptions::new(&self.data_dir, self.root.path(), &self.web);
        o.name = name.into();
        o
    }
}

/// An `up` started with `o`, once it is ready.
fn ready(o: &UpOptions<'_>) -> Up {
    let mut up = Up::spawn(o);
    up.wait_ready();
    up
}

/// An `up` started with `o` that must give up within ten seconds, and what
/// it said on stderr.
fn refused(o: &UpOptions<'_>) -> (Up, String) {
    let mut up = Up::spawn(o);
    let status = up.wait_exit(Duration::from_secs(10));
    let said = up.stderr_text();
    assert!(!status.success(), "{} ran ({status}):\n{said}", o.name);
    (up, said)
}

/// The pids in `<data-dir>/nats.pid`.
fn recorded_servers(data_dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(data_dir.join("nats.pid"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Whether `pid` runs (a zombie nobody reaped does not).
#[cfg(target_os = "linux")]
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// The live nats-servers whose command line names `data_dir`.
#[cfg(target_os = "linux")]
fn servers_on(data_dir: &Path) -> Vec<u32> {
    let dir = data_dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("nats-server") && cmdline.contains(&dir) && alive(pid) {
            found.push(pid);
        }
    }
    found
}

fn accepts(port: u16) -> bool {
    TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    )
    .is_ok()
}

#[test]
fn a_second_up_on_the_same_data_dir_is_refused_and_leaves_the_first_alone() {
    let scene = Scene::new();
    let data_dir = &scene.data_dir;
    let mut first = ready(&scene.up("first"));
    let up_json = std::fs::read(data_dir.join("up.json")).unwrap();
    let info: serde_json::Value = serde_json::from_slice(&up_json).unwrap();
    let nats_url = info["nats_url"].as_str().unwrap().to_string();
    let servers = recorded_servers(data_dir);
    assert_eq!(servers.len(), 1, "nats.pid: {servers:?}");

    // Other ports (free ones), same data dir.
    let (second, said) = refused(&scene.up("second"));
    assert_ne!(second.ports, first.ports);
    assert!(said.contains("already running"), "{said}");
    assert!(
        said.contains(&format!("pid {}", first.child.id())),
        "names the first's pid:\n{said}"
    );
    assert!(said.contains(&nats_url), "names {nats_url}:\n{said}");
    // It started nothing and touched none of the first's files.
    assert!(!accepts(second.ports[0]), "second nats port listens");
    assert_eq!(std::fs::read(data_dir.join("up.json")).unwrap(), up_json);
    assert_eq!(recorded_servers(data_dir), servers);

    // The first still answers, and still stops cleanly.
    answers(data_dir, &first);
    first.stop();
    assert!(
        first.output().contains("headcount stopped"),
        "{}",
        first.output()
    );
    assert!(!data_dir.join("up.json").exists());
}

#[test]
fn up_names_a_port_in_use_and_starts_nothing() {
    for (slot, flag) in [(0, "--nats-port"), (3, "--metrics-port")] {
        let scene = Scene::new();
        let data_dir = &scene.data_dir;
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let mut ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
        ports[slot] = port;
        let mut o = scene.up("up");
        o.ports = Some(ports);
        let (_up, said) = refused(&o);
        assert!(
            said.contains(&format!("port {port} ({flag}) is in use on 127.0.0.1")),
            "{said}"
        );
        // No nats-server was started: none recorded, no store, none running.
        assert!(!data_dir.join("nats.pid").exists(), "{flag}: nats.pid");
        assert!(!data_dir.join("jetstream").exists(), "{flag}: a store");
        assert!(!data_dir.join("up.json").exists(), "{flag}: up.json");
        #[cfg(target_os = "linux")]
        assert!(
            servers_on(data_dir).is_empty(),
            "{flag}: a nats-server runs"
        );
        drop(taken);
    }
}

#[cfg(target_os = "linux")]
#[test]
fn a_killed_up_takes_its_nats_server_along() {
    let scene = Scene::new();
    let data_dir = &scene.data_dir;
    let mut up = ready(&scene.up("killed"));
    let servers = recorded_servers(data_dir);
    assert_eq!(servers.len(), 1, "nats.pid: {servers:?}");
    let server = servers[0];
    assert!(alive(server));
    let nats_port = up.ports[0];
    assert!(accepts(nats_port));

    up.child.kill().unwrap(); // SIGKILL: no handler of `up` runs.
    up.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(server) || accepts(nats_port) {
        assert!(
            Instant::now() < deadline,
            "nats-server {server} outlived the killed up (port {nats_port} accepts: {})",
            accepts(nats_port)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(servers_on(data_dir).is_empty());

    // A new `up` on the same data dir and the same ports starts and answers.
    let ports = up.ports.clone();
    drop(up);
    let mut o = scene.up("again");
    o.ports = Some(ports);
    let mut again = ready(&o);
    answers(data_dir, &again);
    again.stop();
    assert!(again.output().contains("headcount stopped"));
}

/// A child process killed when dropped.
#[cfg(target_os = "linux")]
struct Killed(std::process::Child);

#[cfg(target_os = "linux")]
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(target_os = "linux")]
#[test]
fn up_refuses_a_store_whose_server_still_runs() {
    let scene = Scene::new();
    let data_dir = &scene.data_dir;
    std::fs::create_dir_all(data_dir).unwrap();
    // What an `up` of an older build leaves when it is killed: its server,
    // still running on the store.
    let port = free_port();
    let orphan = Killed(
        std::process::Command::new("nats-server")
            .env("PATH", common::tools_path())
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(data_dir.join("jetstream"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server starts"),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !accepts(port) {
        assert!(Instant::now() < deadline, "the orphan server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = orphan.0.id();
    std::fs::write(data_dir.join("nats.pid"), format!("{pid}\n")).unwrap();

    let (up, said) = refused(&scene.up("up"));
    assert!(
        said.contains(&format!("nats-server (pid {pid}) still running")),
        "{said}"
    );
    assert!(
        said.contains(&format!("kill {pid}")),
        "says what to do:\n{said}"
    );
    assert!(!accepts(up.ports[0]), "a second server was started");

    // Once it is stopped, `up` starts.
    drop(orphan);
    let mut again = ready(&scene.up("after"));
    answers(data_dir, &again);
    again.stop();
}

#[test]
fn up_writes_plain_text_to_a_file_and_says_stopped_last() {
    let scene = Scene::new();
    let mut o = scene.up("up");
    // stdout and stderr into one file, in the order written.
    o.one_file = true;
    let mut up = ready(&o);
    up.stop();
    let status = up.wait_exit(Duration::from_secs(1));
    assert!(status.success(), "{status}:\n{}", up.output());
    let bytes = std::fs::read(&up.stdout).unwrap();
    assert!(
        !bytes.contains(&0x1b),
        "escape codes in a log file:\n{}",
        String::from_utf8_lossy(&bytes)
    );
    let text = String::from_utf8(bytes).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.last().copied(),
        Some("headcount stopped"),
        "not the last line:\n{text}"
    );
    // Every service and the server said so before it.
    for said in [
        "heartbeat-handler stopped",
        "checker stopped",
        "nats-server stopped",
    ] {
        assert!(text.contains(said), "{said} missing:\n{text}");
    }
}
