//! `headcount up` as a child process, for the integration tests that run
//! the real binary (secrets.rs, up_lifecycle.rs): free loopback ports, a
//! data dir of the test's own, the output in files.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use test_support::free_port;

/// `PATH` with the repository's `.tools/venv/bin` (nats-server) first.
pub fn tools_path() -> std::ffi::OsString {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/venv/bin");
    match std::env::var_os("PATH") {
        Some(p) => {
            let mut dirs = vec![tools];
            dirs.extend(std::env::split_paths(&p));
            std::env::join_paths(dirs).unwrap()
        }
        None => tools.into_os_string(),
    }
}

/// The headcount binary, with nats-server on its `PATH` and nothing from
/// the caller's `HEADCOUNT_*` environment.
pub fn headcount() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_headcount"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HEADCOUNT_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("PATH", tools_path());
    cmd
}

/// How to start one `up`: [`UpOptions::new`] gives the defaults of
/// [`Up::start`].
#[derive(Debug, Clone)]
pub struct UpOptions<'a> {
    pub data_dir: &'a Path,
    /// Where the output files go.
    pub logs: &'a Path,
    pub web_dir: &'a Path,
    /// Flags besides the ports, data dir and pages.
    pub extra: Vec<String>,
    /// NATS, WebSocket, HTTP and metrics ports; free ones when `None`.
    pub ports: Option<Vec<u16>>,
    /// Names the output files (`<name>.stdout`, `<name>.stderr`), so that
    /// several `up`s can share `logs`.
    pub name: String,
    /// stdout and stderr into one file (`<name>.out`), in the order written.
    pub one_file: bool,
}

impl<'a> UpOptions<'a> {
    pub fn new(data_dir: &'a Path, logs: &'a Path, web_dir: &'a Path) -> Self {
        Self {
            data_dir,
            logs,
            web_dir,
            extra: Vec::new(),
            ports: None,
            name: "up".into(),
            one_file: false,
        }
    }
}

/// `headcount up` as a child process, stopped (SIGTERM, then SIGKILL) when
/// dropped.
pub struct Up {
    pub child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// Every port `up` was told to listen on.
    pub ports: Vec<u16>,
    /// How it was started, to start it again on other free ports when a
    /// port picked as free was taken by a parallel test before `up` bound
    /// it; `None` when the test chose the ports.
    again: Option<Again>,
}

/// An owned copy of the [`UpOptions`] an `up` was started with.
struct Again {
    data_dir: PathBuf,
    logs: PathBuf,
    web_dir: PathBuf,
    extra: Vec<String>,
    name: String,
    one_file: bool,
}

impl Up {
    pub fn start(data_dir: &Path, logs: &Path, web_dir: &Path) -> Up {
        Self::start_with(data_dir, logs, web_dir, &[])
    }

    /// `up` with `extra` flags besides the ports, data dir and pages.
    pub fn start_with(data_dir: &Path, logs: &Path, web_dir: &Path, extra: &[&str]) -> Up {
        let mut o = UpOptions::new(data_dir, logs, web_dir);
        o.extra = extra.iter().map(|s| s.to_string()).collect();
        Self::spawn(&o)
    }

    pub fn spawn(o: &UpOptions<'_>) -> Up {
        let (stdout, stderr) = if o.one_file {
            let out = o.logs.join(format!("{}.out", o.name));
            (out.clone(), out)
        } else {
            (
                o.logs.join(format!("{}.stdout", o.name)),
                o.logs.join(format!("{}.stderr", o.name)),
            )
        };
        let ports = o
            .ports
            .clone()
            .unwrap_or_else(|| (0..4).map(|_| free_port()).collect());
        let out_file = std::fs::File::create(&stdout).unwrap();
        // One open file for both: the writes of each land in order.
        let err_file = if o.one_file {
            out_file.try_clone().unwrap()
        } else {
            std::fs::File::create(&stderr).unwrap()
        };
        let child = headcount()
            .arg("up")
            .args(["--nats-port", &ports[0].to_string()])
            .args(["--ws-port", &ports[1].to_string()])
            .args(["--http-port", &ports[2].to_string()])
            .args(["--metrics-port", &ports[3].to_string()])
            .arg("--data-dir")
            .arg(o.data_dir)
            .arg("--web-dir")
            .arg(o.web_dir)
            .args(&o.extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out_file)
            .stderr(err_file)
            .spawn()
            .expect("headcount binary starts");
        Up {
            child,
            stdout,
            stderr,
            ports,
            again: o.ports.is_none().then(|| Again {
                data_dir: o.data_dir.to_path_buf(),
                logs: o.logs.to_path_buf(),
                web_dir: o.web_dir.to_path_buf(),
                extra: o.extra.clone(),
                name: o.name.clone(),
                one_file: o.one_file,
            }),
        }
    }

    /// Waits for the `ready` line; panics with the output if `up` exits or
    /// takes too long.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut tries = 0;
        loop {
            let out = std::fs::read_to_string(&self.stdout).unwrap_or_default();
            if out.lines().any(|l| l.contains("headcount ready")) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                // A free port taken by a parallel test in the meantime: `up`
                // names it and starts nothing; try again on other ports.
                if tries < 3
                    && self.output().contains("is in use")
                    && let Some(a) = &self.again
                {
                    tries += 1;
                    let mut o = UpOptions::new(&a.data_dir, &a.logs, &a.web_dir);
                    o.extra = a.extra.clone();
                    o.name = a.name.clone();
                    o.one_file = a.one_file;
                    *self = Up::spawn(&o);
                    continue;
                }
                panic!(
                    "headcount up exited ({status}) before ready:\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "headcount up not ready in time:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for `up` to exit by itself; panics (after killing it) if it is
    /// still running after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "headcount up still running after {within:?}:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Asks `up` to stop and waits for it (it removes up.json on the way out).
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Everything `up` printed: stdout, then stderr (or the one file).
    pub fn output(&self) -> String {
        let out = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        if self.stderr == self.stdout {
            return out;
        }
        format!(
            "{out}{}",
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

/// Asserts that the `up` of `data_dir` answers the console: `headcount
/// active x --json` through its up.json succeeds. Returns what it printed.
pub fn answers(data_dir: &Path, up: &Up) -> String {
    let out = headcount()
        .args(["active", "x", "--json", "--data-dir"])
        .arg(data_dir)
        .output()
        .expect("the CLI runs");
    assert!(
        out.status.success(),
        "active failed: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        up.output()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
