//! Signing keys: Ed25519 key pairs kept as `<data_dir>/keys/<kid>.json`.
//!
//! Every key found there is loaded at start and verifies tokens; the newest
//! signs. Rotation is therefore "write a newer key file and restart": tokens
//! signed by the old key keep verifying until its file is removed, which an
//! operator does once the longest-lived of them has expired.
//!
//! A key file holds the 32-byte seed, so it is written with mode 0600 in a
//! directory of mode 0700 and never logged. Whoever can write a key file
//! can sign tokens, so the directory and every key file in it must pass the
//! checks of [`headcount_runtime::secret`] (owned by this user or root, not
//! writable by others) before a key is loaded; the start fails otherwise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use headcount_protocol::{UnixMillis, now_millis};
/// Key files are written 0600 from the start, in a 0700 directory, and read
/// only from a directory and files no other user could have written.
pub(crate) use headcount_runtime::secret::{create_private_dir, read_private, write_private};
use jsonwebtoken::{DecodingKey, EncodingKey};
use serde::{Deserialize, Serialize};

/// Environment variable that may hold a base64 Ed25519 seed (32 bytes).
///
/// When set (and not empty), that key signs every token instead of a
/// generated one, which lets several vendor instances share one key without
/// sharing a data directory. It is never written to disk: the operator who
/// put it in the environment owns it. Keys found in `<data_dir>/keys/` are
/// still loaded and still verify.
pub const SIGNING_KEY_ENV: &str = "HEADCOUNT_SIGNING_KEY";

/// The directory holding the key files, under the data directory.
pub(crate) fn key_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("keys")
}

/// A key file as stored on disk.
#[derive(Serialize, Deserialize)]
struct KeyFile {
    kid: String,
    /// The Ed25519 seed, standard base64 with padding.
    seed: String,
    /// When the key was made, Unix milliseconds; the newest key signs.
    created_at: UnixMillis,
}

/// One key pair, ready to sign and verify.
pub(crate) struct KeyPair {
    pub kid: String,
    pub created_at: UnixMillis,
    pub public: [u8; 32],
    pub encoding: EncodingKey,
    pub decoding: DecodingKey,
    seed: [u8; 32],
}

impl KeyPair {
    pub fn from_seed(seed: [u8; 32], created_at: UnixMillis) -> anyhow::Result<Self> {
        let signing = SigningKey::from_bytes(&seed);
        let public = signing.verifying_key().to_bytes();
        let der = signing
            .to_pkcs8_der()
            .context("encoding the signing key as pkcs#8")?;
        Ok(Self {
            kid: kid_of(&public),
            created_at,
            public,
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            decoding: DecodingKey::from_ed_der(&public),
            seed,
        })
    }

    /// A fresh key from the operating system's random source.
    pub fn generate() -> anyhow::Result<Self> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)
            .map_err(|e| anyhow::anyhow!("reading random bytes for a signing key: {e}"))?;
        Self::from_seed(seed, now_millis())
    }
}

/// The key id: the first 8 bytes of the public key, base64url without
/// padding (11 characters). Stable for a key, safe in a file name, and short
/// enough for every token header.
pub(crate) fn kid_of(public: &[u8; 32]) -> String {
    URL_SAFE_NO_PAD.encode(&public[..8])
}

/// Every key the vendor knows, and which of them signs.
pub(crate) struct KeyRing {
    keys: BTreeMap<String, Arc<KeyPair>>,
    signer: Arc<KeyPair>,
}

impl KeyRing {
    /// `signer` names the key that signs; without it the newest does.
    fn new(keys: Vec<KeyPair>, signer: Option<&str>) -> anyhow::Result<Self> {
        let keys: BTreeMap<String, Arc<KeyPair>> = keys
            .into_iter()
            .map(|k| (k.kid.clone(), Arc::new(k)))
            .collect();
        let signer = match signer {
            Some(kid) => keys
                .get(kid)
                .with_context(|| format!("signing key {kid} is not loaded"))?,
            None => keys
                .values()
                .max_by(|a, b| (a.created_at, &a.kid).cmp(&(b.created_at, &b.kid)))
                .context("no signing key")?,
        }
        .clone();
        Ok(Self { keys, signer })
    }

    pub fn signer(&self) -> &KeyPair {
        &self.signer
    }

    pub fn get(&self, kid: &str) -> Option<&KeyPair> {
        self.keys.get(kid).map(|k| &**k)
    }

