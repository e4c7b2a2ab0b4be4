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

use std::io::Write;
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

/// Creates `dir` (and any missing parent) with mode 0700, and tightens an
/// existing `dir` to 0700. When an existing directory cannot be tightened
/// (not ours, a read-only mount such as a Kubernetes secret volume) it says
/// so and goes on: the files in it are still written 0600.
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
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0
            && let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        {
            // A read-only mount (keys from a Kubernetes secret) is the
            // operator's choice, not an accident worth a warning each start.
            if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem {
                tracing::debug!(dir = %dir.display(), "read-only directory left as it is");
                return Ok(());
            }
            tracing::warn!(
                dir = %dir.display(),
                mode = format_args!("{:o}", mode & 0o777),
                error = %e,
                "cannot make the directory private (chmod 700 it)"
            );
        }
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
}
