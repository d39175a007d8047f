//! The only module that touches key material.
//!
//! Keys are built only here, never printed (their `Debug` is redacted), and zeroized on drop.
//! Sealing is XChaCha20-Poly1305 with a random 192-bit nonce per call, so there is no nonce
//! bookkeeping to get wrong. Nonces come from the operating system's random source in blocks
//! of 256 per thread (one system call per block instead of one of about 0.4 µs per nonce); a
//! nonce is public and each is handed out once. pdledger never forks (a child it spawns execs
//! at once), which is what would make two processes share a block.
//!
//! Poly1305 runs its portable backend (`--cfg poly1305_force_soft` in `.cargo/config.toml`):
//! measured here, the AVX2 backend's set-up costs about 1.3 µs a message, which made wrapping
//! a key 3.3x and sealing a 512-byte event 2x slower; it only pays off above about 2.5 KB
//! (docs/BENCHMARKS.md, the rotation section).

use chacha20poly1305::aead::{Aead, AeadInPlace, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use uuid::Uuid;
use zeroize::{Zeroize, ZeroizeOnDrop};

pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;
/// Length of a wrapped subject key as stored: master gen ‖ nonce ‖ ciphertext ‖ tag.
pub const WRAPPED_LEN: usize = 4 + NONCE_LEN + KEY_LEN + TAG_LEN;

const KEK_CONTEXT: &str = "pdledger subject key wrapping v1";
const INDEX_CONTEXT: &str = "pdledger blind index v1";
const CHECK_CONTEXT: &str = "pdledger key check v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// Wrong key, wrong associated data, or damaged bytes: AEAD cannot tell which, nor should we.
    #[error("decryption failed: wrong key, moved or damaged ciphertext")]
    Open,
    #[error("wrapped key is damaged (length {0})")]
    WrappedLength(usize),
    #[error("wrapped under master-key generation {found}, the keyring holds generation {current}")]
    Generation { found: u32, current: u32 },
    #[error("the operating system's random source failed")]
    Random,
}

pub fn random_bytes<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|_| CryptoError::Random)?;
    Ok(b)
}

/// Nonces drawn from the OS in blocks, one block per thread, each nonce used once.
const NONCES_PER_BLOCK: usize = 256;

struct NonceBlock {
    used: usize,
    bytes: [u8; NONCE_LEN * NONCES_PER_BLOCK],
}

thread_local! {
    static NONCES: std::cell::RefCell<NonceBlock> = const {
        std::cell::RefCell::new(NonceBlock { used: NONCES_PER_BLOCK, bytes: [0; NONCE_LEN * NONCES_PER_BLOCK] })
    };
}

/// A fresh random nonce.
fn nonce() -> Result<[u8; NONCE_LEN], CryptoError> {
    NONCES.with(|cell| {
        let mut block = cell.borrow_mut();
        if block.used == NONCES_PER_BLOCK {
            getrandom::fill(&mut block.bytes).map_err(|_| CryptoError::Random)?;
            block.used = 0;
        }
        let at = block.used * NONCE_LEN;
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(&block.bytes[at..at + NONCE_LEN]);
        // Handed out: never again, not even to this thread.
        block.bytes[at..at + NONCE_LEN].zeroize();
        block.used += 1;
        Ok(n)
    })
}

/// A generation of the master key. Lives in the keyring, never in the data directory.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct MasterKey {
    #[zeroize(skip)]
    generation: u32,
    key: [u8; KEY_LEN],
    kek: [u8; KEY_LEN],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey(generation {}, redacted)", self.generation)
    }
}

impl MasterKey {
    pub fn from_bytes(generation: u32, key: [u8; KEY_LEN]) -> MasterKey {
        let kek = blake3::derive_key(KEK_CONTEXT, &key);
        MasterKey { generation, key, kek }
    }