    /// The signing key first, then the others from newest to oldest.
    pub fn by_age(&self) -> Vec<&KeyPair> {
        let mut keys: Vec<&KeyPair> = self.keys.values().map(|k| &**k).collect();
        let rank = |k: &KeyPair| (k.kid == self.signer.kid, k.created_at, k.kid.clone());
        keys.sort_by_key(|k| std::cmp::Reverse(rank(k)));
        keys
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// This ring with `key` added as the signer, less the keys that stopped
    /// signing more than `keep` ago (every token they signed has expired by
    /// then). Returns the new ring and the kids it dropped.
    pub fn rotated(
        &self,
        key: KeyPair,
        keep: std::time::Duration,
        now: UnixMillis,
    ) -> (KeyRing, Vec<String>) {
        let key = Arc::new(key);
        let mut by_age: Vec<Arc<KeyPair>> = self.keys.values().cloned().collect();
        by_age.sort_by_key(|k| (k.created_at, k.kid.clone()));
        let keep_ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
        let mut keys = BTreeMap::new();
        let mut dropped = Vec::new();
        for (i, k) in by_age.iter().enumerate() {
            // A key stopped signing when the next newer one appeared (or now,
            // for the key being replaced).
            let retired_at = by_age.get(i + 1).map_or(now, |next| next.created_at);
            if k.kid != self.signer.kid && now.saturating_sub(retired_at) > keep_ms {
                dropped.push(k.kid.clone());
            } else {
                keys.insert(k.kid.clone(), k.clone());
            }
        }
        keys.insert(key.kid.clone(), key.clone());
        (KeyRing { keys, signer: key }, dropped)
    }
}

/// Loads every key of `<data_dir>/keys/`, generating and saving one when
/// there is none and no `env_seed` was given.
pub(crate) fn open(data_dir: &Path, env_seed: Option<[u8; 32]>) -> anyhow::Result<KeyRing> {
    let dir = key_dir(data_dir);
    create_private_dir(&dir)?;
    let mut keys = load_dir(&dir)?;
    match env_seed {
        Some(seed) => {
            let key = KeyPair::from_seed(seed, now_millis())?;
            let kid = key.kid.clone();
            tracing::info!(kid = %kid, "signing with the key from {SIGNING_KEY_ENV}");
            if !keys.iter().any(|k| k.kid == kid) {
                keys.push(key);
            }
            KeyRing::new(keys, Some(&kid))
        }
        None if keys.is_empty() => {
            let key = KeyPair::generate()?;
            save(&dir, &key)?;
            tracing::info!(kid = %key.kid, dir = %dir.display(), "generated a new signing key");
            KeyRing::new(vec![key], None)
        }
        None => KeyRing::new(keys, None),
    }
}

/// Reads every `*.json` key file of `dir`. A file that cannot be read, may
/// not be trusted ([`read_private`]: another user's, or writable by others)
/// or does not hold a valid key stops the start: skipping it would silently
/// turn every token it signed into an unknown-key error.
fn load_dir(dir: &Path) -> anyhow::Result<Vec<KeyPair>> {
    let mut keys = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("listing key dir {}", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("listing key dir {}", dir.display()))?
            .path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let key =
            load_file(&path).with_context(|| format!("loading key file {}", path.display()))?;
        keys.push(key);
    }
    Ok(keys)
}

fn load_file(path: &Path) -> anyhow::Result<KeyPair> {
    let bytes = read_private(path)?.context("the file is gone")?;
    let file: KeyFile = serde_json::from_slice(&bytes).context("parsing key file")?;
    let seed = decode_seed(&file.seed).context("reading the seed")?;
    let key = KeyPair::from_seed(seed, file.created_at)?;
    anyhow::ensure!(
        key.kid == file.kid,
        "key file says kid {} but its seed gives kid {}",
        file.kid,
        key.kid
    );
    Ok(key)
}

/// Writes `<dir>/<kid>.json` with mode 0600, through a temporary file so that
/// a crash never leaves half a key behind.
pub(crate) fn save(dir: &Path, key: &KeyPair) -> anyhow::Result<()> {
    let file = KeyFile {
        kid: key.kid.clone(),
        seed: STANDARD.encode(key.seed),
        created_at: key.created_at,
    };
    let json = serde_json::to_vec_pretty(&file).context("encoding key file")?;
    write_private(&dir.join(format!("{}.json", key.kid)), &json)
}

/// Decodes a base64 seed in any of the usual alphabets, padded or not.
pub(crate) fn decode_seed(text: &str) -> anyhow::Result<[u8; 32]> {
    let text = text.trim();
    let bytes = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
        .context("the seed is not valid base64")?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| anyhow::anyhow!("the seed must be 32 bytes, got {}", bytes.len()))
}

