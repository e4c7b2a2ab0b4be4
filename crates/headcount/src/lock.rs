//! One `headcount up` per data dir, and no nats-server left running on it.
//!
//! [`DataDirLock`] is an exclusive OS file lock on `<data-dir>/up.lock`
//! (`flock` on Linux, through std's `File::try_lock`), held for as long as
//! `up` lives and released by the kernel however it ends, SIGKILL included.
//! Only the holder writes or removes anything else in the data dir (up.json,
//! secrets, keys, nats.conf, the server's store); a second `up` reads who
//! holds it from the lock file and leaves.
//!
//! `<data-dir>/nats.pid` lists the nats-servers the holder started. A server
//! of an `up` that was killed without taking it along (an older build, a
//! system without `setpriv`, or a kill in the instant between spawning the
//! server and `setpriv` setting its parent-death signal) is found there, or
//! by its command line in `/proc`, and `up` refuses to start a second
//! server on the same store.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::config::UpInfo;

/// The lock file, which also says who holds it.
pub(crate) const LOCK_FILE: &str = "up.lock";
/// The pids of the nats-servers the lock holder started, one a line.
pub(crate) use headcount_app::server::PID_FILE;

/// What the holder writes into the lock file, for the message of the next.
#[derive(Debug, Serialize, Deserialize)]
struct Holder {
    pid: u32,
    nats_url: String,
}

/// The exclusive lock on a data dir; released (by closing the file) when
/// dropped or when the process ends.
#[derive(Debug)]
pub(crate) struct DataDirLock {
    file: File,
}

impl DataDirLock {
    /// Creates `dir` if missing (mode 0700) and locks it, or says which
    /// `headcount up` already has it. `nats_url` is where this one's NATS
    /// will be, for the message a later `up` prints.
    pub(crate) fn acquire(dir: &Path, nats_url: &str) -> anyhow::Result<Self> {
        headcount_runtime::secret::create_private_dir(dir)?;
        let path = dir.join(LOCK_FILE);
        let mut options = OpenOptions::new();
        // Never truncated on open: the holder's note stays readable.
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => bail!("{}", already_running(dir, &path)),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        let note = serde_json::to_vec(&Holder {
            pid: std::process::id(),
            nats_url: nats_url.to_string(),
        })?;
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(&note))
            .and_then(|()| file.flush())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Self { file })
    }
}

impl Drop for DataDirLock {
    fn drop(&mut self) {
        // The note names a process that is gone now; the lock goes with the
        // file. The file itself stays: removing it would let two later
        // `up`s lock two different files of the same name.
        let _ = self.file.set_len(0);
    }
}