    pub fn generate(generation: u32) -> Result<MasterKey, CryptoError> {
        Ok(MasterKey::from_bytes(generation, random_bytes()?))
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The bytes to write to the keyring file. Only `keyring` calls this.
    pub fn expose_for_keyring(&self) -> &[u8; KEY_LEN] {
        &self.key
    }

    /// A value stored in the data directory that tells whether a keyring belongs to it,
    /// without revealing anything about the key.
    pub fn check_value(&self) -> [u8; 32] {
        blake3::derive_key(CHECK_CONTEXT, &self.key)
    }

    /// The key of the blind index (keyed blake3 of normalised lookup values).
    pub fn index_key(&self) -> IndexKey {
        IndexKey(blake3::derive_key(INDEX_CONTEXT, &self.key))
    }

    fn wrap_aad(&self, subject: Uuid, category: u8) -> Vec<u8> {
        let mut aad = Vec::with_capacity(40);
        aad.extend_from_slice(b"pdledger wrap v1");
        aad.extend_from_slice(subject.as_bytes());
        aad.push(category);
        aad.extend_from_slice(&self.generation.to_be_bytes());
        aad
    }

    pub fn wrap(&self, subject: Uuid, category: u8, key: &SubjectKey) -> Result<Vec<u8>, CryptoError> {
        let cipher = XChaCha20Poly1305::new((&self.kek).into());
        let nonce = nonce()?;
        let aad = self.wrap_aad(subject, category);
        let ct = cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: &key.0, aad: &aad })
            .map_err(|_| CryptoError::Open)?;
        let mut out = Vec::with_capacity(WRAPPED_LEN);
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        debug_assert_eq!(out.len(), WRAPPED_LEN);
        Ok(out)
    }

    pub fn unwrap(&self, subject: Uuid, category: u8, wrapped: &[u8]) -> Result<SubjectKey, CryptoError> {
        if wrapped.len() != WRAPPED_LEN {
            return Err(CryptoError::WrappedLength(wrapped.len()));
        }
        let found = u32::from_be_bytes(wrapped[..4].try_into().expect("4 bytes"));
        if found != self.generation {
            return Err(CryptoError::Generation { found, current: self.generation });
        }
        let cipher = XChaCha20Poly1305::new((&self.kek).into());
        let aad = self.wrap_aad(subject, category);
        let mut plain = cipher
            .decrypt(
                XNonce::from_slice(&wrapped[4..4 + NONCE_LEN]),
                Payload { msg: &wrapped[4 + NONCE_LEN..], aad: &aad },
            )
            .map_err(|_| CryptoError::Open)?;
        let mut key = [0u8; KEY_LEN];
        key.copy_from_slice(&plain);
        plain.zeroize();
        Ok(SubjectKey(key))
    }
}

/// A subject's data key for one data category. Only ever stored wrapped.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SubjectKey([u8; KEY_LEN]);

impl std::fmt::Debug for SubjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SubjectKey(redacted)")
    }
}

impl SubjectKey {
    pub fn generate() -> Result<SubjectKey, CryptoError> {
        Ok(SubjectKey(random_bytes()?))
    }

    /// Seals `plaintext` under this key with a fresh random nonce.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<([u8; NONCE_LEN], Vec<u8>), CryptoError> {
        let nonce = nonce()?;
        let ct = XChaCha20Poly1305::new((&self.0).into())
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plaintext, aad })
            .map_err(|_| CryptoError::Open)?;
        Ok((nonce, ct))
    }

    /// As `seal`, appending nonce ‖ ciphertext to `out` and encrypting there: the plaintext is
    /// copied once, into `out`, where it is overwritten by its ciphertext (`seal` copies it
    /// into a buffer of its own, which its caller then copies behind the nonce).
    pub fn seal_to(&self, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        let nonce = nonce()?;
        out.reserve(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(plaintext);
        match XChaCha20Poly1305::new((&self.0).into()).encrypt_in_place_detached(
            XNonce::from_slice(&nonce),
            aad,
            &mut out[start..],
        ) {
            Ok(tag) => {
                out.extend_from_slice(&tag);
                Ok(())
            }
            Err(_) => {
                // Only a message too long to seal, and no plaintext may stay behind.
                out[start..].zeroize();
                out.truncate(start - NONCE_LEN);
                Err(CryptoError::Open)
            }
        }
    }

    pub fn open(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], ciphertext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        XChaCha20Poly1305::new((&self.0).into())
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ciphertext, aad })
            .map_err(|_| CryptoError::Open)
    }
}

