//! Secrets and unguessable identifiers, and the files that hold them.
//!
//! Everything random here comes from the operating system's random source
//! (`getrandom`), never from a fast generator such as NUID: NUIDs share a
//! long prefix and count up, so one seen value tells a lot about the next.
//!
//! Files holding secrets are created with mode 0600 from the start (a
//! temporary file in the same directory, renamed over the target), in
//! directories of mode 0700: there is never a moment when another local user
//! could read them.
//!
//! # What is trusted
//!
//! A secret is only as good as the directory it is read from: whoever can
//! put a file there can hand the process a password or a signing key of
//! their choosing. Before anything in a data dir is believed,
//! [`create_private_dir`] / [`check_private_dir`] (directories) and
//! [`read_private`] (files) apply these rules (Unix; elsewhere nothing is
//! checked):
//!
//! - **Owner**: this process's (effective) user or root. Anyone else could
//!   have planted what is in it, and can change its mode back at any time:
//!   refused, whatever the mode. Root-owned is fine: root holds the host
//!   anyway, and it is how Kubernetes mounts a Secret volume (files
//!   `root:<fsGroup>`).
//! - **Not writable by group or others**: refused otherwise (never quietly
//!   tightened: what others could write may already be theirs), unless it
//!   lies on a read-only mount, where nobody can write whatever the mode
//!   says (kubelet gives a Secret volume's directory mode 1777/3777 and
//!   mounts it read-only).
//! - **Not readable by group or others**: a directory or file of this
//!   process's own user that others may read (but not write) is tightened
//!   (0700 by [`create_private_dir`], owner bits only by [`read_private`],
//!   with a warning that the secrets in it may have been read); one owned
//!   by root is root's choice and used as it is (Kubernetes' `defaultMode`
//!   0440 with an `fsGroup`, or 0644), with a warning when every local user
//!   may read the file.
//!
//! A refusal is an [`Untrusted`] error naming the path, its owner and mode,
//! and what to do about it; the caller's start fails with it. Files are
//! checked on the open handle, so the file read is the file checked. The
//! directories above the data dir are not checked.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Every secret [`random_secret`] makes starts with this. The letter keeps
/// nats-server from reading it as a number (it parses the value of a
/// `$VARIABLE` as a configuration value: `3e5...` is refused outright), and
/// the whole prefix tells these secrets from older, guessable ones.
pub const SECRET_PREFIX: &str = "hk_";

/// Random characters after [`SECRET_PREFIX`]: 43 base-62 characters carry
/// 256 bits.
pub const SECRET_CHARS: usize = 43;

/// The alphabet of secrets and ids: letters and digits only, so that a value
/// is safe in a NATS subject token, a URL, a shell word and a nats-server
/// configuration value alike.
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Fills `buf` from the OS random source.
///
/// # Panics
/// When the OS has no random source to offer (no `getrandom(2)`, no
/// `/dev/urandom`): nothing secret can be made then, and going on with a
/// weaker source is exactly what this module is here to prevent.
fn fill(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the operating system's random source failed");
}

/// `len` characters of `[0-9A-Za-z]`, each uniformly random (about 5.95
/// bits each): bytes of 248 and above are dropped so that no character is
/// likelier than another.
pub fn random_alphanumeric(len: usize) -> String {
    const LIMIT: u8 = (ALPHABET.len() * 4) as u8; // 248
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        fill(&mut buf);
        for &b in &buf {
            if out.len() == len {
                break;
            }
            if b < LIMIT {
                out.push(char::from(ALPHABET[usize::from(b) % ALPHABET.len()]));
            }
        }
    }
    out
}

/// A new secret (password, bearer key): [`SECRET_PREFIX`] and 256 random
/// bits as [`SECRET_CHARS`] letters and digits, 46 characters in all.
pub fn random_secret() -> String {
    format!("{SECRET_PREFIX}{}", random_alphanumeric(SECRET_CHARS))
}

