//! The keyring directory: where master-key generations live, outside the data directory.
//!
//! One file per generation, `master-<generation>.key`, mode 0600 in a 0700 directory, holding
//! the key as hex. Only the current generation is meant to exist; a second one appears only
//! for a moment during a rotation. `PDLEDGER_MASTER_KEY=<generation>:<64 hex digits>` replaces
//! the directory (for deployments that inject secrets through the environment).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::crypto::{MasterKey, KEY_LEN};
use crate::record::{hex, unhex};

pub const ENV_MASTER_KEY: &str = "PDLEDGER_MASTER_KEY";

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("keyring {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("keyring file {0} is damaged (expected 64 hex digits)")]
    Damaged(PathBuf),
    #[error("{ENV_MASTER_KEY} must be <generation>:<64 hex digits>")]
    BadEnv,
    #[error("keyring {0} is inside the data directory: keep it beside the data, never inside it")]
    InsideData(PathBuf),
    #[error("keyring {path} is readable by others (mode {mode:o}); run: chmod 700 {path} && chmod 600 {path}/*.key")]
    Permissions { path: PathBuf, mode: u32 },
    #[error(transparent)]
    Crypto(#[from] crate::crypto::CryptoError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyringError + '_ {
    move |source| KeyringError::Io { path: path.to_owned(), source }
}

/// Where master keys come from.
#[derive(Clone, Debug)]
pub enum Keyring {
    Dir(PathBuf),
    /// From `PDLEDGER_MASTER_KEY`: one fixed generation, cannot be rotated in place.
    Env(String),
}

impl Keyring {
    /// The environment wins over the directory when set.
    pub fn from_env_or_dir(dir: &Path) -> Keyring {
        match std::env::var(ENV_MASTER_KEY) {
            Ok(v) if !v.is_empty() => Keyring::Env(v),
            _ => Keyring::Dir(dir.to_owned()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Keyring::Dir(d) => d.display().to_string(),
            Keyring::Env(_) => format!("${ENV_MASTER_KEY}"),
        }
    }

    /// Refuses a keyring directory inside the data directory.
    pub fn check_outside(&self, data: &Path) -> Result<(), KeyringError> {
        if let Keyring::Dir(dir) = self {
            let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
            let (k, d) = (abs(dir), abs(data));
            if k.starts_with(&d) {
                return Err(KeyringError::InsideData(dir.clone()));
            }
        }
        Ok(())
    }

    /// The generations present, lowest first.
    pub fn generations(&self) -> Result<Vec<u32>, KeyringError> {
        match self {
            Keyring::Env(v) => Ok(vec![parse_env(v)?.generation()]),
            Keyring::Dir(dir) => {
                let entries = match fs::read_dir(dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
                    Err(e) => return Err(io(dir)(e)),
                };
                let mut gens = vec![];
                for entry in entries {
                    let name = entry.map_err(io(dir))?.file_name();
                    let name = name.to_string_lossy();
                    if let Some(g) = name
                        .strip_prefix("master-")
                        .and_then(|s| s.strip_suffix(".key"))
                        .and_then(|s| s.parse::<u32>().ok())
                    {
                        gens.push(g);
                    }
                }
                gens.sort_unstable();
                Ok(gens)
            }
        }
    }

    pub fn load(&self, generation: u32) -> Result<MasterKey, KeyringError> {
        match self {
            Keyring::Env(v) => {
                let key = parse_env(v)?;
                if key.generation() != generation {
                    return Err(KeyringError::BadEnv);
                }
                Ok(key)
            }
            Keyring::Dir(dir) => {
                let meta = fs::metadata(dir).map_err(io(dir))?;
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(KeyringError::Permissions { path: dir.clone(), mode });
                }
                let path = file(dir, generation);
                let text = Zeroizing::new(fs::read_to_string(&path).map_err(io(&path))?);
                let bytes = Zeroizing::new(unhex(text.trim()).ok_or_else(|| KeyringError::Damaged(path.clone()))?);
                let key: [u8; KEY_LEN] =
                    bytes.as_slice().try_into().map_err(|_| KeyringError::Damaged(path.clone()))?;
                Ok(MasterKey::from_bytes(generation, key))
            }
        }
    }

    /// Writes a new generation durably (temp file, fsync, rename, fsync the directory).
    pub fn store(&self, key: &MasterKey) -> Result<(), KeyringError> {
        let Keyring::Dir(dir) = self else {
            return Err(KeyringError::BadEnv);
        };
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        let path = file(dir, key.generation());
        let tmp = dir.join(format!(".master-{}.tmp", key.generation()));
        {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io(&tmp))?;
            let text = Zeroizing::new(hex(key.expose_for_keyring()) + "\n");
            f.write_all(text.as_bytes()).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(dir)?;
        Ok(())
    }

    /// Destroys one generation: overwrite, fsync, unlink, fsync the directory. (Overwriting
    /// does not defeat a copy-on-write or journaling filesystem; the unlink is what matters
    /// to the ledger, and the operator's escrow copies are theirs to destroy.)
    pub fn destroy(&self, generation: u32) -> Result<(), KeyringError> {
        let Keyring::Dir(dir) = self else {
            return Err(KeyringError::BadEnv);
        };
        let path = file(dir, generation);
        if let Ok(mut f) = fs::OpenOptions::new().write(true).open(&path) {
            let _ = f.write_all(&[0u8; 2 * KEY_LEN + 1]);
            let _ = f.sync_all();
        }
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
        sync_dir(dir)
    }
}

fn file(dir: &Path, generation: u32) -> PathBuf {
    dir.join(format!("master-{generation:06}.key"))
}

fn sync_dir(dir: &Path) -> Result<(), KeyringError> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn parse_env(v: &str) -> Result<MasterKey, KeyringError> {
    let (g, h) = v.split_once(':').ok_or(KeyringError::BadEnv)?;
    let generation = g.trim().parse().map_err(|_| KeyringError::BadEnv)?;
    let bytes = Zeroizing::new(unhex(h.trim()).ok_or(KeyringError::BadEnv)?);
    let key: [u8; KEY_LEN] = bytes.as_slice().try_into().map_err(|_| KeyringError::BadEnv)?;
    Ok(MasterKey::from_bytes(generation, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_load_destroy() {
        let tmp = tempfile::tempdir().unwrap();
        let ring = Keyring::Dir(tmp.path().join("keys"));
        assert_eq!(ring.generations().unwrap(), Vec::<u32>::new());
        let k = MasterKey::generate(1).unwrap();
        ring.store(&k).unwrap();
        let f = tmp.path().join("keys/master-000001.key");
        assert_eq!(fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(tmp.path().join("keys")).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(ring.generations().unwrap(), vec![1]);
        assert_eq!(ring.load(1).unwrap().check_value(), k.check_value());
        ring.destroy(1).unwrap();
        assert_eq!(ring.generations().unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn inside_data_is_refused() {
        let ring = Keyring::Dir("data/keys".into());
        assert!(ring.check_outside(Path::new("data")).is_err());
        assert!(Keyring::Dir("keys".into()).check_outside(Path::new("data")).is_ok());
    }
}