/// The seed in [`SIGNING_KEY_ENV`], if set.
pub(crate) fn seed_from_env() -> anyhow::Result<Option<[u8; 32]>> {
    match std::env::var(SIGNING_KEY_ENV) {
        Ok(text) if text.trim().is_empty() => Ok(None),
        Ok(text) => decode_seed(&text)
            .map(Some)
            .with_context(|| format!("reading {SIGNING_KEY_ENV}")),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("{SIGNING_KEY_ENV} is not valid unicode")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kid_is_stable_and_file_safe() {
        let key = KeyPair::from_seed([7; 32], 1).unwrap();
        let again = KeyPair::from_seed([7; 32], 2).unwrap();
        assert_eq!(key.kid, again.kid);
        assert_eq!(key.kid.len(), 11);
        assert!(headcount_protocol::SessionId::parse(&key.kid).is_ok());
        assert_ne!(key.kid, KeyPair::from_seed([8; 32], 1).unwrap().kid);
    }

    #[test]
    fn seeds_decode_in_every_alphabet() {
        let seed = [0xfb; 32];
        for engine in [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD] {
            assert_eq!(decode_seed(&engine.encode(seed)).unwrap(), seed);
        }
        assert!(decode_seed("not base64!").is_err());
        assert!(decode_seed(&STANDARD.encode([1u8; 16])).is_err());
    }

    #[test]
    fn saved_key_files_are_private_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let ring = open(dir.path(), None).unwrap();
        let kid = ring.signer().kid.clone();
        let path = key_dir(dir.path()).join(format!("{kid}.json"));
        let file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(file["kid"], kid.as_str());
        assert!(file["seed"].is_string());
        assert!(file["created_at"].is_u64());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let dir_mode = std::fs::metadata(key_dir(dir.path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(dir_mode & 0o777, 0o700);
        }
        let again = open(dir.path(), None).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again.signer().kid, kid);
    }

    #[test]
    fn newest_key_signs_and_all_verify() {
        let dir = tempfile::tempdir().unwrap();
        let keys = key_dir(dir.path());
        create_private_dir(&keys).unwrap();
        let old = KeyPair::from_seed([1; 32], 1_000).unwrap();
        let new = KeyPair::from_seed([2; 32], 2_000).unwrap();
        save(&keys, &old).unwrap();
        save(&keys, &new).unwrap();
        let ring = open(dir.path(), None).unwrap();
        assert_eq!(ring.len(), 2);
        assert_eq!(ring.signer().kid, new.kid);
        assert!(ring.get(&old.kid).is_some());
        let order: Vec<&str> = ring.by_age().iter().map(|k| k.kid.as_str()).collect();
        assert_eq!(order, [new.kid.as_str(), old.kid.as_str()]);
    }

    #[test]
    fn env_key_signs_and_is_not_saved() {
        let dir = tempfile::tempdir().unwrap();
        let ring = open(dir.path(), Some([9; 32])).unwrap();
        assert_eq!(
            ring.signer().kid,
            KeyPair::from_seed([9; 32], 0).unwrap().kid
        );
        let files = std::fs::read_dir(key_dir(dir.path())).unwrap().count();
        assert_eq!(files, 0);
    }

    #[test]
    fn a_corrupt_key_file_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let keys = key_dir(dir.path());
        create_private_dir(&keys).unwrap();
        std::fs::write(keys.join("broken.json"), b"{\"kid\":\"x\"}").unwrap();
        assert!(open(dir.path(), None).is_err());
        let key = KeyPair::from_seed([3; 32], 5).unwrap();
        let lying = serde_json::json!({"kid": "someoneelse", "seed": STANDARD.encode([3u8; 32]), "created_at": 5});
        std::fs::write(keys.join("broken.json"), lying.to_string()).unwrap();
        let err = open(dir.path(), None).err().unwrap();
        assert!(format!("{err:#}").contains(&key.kid));
    }

    #[cfg(unix)]
    #[test]
    fn key_files_another_user_could_have_written_stop_the_start() {
        use std::os::unix::fs::PermissionsExt;
        let set_mode = |path: &Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        let dir = tempfile::tempdir().unwrap();
        let keys = key_dir(dir.path());
        create_private_dir(&keys).unwrap();
        let planted = KeyPair::from_seed([4; 32], 9).unwrap();
        save(&keys, &planted).unwrap();
        let path = keys.join(format!("{}.json", planted.kid));

        // Writable by others: refused (not merely warned about).
        set_mode(&path, 0o666);
        let err = format!("{:#}", open(dir.path(), None).err().unwrap());
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("writable") && err.contains("0666"), "{err}");
        // The keys dir writable by others: refused as well.
        set_mode(&path, 0o600);
        set_mode(&keys, 0o777);
        let err = format!("{:#}", open(dir.path(), None).err().unwrap());
        assert!(err.contains("writable") && err.contains("0777"), "{err}");
        set_mode(&keys, 0o700);
        // Ours and only readable by others: used, and made private.
        set_mode(&path, 0o644);
        assert_eq!(open(dir.path(), None).unwrap().signer().kid, planted.kid);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // Another user's key file (needs root to make one): refused.
        let nobody = 65534;
        match std::os::unix::fs::chown(&path, Some(nobody), Some(nobody)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                eprintln!("skipped the other-user part: chown needs root");
                return;
            }
            Err(e) => panic!("{e}"),
        }
        let err = format!("{:#}", open(dir.path(), None).err().unwrap());
        assert!(err.contains("uid 65534"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        // Another user's keys dir: refused before any file in it is read.
        let me = headcount_runtime::secret::current_uid().unwrap();
        std::os::unix::fs::chown(&path, Some(me), None).unwrap();
        std::os::unix::fs::chown(&keys, Some(nobody), Some(nobody)).unwrap();
        let err = format!("{:#}", open(dir.path(), None).err().unwrap());
        assert!(err.contains("uid 65534"), "{err}");
        assert!(err.contains(&keys.display().to_string()), "{err}");
        assert_eq!(
            std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
}