/// Whether `secret` looks like one [`random_secret`] made: a value from an
/// older generator (NUID-made ones, guessable from a session id) or one
/// nats-server may misread does not.
pub fn is_random_secret(secret: &str) -> bool {
    secret.strip_prefix(SECRET_PREFIX).is_some_and(|rest| {
        rest.len() == SECRET_CHARS && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// An unguessable identifier of `len` letters and digits (session ids,
/// inbox prefixes). 22 characters carry 130 bits; it is a valid NATS subject
/// token and a valid headcount name.
pub fn random_id(len: usize) -> String {
    random_alphanumeric(len)
}

/// Writes `bytes` to `path` so that only the owner can ever read it: a new
/// temporary file next to `path`, created with mode 0600, written and
/// synced, then renamed over `path` (whatever `path` was before, and
/// whatever its mode, it is replaced whole). A crash leaves either the old
/// file or the new one, never half of one.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", random_alphanumeric(8)));
    let tmp: PathBuf = dir.join(tmp_name);

    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut out = options
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let written = out
        .write_all(bytes)
        .and_then(|()| out.sync_all())
        .with_context(|| format!("writing {}", tmp.display()));
    drop(out);
    let renamed = written.and_then(|()| {
        std::fs::rename(&tmp, path).with_context(|| format!("saving {}", path.display()))
    });
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return renamed;
    }
    // The rename itself survives a crash once the directory is synced.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Creates `dir` (and any missing parent) with mode 0700, checks that it
/// may be trusted with secrets (see the [module docs](self): owned by this
/// process's user or root, not writable by group or others unless on a
/// read-only mount), and tightens it to 0700 when it is this user's and
/// others may read it. A directory that cannot be tightened (root's, a
/// read-only mount such as a Kubernetes secret volume) is used as it is:
/// the files in it are still written 0600.
///
/// # Errors
/// When `dir` cannot be created or read, is not a directory, or may not be
/// trusted: then an [`Untrusted`] error (with nothing done to `dir`) that
/// says why and what to do.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    #[cfg(unix)]
    trust_dir(dir, true)?;
    Ok(())
}

/// Checks that the existing directory `dir` may be trusted with secrets
/// (the rules of [`create_private_dir`]) without changing it.
///
/// # Errors
/// When `dir` cannot be read, is not a directory, or may not be trusted
/// ([`Untrusted`]).
pub fn check_private_dir(dir: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    trust_dir(dir, false)?;
    #[cfg(not(unix))]
    anyhow::ensure!(
        std::fs::metadata(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .is_dir(),
        "{} is not a directory",
        dir.display()
    );
    Ok(())
}

/// The contents of the secret file `path`, or `None` when there is no such
/// file (or no such directory). The directory holding it must pass
/// [`check_private_dir`]; the file, checked on the handle it is read
/// through, must be a regular file owned by this process's user or root and
/// not writable by group or others (unless on a read-only mount). One of
/// this user's own that others may read is tightened to its owner bits,
/// with a warning; a root-owned one others may read is used as it is (a
/// Kubernetes Secret volume), with a warning when every user may read it.
///
/// # Errors
/// When the file cannot be read, or may not be trusted ([`Untrusted`]).
pub fn read_private(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        _ => check_private_dir(dir)?,
    }
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    #[cfg(unix)]
    trust_file(path, &file)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(bytes))
}

/// The effective user id of this process, without `unsafe`: from the `Uid:`
/// line of `/proc/self/status` (real, effective, saved, filesystem), else
/// the owner of a file this process creates (and removes) in the temporary
/// directory. Worked out once.
///
/// # Errors
/// When neither way works (no `/proc`, no writable temporary directory).
#[cfg(unix)]
pub fn current_uid() -> anyhow::Result<u32> {
    static UID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    if let Some(uid) = UID.get() {
        return Ok(*uid);
    }
    let uid = match uid_from_proc() {
        Some(uid) => uid,
        None => uid_from_new_file()?,
    };
    Ok(*UID.get_or_init(|| uid))
}

#[cfg(unix)]
fn uid_from_proc() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let ids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    ids.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(unix)]
fn uid_from_new_file() -> anyhow::Result<u32> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path = std::env::temp_dir().join(format!(".headcount-uid-{}", random_alphanumeric(16)));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {} to learn this process's user", path.display()))?;
    let uid = file.metadata().map(|m| m.uid());
    drop(file);
    let _ = std::fs::remove_file(&path);
    uid.with_context(|| format!("reading {}", path.display()))
}