/// The key of the blind index.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct IndexKey([u8; KEY_LEN]);

impl IndexKey {
    /// Keyed hash of a normalised lookup value, domain-separated by the lookup key's name.
    pub fn blind(&self, name: &str, normalised: &str) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(name.as_bytes());
        h.update(&[0]);
        h.update(normalised.as_bytes());
        *h.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_never_handed_out_twice() {
        // Across several blocks and two threads: every nonce distinct, none all zero.
        let mine: Vec<[u8; NONCE_LEN]> = (0..NONCES_PER_BLOCK * 3 + 7).map(|_| nonce().unwrap()).collect();
        let theirs = std::thread::spawn(|| (0..NONCES_PER_BLOCK + 1).map(|_| nonce().unwrap()).collect::<Vec<_>>())
            .join()
            .unwrap();
        let all: std::collections::HashSet<_> = mine.iter().chain(&theirs).copied().collect();
        assert_eq!(all.len(), mine.len() + theirs.len());
        assert!(!all.contains(&[0u8; NONCE_LEN]));
    }

    #[test]
    fn seal_open_and_wrong_aad() {
        let k = SubjectKey::generate().unwrap();
        let (n, ct) = k.seal(b"aad", b"hello").unwrap();
        assert_eq!(k.open(&n, b"aad", &ct).unwrap(), b"hello");
        assert_eq!(k.open(&n, b"other", &ct), Err(CryptoError::Open));
        let other = SubjectKey::generate().unwrap();
        assert_eq!(other.open(&n, b"aad", &ct), Err(CryptoError::Open));
    }

    #[test]
    fn seal_to_appends_what_seal_makes() {
        let k = SubjectKey::generate().unwrap();
        let mut out = b"before".to_vec();
        k.seal_to(b"aad", b"hello world", &mut out).unwrap();
        assert_eq!(&out[..6], b"before");
        let (nonce, ct) = out[6..].split_at(NONCE_LEN);
        assert_eq!(ct.len(), b"hello world".len() + TAG_LEN);
        assert_eq!(k.open(nonce.try_into().unwrap(), b"aad", ct).unwrap(), b"hello world");
        // The same nonce through `seal`'s cipher gives the same bytes.
        let again = XChaCha20Poly1305::new((&k.0).into())
            .encrypt(XNonce::from_slice(nonce), Payload { msg: b"hello world", aad: b"aad" })
            .unwrap();
        assert_eq!(ct, again);
    }

    #[test]
    fn wrap_binds_subject_category_and_generation() {
        let m = MasterKey::generate(1).unwrap();
        let s = Uuid::from_u128(7);
        let k = SubjectKey::generate().unwrap();
        let w = m.wrap(s, 1, &k).unwrap();
        assert_eq!(m.unwrap(s, 1, &w).unwrap().0, k.0);
        assert!(m.unwrap(Uuid::from_u128(8), 1, &w).is_err());
        assert!(m.unwrap(s, 2, &w).is_err());
        let m2 = MasterKey::generate(2).unwrap();
        assert_eq!(m2.unwrap(s, 1, &w).unwrap_err(), CryptoError::Generation { found: 1, current: 2 });
        // Same generation number, different key (a forged keyring): fails to open.
        let m1b = MasterKey::generate(1).unwrap();
        assert_eq!(m1b.unwrap(s, 1, &w).unwrap_err(), CryptoError::Open);
    }

    #[test]
    fn debug_never_shows_keys() {
        let m = MasterKey::from_bytes(3, [0xab; 32]);
        assert!(!format!("{m:?}").contains("ab"));
        assert!(!format!("{:?}", SubjectKey([0xab; 32])).contains("ab"));
    }
}