/// The message for a second `up`: who holds the lock, read from the lock
/// file (or up.json when the note is unreadable).
fn already_running(dir: &Path, lock: &Path) -> String {
    // The holder writes its note right after locking: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(1);
    let holder = loop {
        let mut text = String::new();
        let read = File::open(lock).and_then(|mut f| f.read_to_string(&mut text));
        if read.is_ok()
            && let Ok(h) = serde_json::from_str::<Holder>(&text)
        {
            break Some(h);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let url = holder
        .as_ref()
        .map(|h| h.nats_url.clone())
        .or_else(|| UpInfo::load(dir).ok().map(|u| u.nats_url))
        .unwrap_or_else(|| "nats url unknown".into());
    let pid = holder.map_or("unknown".to_string(), |h| h.pid.to_string());
    format!(
        "headcount is already running on {} (pid {pid}, {url}); stop it first \
         (Ctrl-C in its terminal, or `kill {pid}`), or give this one its own --data-dir",
        dir.display()
    )
}

pub(crate) use headcount_app::server::forget_servers;
#[cfg(test)]
use headcount_app::server::record_server;

/// Fails, naming them, if nats-servers on `dir`'s store are still running:
/// the ones in nats.pid that are alive and are nats-servers, and (on Linux)
/// any nats-server whose store is in `dir`.
pub(crate) fn refuse_running_servers(dir: &Path) -> anyhow::Result<()> {
    let running = running_servers(dir);
    if running.is_empty() {
        return Ok(());
    }
    let pids: Vec<String> = running.iter().map(u32::to_string).collect();
    let (noun, them) = if pids.len() == 1 {
        (format!("nats-server (pid {})", pids[0]), "it")
    } else {
        (format!("nats-servers (pids {})", pids.join(", ")), "them")
    };
    bail!(
        "{noun} still running on the store in {}, left behind by a `headcount up` that was killed; \
         stop {them} first (`kill {}`: a server flushes its store and exits), then start `headcount up` again",
        dir.display(),
        pids.join(" ")
    )
}

#[cfg(target_os = "linux")]
fn running_servers(dir: &Path) -> Vec<u32> {
    let Ok(store) = dir.canonicalize() else {
        return Vec::new();
    };
    let recorded: Vec<u32> = std::fs::read_to_string(dir.join(PID_FILE))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let me = std::process::id();
    let mut found = Vec::new();
    // A recorded pid counts unless its store is known to be elsewhere (a
    // reused pid); any other process only if its store is known to be here.
    for &pid in &recorded {
        if pid != me && is_nats_server(pid) && store_of(pid, &store) != Some(false) {
            found.push(pid);
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if pid != me
                && !found.contains(&pid)
                && is_nats_server(pid)
                && store_of(pid, &store) == Some(true)
            {
                found.push(pid);
            }
        }
    }
    found.sort_unstable();
    found
}

#[cfg(not(target_os = "linux"))]
fn running_servers(_dir: &Path) -> Vec<u32> {
    Vec::new()
}

/// The arguments of a live process (a zombie has none worth reading).
#[cfg(target_os = "linux")]
fn cmdline(pid: u32) -> Option<Vec<String>> {
    if !is_alive(pid) {
        return None;
    }
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Whether `pid` runs and is not a zombie (a dead child nobody reaped yet).
#[cfg(target_os = "linux")]
pub(crate) fn is_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last parenthesis.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state != "Z" && state != "X")
}

#[cfg(target_os = "linux")]
fn is_nats_server(pid: u32) -> bool {
    // The program itself, or `setpriv ... -- nats-server` in the instant
    // before it becomes one.
    cmdline(pid).is_some_and(|args| {
        args.iter()
            .take(8)
            .any(|a| Path::new(a).file_name().is_some_and(|n| n == "nats-server"))
    })
}

/// Whether the store (`-sd`) of nats-server `pid` is one of `dir`'s
/// (`dir` canonical; `up` puts its stores right in the data dir: `jetstream`,
/// `jetstream-n1`, ...); `None` when that cannot be told.
#[cfg(target_os = "linux")]
fn store_of(pid: u32, dir: &Path) -> Option<bool> {
    let args = cmdline(pid)?;
    let i = args.iter().position(|a| a == "-sd" || a == "--store_dir")?;
    let sd = PathBuf::from(args.get(i + 1)?);
    let sd = if sd.is_absolute() {
        sd
    } else {
        std::fs::read_link(format!("/proc/{pid}/cwd"))
            .ok()?
            .join(sd)
    };
    // The store itself may be gone; its parent is the data dir.
    let parent = sd.parent()?.canonicalize().ok()?;
    Some(parent == dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused_with_the_holders_note() {
        let root = tempfile::tempdir().expect("temp dir");
        let dir = root.path().join("data");
        let first = DataDirLock::acquire(&dir, "nats://127.0.0.1:4222").expect("first lock");
        let err = DataDirLock::acquire(&dir, "nats://127.0.0.1:5222")
            .expect_err("second lock refused")
            .to_string();
        assert!(err.contains("already running"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(err.contains("nats://127.0.0.1:4222"), "{err}");
        drop(first);
        // Released: the next one gets it.
        let _again = DataDirLock::acquire(&dir, "nats://127.0.0.1:5222").expect("lock again");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn recorded_pids_that_are_no_nats_server_are_ignored() {
        let root = tempfile::tempdir().expect("temp dir");
        // This test process is alive but no nats-server; pid 0 is nobody.
        record_server(root.path(), std::process::id()).expect("record");
        record_server(root.path(), 0).expect("record");
        assert!(running_servers(root.path()).is_empty());
        refuse_running_servers(root.path()).expect("nothing running");
        forget_servers(root.path());
        assert!(!root.path().join(PID_FILE).exists());
    }
}