/// `alice (uid 1000)`, or `uid 1000` when `/etc/passwd` does not name it.
#[cfg(unix)]
fn describe_user(uid: u32) -> String {
    let name = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                let id: u32 = fields.nth(1)?.parse().ok()?;
                (id == uid).then(|| name.to_string())
            })
        });
    match name {
        Some(name) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// What is wrong with an [`Untrusted`] path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// Owned by a user other than this process's and root.
    ForeignOwner,
    /// Writable by its group or by other users, on a writable mount.
    Writable,
}

/// A directory or file that may not be trusted with secrets (see the
/// [module docs](self)); its message names the path, owner and mode and
/// what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untrusted {
    pub path: PathBuf,
    pub is_dir: bool,
    /// The owner's uid.
    pub owner: u32,
    /// The permission bits, with setuid, setgid and sticky.
    pub mode: u32,
    /// This process's effective uid.
    pub uid: u32,
    pub problem: Problem,
}

#[cfg(unix)]
impl std::fmt::Display for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = self.path.display();
        let (what, fix_mode) = if self.is_dir {
            ("directory", "700")
        } else {
            ("file", "600")
        };
        let owner = describe_user(self.owner);
        let mode = self.mode;
        match self.problem {
            Problem::ForeignOwner => {
                let us = if self.uid == 0 {
                    "root, this process's user".to_string()
                } else {
                    format!(
                        "this process's user, {}, nor by root",
                        describe_user(self.uid)
                    )
                };
                write!(
                    f,
                    "refusing to trust the {what} {path}: it is owned by {owner}, not by {us} \
                     (mode {mode:04o}); that user may have put secrets of their choosing in \
                     it, and can change its mode back at any time. "
                )?;
                if self.is_dir {
                    write!(
                        f,
                        "Use a directory of your own (another --data-dir), or, if this one is \
                         really meant for this user, check what is in it and \
                         `chown -R {} {path}`",
                        self.uid
                    )
                } else {
                    write!(
                        f,
                        "Delete it (or use another --data-dir), or, if its content is really \
                         yours, `chown {} {path}`",
                        self.uid
                    )
                }
            }
            Problem::Writable => {
                let (could, check) = if self.is_dir {
                    ("put files of their choosing in it", "what is in it")
                } else {
                    ("changed the secrets in it", "its content")
                };
                write!(
                    f,
                    "refusing to trust the {what} {path}: it is owned by {owner} and writable \
                     by its group or by other users (mode {mode:04o}), so any of them may have \
                     {could}. Check {check}, then `chmod {fix_mode} {path}`, or use another \
                     --data-dir"
                )
            }
        }
    }
}

#[cfg(not(unix))]
impl std::fmt::Display for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refusing to trust {}", self.path.display())
    }
}

impl std::error::Error for Untrusted {}

/// What the trust rules make of a directory or file with `owner` and
/// `mode`, seen by a process of user `uid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(unix), allow(dead_code))]
enum Verdict {
    /// Use it as it is.
    Trust,
    /// This user's, and others may read it: set this mode, then use it.
    Tighten(u32),
    /// Root's (not this user's), and every user may read it: use it, and
    /// say so.
    TrustReadable,
    /// Writable by group or others: trusted only on a read-only mount, and
    /// then as it is.
    OnlyIfReadOnly,
    Refuse(Problem),
}

#[cfg_attr(not(unix), allow(dead_code))]
fn judge(owner: u32, mode: u32, uid: u32, is_dir: bool) -> Verdict {
    if owner != uid && owner != 0 {
        Verdict::Refuse(Problem::ForeignOwner)
    } else if mode & 0o022 != 0 {
        Verdict::OnlyIfReadOnly
    } else if mode & 0o077 == 0 {
        Verdict::Trust
    } else if owner == uid {
        Verdict::Tighten(if is_dir { 0o700 } else { mode & 0o700 })
    } else if !is_dir && mode & 0o004 != 0 {
        Verdict::TrustReadable
    } else {
        Verdict::Trust
    }
}

/// Whether a chmod failed because the file system is mounted read-only.
/// chmod to the mode a path already has is how to ask: the kernel answers
/// EROFS on a read-only mount before it looks at the owner or the mode, and
/// changes nothing anywhere else.
#[cfg(unix)]
fn read_only(chmod: std::io::Result<()>) -> bool {
    matches!(chmod, Err(e) if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem)
}

#[cfg(unix)]
fn trust_dir(dir: &Path, tighten: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    anyhow::ensure!(meta.is_dir(), "{} is not a directory", dir.display());
    let uid = current_uid()?;
    let (owner, mode) = (meta.uid(), meta.mode() & 0o7777);
    let chmod = |m: u32| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(m));
    let untrusted = |problem| Untrusted {
        path: dir.to_path_buf(),
        is_dir: true,
        owner,
        mode,
        uid,
        problem,
    };
    match judge(owner, mode, uid, true) {
        Verdict::Trust | Verdict::TrustReadable => {}
        Verdict::Refuse(problem) => return Err(untrusted(problem).into()),
        Verdict::OnlyIfReadOnly => {
            if !read_only(chmod(mode)) {
                return Err(untrusted(Problem::Writable).into());
            }
            tracing::debug!(dir = %dir.display(), "read-only directory trusted as it is");
        }
        Verdict::Tighten(_) if !tighten => {}
        Verdict::Tighten(to) => match chmod(to) {
            Ok(()) => {}
            // A read-only mount (keys from a Kubernetes secret) is the
            // operator's choice, not an accident worth a warning each start.
            Err(e) if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem => {
                tracing::debug!(dir = %dir.display(), "read-only directory left as it is");
            }
            Err(e) => tracing::warn!(
                dir = %dir.display(),
                mode = format_args!("{:o}", mode & 0o777),
                error = %e,
                "cannot make the directory private (chmod 700 it)"
            ),
        },
    }
    Ok(())
}

#[cfg(unix)]
fn trust_file(path: &Path, file: &std::fs::File) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    anyhow::ensure!(meta.is_file(), "{} is not a regular file", path.display());
    let uid = current_uid()?;
    let (owner, mode) = (meta.uid(), meta.mode() & 0o7777);
    let chmod = |m: u32| file.set_permissions(std::fs::Permissions::from_mode(m));
    let untrusted = |problem| Untrusted {
        path: path.to_path_buf(),
        is_dir: false,
        owner,
        mode,
        uid,
        problem,
    };
    let world_readable = || {
        tracing::warn!(
            file = %path.display(),
            owner = %describe_user(owner),
            mode = format_args!("{:o}", mode & 0o777),
            "secret file is readable by every local user (for a Kubernetes Secret volume, \
             set defaultMode 0440 with an fsGroup)"
        );
    };
    match judge(owner, mode, uid, false) {
        Verdict::Trust => {}
        Verdict::TrustReadable => world_readable(),
        Verdict::Refuse(problem) => return Err(untrusted(problem).into()),
        Verdict::OnlyIfReadOnly => {
            if !read_only(chmod(mode)) {
                return Err(untrusted(Problem::Writable).into());
            }
            if mode & 0o004 != 0 {
                world_readable();
            }
        }
        Verdict::Tighten(to) => match chmod(to) {
            Ok(()) => tracing::warn!(
                file = %path.display(),
                mode = format_args!("{:o}", mode & 0o777),
                now = format_args!("{to:o}"),
                "secret file was readable by other users and is now private; the secrets in it \
                 may have been read: replace them if that matters"
            ),
            Err(e) if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem => {
                if mode & 0o004 != 0 {
                    world_readable();
                }
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "{} is readable by other users (mode {:04o}) and cannot be made \
                         private; chmod 600 it",
                        path.display(),
                        mode
                    )
                });
            }
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn secrets_are_prefixed_long_and_recognised() {
        for _ in 0..1000 {
            let s = random_secret();
            assert!(s.starts_with(SECRET_PREFIX), "{s}");
            assert_eq!(s.len(), SECRET_PREFIX.len() + SECRET_CHARS);
            assert!(is_random_secret(&s), "{s}");
            // A letter first: nats-server reads it as a string.
            assert!(s.starts_with(|c: char| c.is_ascii_alphabetic()));
        }
        // 43 base-62 characters: at least 128 bits (256, in fact).
        assert!(SECRET_CHARS as f64 * 62f64.log2() >= 256.0 - 1e-9);
    }

    #[test]
    fn older_and_foreign_secrets_are_not_recognised() {
        let nuid_made = format!("hc{}{}", "A".repeat(22), "B".repeat(22));
        for old in [
            nuid_made.as_str(),
            "3e5Old",
            "hk_short",
            "",
            "hk_",
            &format!("hk_{}", "-".repeat(SECRET_CHARS)),
            &format!("hk_{}x", "a".repeat(SECRET_CHARS)),
            &format!("HK_{}", "a".repeat(SECRET_CHARS)),
        ] {
            assert!(!is_random_secret(old), "{old:?}");
        }
    }

    #[test]
    fn secrets_and_ids_are_unique_and_share_no_prefix() {
        let secrets: HashSet<String> = (0..10_000).map(|_| random_secret()).collect();
        assert_eq!(secrets.len(), 10_000);
        let ids: Vec<String> = (0..10_000).map(|_| random_id(22)).collect();
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());
        // NUIDs made one after the other share 12 characters; these share
        // about as many as chance gives (8 characters: 1 in 2^47).
        for pair in ids.windows(2) {
            let common = pair[0]
                .bytes()
                .zip(pair[1].bytes())
                .take_while(|(a, b)| a == b)
                .count();
            assert!(common < 8, "{pair:?}");
        }
    }

    #[test]
    fn ids_have_the_asked_length_and_alphabet_and_every_character_occurs() {
        for len in [0, 1, 22, 64, 200] {
            let id = random_id(len);
            assert_eq!(id.len(), len);
            assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()));
        }
        // Over 62,000 characters each of the 62 shows up, about evenly.
        let text = random_alphanumeric(62_000);
        let mut counts = [0usize; 256];
        for b in text.bytes() {
            counts[usize::from(b)] += 1;
        }
        for &c in ALPHABET {
            let n = counts[usize::from(c)];
            assert!((700..1300).contains(&n), "{} occurs {n} times", c as char);
        }
    }

    #[test]
    fn written_files_are_private_and_replace_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.json");
        // An older copy readable by everyone is replaced, not reused.
        std::fs::write(&path, b"old").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        write_private(&path, b"new secret").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new secret");
        #[cfg(unix)]
        assert_eq!(mode(&path), 0o600);
        write_private(&dir.path().join("fresh"), b"x").unwrap();
        #[cfg(unix)]
        assert_eq!(mode(&dir.path().join("fresh")), 0o600);
        // No temporary file is left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // A directory that is not there is an error, not a panic.
        assert!(write_private(&dir.path().join("missing/file"), b"x").is_err());
    }

    #[test]
    fn private_dirs_are_created_and_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a").join("b");
        create_private_dir(&nested).unwrap();
        assert!(nested.is_dir());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(mode(&nested), 0o700);
            assert_eq!(mode(&dir.path().join("a")), 0o700);
            let open = dir.path().join("open");
            std::fs::create_dir(&open).unwrap();
            std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
            create_private_dir(&open).unwrap();
            assert_eq!(mode(&open), 0o700);
        }
        // Again: nothing to do, no error.
        create_private_dir(&nested).unwrap();
    }

    /// `path` chowned to `nobody` (65534), or `false` when this process may
    /// not do that (not root): the test has nothing to check then.
    #[cfg(unix)]
    fn give_to_nobody(path: &Path) -> bool {
        match std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                eprintln!("skipped: chown needs root ({e})");
                false
            }
            Err(e) => panic!("chown {}: {e}", path.display()),
        }
    }

    #[cfg(unix)]
    const NOBODY: u32 = 65534;

    /// A file `name` written private with `contents` in a fresh temporary
    /// directory, which lives as long as the first value.
    #[cfg(unix)]
    fn private_file(name: &str, contents: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        write_private(&path, contents).unwrap();
        (dir, path)
    }

    /// A directory `name` in a fresh temporary one, made as anyone could
    /// have made it (the umask's mode), holding a secrets.json with
    /// `contents`: the temporary directory, that directory and the file.
    #[cfg(unix)]
    fn planted_dir(name: &str, contents: &[u8]) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let file = dir.join("secrets.json");
        std::fs::write(&file, contents).unwrap();
        (root, dir, file)
    }

    #[cfg(unix)]
    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[cfg(unix)]
    fn untrusted(err: &anyhow::Error) -> &Untrusted {
        err.downcast_ref::<Untrusted>()
            .unwrap_or_else(|| panic!("not an Untrusted error: {err:#}"))
    }

    #[test]
    fn the_rules_for_owner_and_mode() {
        let (me, other) = (1000, 1001);
        for is_dir in [false, true] {
            // Someone else's: refused whatever the mode.
            for mode in [0o600, 0o700, 0o400, 0o777] {
                assert_eq!(
                    judge(other, mode, me, is_dir),
                    Verdict::Refuse(Problem::ForeignOwner)
                );
            }
            // Writable by group or others: only on a read-only mount,
            // whoever owns it (a Kubernetes Secret volume's dir is 1777).
            for (owner, mode) in [
                (me, 0o620),
                (me, 0o602),
                (0, 0o1777),
                (0, 0o3777),
                (me, 0o777),
            ] {
                assert_eq!(judge(owner, mode, me, is_dir), Verdict::OnlyIfReadOnly);
            }
            // Private: trusted as it is, ours or root's.
            for (owner, mode) in [
                (me, 0o600),
                (me, 0o400),
                (me, 0o700),
                (0, 0o600),
                (0, 0o400),
            ] {
                assert_eq!(judge(owner, mode, me, is_dir), Verdict::Trust);
            }
            // Root's and readable by group only (defaultMode 0440, fsGroup):
            // trusted as it is.
            assert_eq!(judge(0, 0o440, me, is_dir), Verdict::Trust);
        }
        // Ours and readable by others: tightened.
        assert_eq!(judge(me, 0o644, me, false), Verdict::Tighten(0o600));
        assert_eq!(judge(me, 0o444, me, false), Verdict::Tighten(0o400));
        assert_eq!(judge(me, 0o755, me, true), Verdict::Tighten(0o700));
        // Root's (not ours) and readable by everyone: used, with a warning.
        assert_eq!(judge(0, 0o644, me, false), Verdict::TrustReadable);
        assert_eq!(judge(0, 0o444, me, false), Verdict::TrustReadable);
        assert_eq!(judge(0, 0o755, me, true), Verdict::Trust);
        // Running as root: root's files are ours.
        assert_eq!(judge(0, 0o644, 0, false), Verdict::Tighten(0o600));
        assert_eq!(judge(0, 0o600, 0, false), Verdict::Trust);
        assert_eq!(
            judge(me, 0o600, 0, false),
            Verdict::Refuse(Problem::ForeignOwner)
        );
    }

    #[cfg(unix)]
    #[test]
    fn the_current_uid_is_the_owner_of_what_this_process_creates() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mine");
        std::fs::write(&path, b"x").unwrap();
        let uid = current_uid().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().uid(), uid);
        assert_eq!(uid_from_new_file().unwrap(), uid);
        assert_eq!(std::fs::metadata("/proc/self").unwrap().uid(), uid);
    }

    #[cfg(unix)]
    #[test]
    fn private_files_are_read_and_missing_ones_are_none() {
        let (dir, path) = private_file("secret", b"hk_value");
        assert_eq!(read_private(&path).unwrap().unwrap(), b"hk_value");
        assert!(read_private(&dir.path().join("absent")).unwrap().is_none());
        assert!(
            read_private(&dir.path().join("no-dir/absent"))
                .unwrap()
                .is_none()
        );
        // Not a regular file: an error, not a read.
        std::fs::create_dir(dir.path().join("a-dir")).unwrap();
        assert!(read_private(&dir.path().join("a-dir")).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn a_file_writable_by_others_is_refused() {
        let (_dir, path) = private_file("secrets.json", b"{}");
        for bad in [0o666, 0o622, 0o602, 0o620] {
            set_mode(&path, bad);
            let err = read_private(&path).unwrap_err();
            let u = untrusted(&err);
            assert_eq!(u.problem, Problem::Writable);
            assert_eq!(u.mode, bad);
            let text = format!("{err:#}");
            for part in [
                path.display().to_string(),
                format!("{bad:04o}"),
                "writable".into(),
                "chmod 600".into(),
            ] {
                assert!(text.contains(&part), "{part:?} not in {text}");
            }
            // Refused, not quietly fixed.
            assert_eq!(mode(&path), bad);
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_file_of_ours_readable_by_others_is_tightened() {
        let (_dir, path) = private_file("key.json", b"seed");
        set_mode(&path, 0o644);
        assert_eq!(read_private(&path).unwrap().unwrap(), b"seed");
        assert_eq!(mode(&path), 0o600);
        set_mode(&path, 0o440);
        assert_eq!(read_private(&path).unwrap().unwrap(), b"seed");
        assert_eq!(mode(&path), 0o400);
    }

    #[cfg(unix)]
    #[test]
    fn a_root_owned_0644_file_is_accepted_when_running_as_root() {
        if current_uid().unwrap() != 0 {
            eprintln!("skipped: not running as root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.json");
        std::fs::write(&path, b"mounted").unwrap();
        set_mode(&path, 0o644);
        assert_eq!(read_private(&path).unwrap().unwrap(), b"mounted");
        // And a root-owned 0755 directory is root's (ours) to tighten.
        set_mode(dir.path(), 0o755);
        create_private_dir(dir.path()).unwrap();
        assert_eq!(mode(dir.path()), 0o700);
    }

    #[cfg(unix)]
    #[test]
    fn a_dir_writable_by_others_is_refused_not_taken_over() {
        let (_root, dir, file) = planted_dir("shared", b"planted");
        set_mode(&file, 0o600);
        // Ours, but anyone could have put files in it: tightening it now
        // would hide that, so it is refused as it is.
        for bad in [0o777, 0o1777, 0o770, 0o702] {
            set_mode(&dir, bad);
            let err = create_private_dir(&dir).unwrap_err();
            let u = untrusted(&err);
            assert_eq!((u.problem, u.is_dir), (Problem::Writable, true));
            let text = format!("{err:#}");
            assert!(text.contains(&dir.display().to_string()), "{text}");
            assert!(text.contains("chmod 700"), "{text}");
            assert!(text.contains(&format!("{bad:04o}")), "{text}");
            assert_eq!(mode(&dir), bad & 0o777);
            assert!(check_private_dir(&dir).is_err());
            // Nor is a file in it read.
            assert_eq!(untrusted(&read_private(&file).unwrap_err()).path, dir);
        }
        // Once the owner has looked and said so: private again.
        set_mode(&dir, 0o700);
        create_private_dir(&dir).unwrap();
        assert_eq!(read_private(&file).unwrap().unwrap(), b"planted");
    }

    #[cfg(unix)]
    #[test]
    fn a_dir_or_file_of_another_user_is_refused() {
        use std::os::unix::fs::MetadataExt;
        // A /tmp/evil made by nobody, mode 777, holding known secrets; and
        // the same made private, which nobody can undo.
        let (root, evil, planted) = planted_dir("evil", b"{\"operator_key\":\"hk_known\"}");
        if !give_to_nobody(&evil) || !give_to_nobody(&planted) {
            return;
        }
        for dir_mode in [0o777, 0o700, 0o755] {
            set_mode(&evil, dir_mode);
            let err = create_private_dir(&evil).unwrap_err();
            let u = untrusted(&err);
            assert_eq!(
                (u.problem, u.owner, u.is_dir),
                (Problem::ForeignOwner, NOBODY, true)
            );
            let text = format!("{err:#}");
            for part in [
                evil.display().to_string(),
                "owned by".into(),
                "uid 65534".into(),
                format!("{dir_mode:04o}"),
                "chown".into(),
                "--data-dir".into(),
            ] {
                assert!(text.contains(&part), "{part:?} not in {text}");
            }
            // Nothing was done to it: same mode, same owner.
            assert_eq!(mode(&evil), dir_mode);
            assert_eq!(std::fs::metadata(&evil).unwrap().uid(), NOBODY);
            assert!(check_private_dir(&evil).is_err());
            assert!(read_private(&planted).is_err());
        }
        // A file of nobody's in a directory of ours: refused too, even 0600.
        let ours = root.path().join("ours");
        create_private_dir(&ours).unwrap();
        let file = ours.join("callout-issuer.nk");
        write_private(&file, b"SAplanted").unwrap();
        assert!(give_to_nobody(&file));
        let err = read_private(&file).unwrap_err();
        let u = untrusted(&err);
        assert_eq!(
            (u.problem, u.owner, u.is_dir),
            (Problem::ForeignOwner, NOBODY, false)
        );
        assert!(format!("{err:#}").contains("uid 65534"), "{err:#}");
    }
}
