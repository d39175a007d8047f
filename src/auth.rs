//! Users, passwords, two-step login, sessions and brute-force limits.
//!
//! - Passwords: Argon2id (m = 19 MiB, t = 2, p = 1: OWASP's recommended minimum), a random
//!   salt per hash, PHC strings. At least 15 characters for every account (NIST SP 800-63B-4's
//!   minimum for a password used alone: a second factor cannot be assumed at creation), at
//!   most 1024, no composition rules, never truncated.
//! - TOTP (RFC 6238, SHA-1, 6 digits, 30 s): one step either side; a code's step is accepted
//!   once (the last accepted step is stored). Secrets are sealed at rest under a key derived
//!   from the master key.
//! - Sessions: 256 random bits, handed out once as `pdl_<hex>`, stored only as a blake3 hash,
//!   with an expiry. Every request loads the session and its user, so logout and disabling a
//!   user take effect at once.
//! - Failed logins are counted per account name (known or not, so lockout does not reveal
//!   which names exist) and per address; past the limit, logins answer "locked" with the
//!   seconds to wait.
//! - Password hashes are computed a few at a time (`AuthConfig::hashes_at_once`, the number
//!   of cores by default): each holds Argon2's 19 MiB, so a burst of logins would otherwise
//!   hold 19 MiB per request in flight (64 at once took the server from 114 MB to 1 GB).
//!   Logins queued behind a burst check the lockout again when their turn comes, so a burst
//!   from one address or against one account gets at most `hashes_at_once - 1` attempts past
//!   its limit. (The server queues logins for a turn on the async side, `api::AppState`, so a
//!   login that times out while it waits holds no thread; the gate here bounds every caller.)
//!   The turns are not handed out in order of arrival.
//!
//! Time comes from an injected clock so tests can move it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use serde::{Deserialize, Serialize};

use crate::crypto::{random_bytes, SubjectKey};
use crate::record::{hex, unhex};
use crate::store::{Kv, StoreError};

pub const ARGON2_M_KIB: u32 = 19 * 1024;
pub const ARGON2_T: u32 = 2;
pub const ARGON2_P: u32 = 1;
pub const PASSWORD_CHARS_MIN: usize = 15;
pub const PASSWORD_CHARS_MAX: usize = 1024;
const TOTP_STEP_SECS: u64 = 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Staff,
    Dpo,
    Auditor,
    Service,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::Admin, Role::Staff, Role::Dpo, Role::Auditor, Role::Service];

    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Staff => "staff",
            Role::Dpo => "dpo",
            Role::Auditor => "auditor",
            Role::Service => "service",
        }
    }
}

impl clap::ValueEnum for Role {
    fn value_variants<'a>() -> &'a [Role] {
        &Role::ALL
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("unknown role `{s}` (admin, staff, dpo, auditor, service)"))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct TotpState {
    /// nonce ‖ ciphertext of the secret, hex.
    sealed: String,
    active: bool,
    last_step: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct User {
    pub username: String,
    pub role: Role,
    password_hash: String,
    pub disabled: bool,
    totp: Option<TotpState>,
    pub created_at_ms: u64,
}

impl User {
    pub fn password_hash(&self) -> &str {
        &self.password_hash
    }
    pub fn has_totp(&self) -> bool {
        self.totp.as_ref().is_some_and(|t| t.active)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Session {
    username: String,
    expires_at_ms: u64,
}

/// Who is calling, from their session: the only source of roles.
#[derive(Clone, Debug)]
pub struct Caller {
    pub username: String,
    pub role: Role,
    token_hash: [u8; 32],
}

#[derive(Clone, Debug)]
pub struct AuthConfig {
    pub session_secs: u64,
    pub mfa_secs: u64,
    /// Failed logins per account name before it is locked for `lockout_secs`.
    pub failures_per_account: u32,
    /// Failed logins per client address before it is locked for `lockout_secs`.
    pub failures_per_address: u32,
    pub lockout_secs: u64,
    /// Password hashes (Argon2id, 19 MiB each) computed at once; further logins wait.
    pub hashes_at_once: usize,
}

/// The number of cores, the default of `hashes_at_once`.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Default for AuthConfig {
    fn default() -> AuthConfig {
        AuthConfig {
            session_secs: 8 * 3600,
            mfa_secs: 300,
            failures_per_account: 5,
            failures_per_address: 20,
            lockout_secs: 300,
            hashes_at_once: cores(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("username must be 1 to 64 of a-z 0-9 . _ -")]
    BadUsername,
    #[error("password must be {PASSWORD_CHARS_MIN} to {PASSWORD_CHARS_MAX} characters")]
    BadPassword,
    #[error("user exists already")]
    Exists,
    #[error("no such user")]
    NoUser,
    #[error("invalid or expired token")]
    BadToken,
    #[error("wrong or reused code")]
    BadCode,
    #[error("two-step login is not enrolled")]
    NotEnrolled,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored auth record is damaged: {0}")]
    Damaged(String),
    #[error("{0}")]
    Internal(String),
}

pub enum Login {
    Session {
        token: String,
        expires_at_ms: u64,
        username: String,
    },
    MfaRequired {
        mfa_token: String,
        username: String,
    },
    /// Wrong user or password; `username` is set only when the account exists.
    Invalid {
        username: Option<String>,
    },
    Locked {
        retry_after_secs: u64,
    },
}

pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(crate::time::now_ms)
}

#[derive(Default)]
struct Counter {
    failures: u32,
    locked_until_ms: u64,
}

struct Pending {
    username: String,
    expires_at_ms: u64,
    attempts: u32,
}

pub struct Auth {
    kv: Kv,
    config: AuthConfig,
    clock: Clock,
    argon: Argon2<'static>,
    /// Verified against when the user does not exist, so both cases cost the same.
    dummy_hash: String,
    accounts: Mutex<HashMap<String, Counter>>,
    addresses: Mutex<HashMap<IpAddr, Counter>>,
    pending: Mutex<HashMap<[u8; 32], Pending>>,
    hashing: HashGate,
}

/// Lets at most `max` password hashes run at once; the others wait for a turn.
struct HashGate {
    busy: Mutex<usize>,
    turn: Condvar,
    max: usize,
}

/// A turn to compute a password hash, given back when dropped.
struct HashTurn<'a>(&'a HashGate);

impl HashGate {
    fn new(max: usize) -> HashGate {
        HashGate { busy: Mutex::new(0), turn: Condvar::new(), max: max.max(1) }
    }

    fn enter(&self) -> HashTurn<'_> {
        let mut busy = self.busy.lock().expect("not poisoned");
        while *busy >= self.max {
            busy = self.turn.wait(busy).expect("not poisoned");
        }
        *busy += 1;
        HashTurn(self)
    }
}

impl Drop for HashTurn<'_> {
    fn drop(&mut self) {
        *self.0.busy.lock().expect("not poisoned") -= 1;
        self.0.turn.notify_one();
    }
}

const COUNTERS_MAX: usize = 100_000;

fn user_key(name: &str) -> Vec<u8> {
    [b"U".as_slice(), name.as_bytes()].concat()
}

fn session_key(hash: &[u8; 32]) -> Vec<u8> {
    [b"T".as_slice(), hash.as_slice()].concat()
}

fn token_hash(token: &str) -> [u8; 32] {
    blake3::derive_key("pdledger session token v1", token.as_bytes())
}

fn new_token(prefix: &str) -> Result<String, AuthError> {
    let bytes: [u8; 32] = random_bytes().map_err(|e| AuthError::Internal(e.to_string()))?;
    Ok(format!("{prefix}{}", hex(&bytes)))
}

pub fn username_is_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

impl Auth {
    pub fn new(kv: Kv, config: AuthConfig, clock: Clock) -> Result<Auth, AuthError> {
        let params =
            Params::new(ARGON2_M_KIB, ARGON2_T, ARGON2_P, None).map_err(|e| AuthError::Internal(e.to_string()))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let hashing = HashGate::new(config.hashes_at_once);
        let mut auth = Auth {
            kv,
            config,
            clock,
            argon,
            dummy_hash: String::new(),
            accounts: Mutex::new(HashMap::new()),
            addresses: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            hashing,
        };
        auth.dummy_hash = auth.hash_password("not a real password, only for timing")?;
        Ok(auth)
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    fn now(&self) -> u64 {
        (self.clock)()
    }

    fn hash_password(&self, password: &str) -> Result<String, AuthError> {
        let _turn = self.hashing.enter();
        let salt_bytes: [u8; 16] = random_bytes().map_err(|e| AuthError::Internal(e.to_string()))?;
        let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| AuthError::Internal(e.to_string()))?;
        Ok(self
            .argon
            .hash_password(password.as_bytes(), &salt)
            .map_err(|e| AuthError::Internal(e.to_string()))?
            .to_string())
    }

    /// Call with a turn of `hashing` held.
    fn verify_password(&self, _turn: &HashTurn<'_>, hash: &str, password: &str) -> bool {
        match PasswordHash::new(hash) {
            Ok(parsed) => self.argon.verify_password(password.as_bytes(), &parsed).is_ok(),
            Err(_) => false,
        }
    }

    pub fn has_users(&self) -> bool {
        !self.kv.is_empty()
    }

    pub fn user(&self, name: &str) -> Result<Option<User>, AuthError> {
        match self.kv.get(&user_key(name))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(|e| AuthError::Damaged(e.to_string())),
        }
    }

    fn put_user(&self, user: &User) -> Result<(), AuthError> {
        Ok(self.kv.put(&user_key(&user.username), &serde_json::to_vec(user).expect("serializes"))?)
    }

    pub fn users(&self) -> Result<Vec<User>, AuthError> {
        self.kv
            .scan(b"U")
            .map(|kv| {
                let (_, v) = kv?;
                serde_json::from_slice(&v).map_err(|e| AuthError::Damaged(e.to_string()))
            })
            .collect()
    }

    pub fn create_user(&self, username: &str, password: &str, role: Role) -> Result<User, AuthError> {
        if !username_is_valid(username) {
            return Err(AuthError::BadUsername);
        }
        let chars = password.chars().count();
        if !(PASSWORD_CHARS_MIN..=PASSWORD_CHARS_MAX).contains(&chars) {
            return Err(AuthError::BadPassword);
        }
        if self.user(username)?.is_some() {
            return Err(AuthError::Exists);
        }
        let user = User {
            username: username.to_owned(),
            role,
            password_hash: self.hash_password(password)?,
            disabled: false,
            totp: None,
            created_at_ms: self.now(),
        };
        self.put_user(&user)?;
        Ok(user)
    }

    /// Disables a user and deletes their sessions.
    pub fn disable(&self, username: &str) -> Result<(), AuthError> {
        let mut user = self.user(username)?.ok_or(AuthError::NoUser)?;
        user.disabled = true;
        self.put_user(&user)?;
        let mut doomed = vec![];
        for kv in self.kv.scan(b"T") {
            let (k, v) = kv?;
            if serde_json::from_slice::<Session>(&v).is_ok_and(|s| s.username == username) {
                doomed.push(k);
            }
        }
        for k in doomed {
            self.kv.remove(&k)?;
        }
        Ok(())
    }

    fn locked(&self, name: &str, addr: Option<IpAddr>) -> Option<u64> {
        let now = self.now();
        let left = |c: Option<&Counter>| {
            c.and_then(|c| (c.locked_until_ms > now).then(|| (c.locked_until_ms - now).div_ceil(1000)))
        };
        let a = left(self.accounts.lock().expect("not poisoned").get(name));
        let b = addr.and_then(|ip| left(self.addresses.lock().expect("not poisoned").get(&ip)));
        a.max(b)
    }

    fn record_failure(&self, name: &str, addr: Option<IpAddr>) {
        let now = self.now();
        let lock_for = self.config.lockout_secs * 1000;
        let bump = |c: &mut Counter, max: u32| {
            if c.locked_until_ms != 0 && c.locked_until_ms <= now {
                *c = Counter::default();
            }
            c.failures += 1;
            if c.failures >= max {
                c.locked_until_ms = now + lock_for;
            }
        };
        {
            let mut accounts = self.accounts.lock().expect("not poisoned");
            if accounts.len() >= COUNTERS_MAX {
                accounts.retain(|_, c| c.locked_until_ms > now);
            }
            bump(accounts.entry(name.to_owned()).or_default(), self.config.failures_per_account);
        }
        if let Some(ip) = addr {
            let mut addresses = self.addresses.lock().expect("not poisoned");
            if addresses.len() >= COUNTERS_MAX {
                addresses.retain(|_, c| c.locked_until_ms > now);
            }
            bump(addresses.entry(ip).or_default(), self.config.failures_per_address);
        }
    }

    fn clear_failures(&self, name: &str) {
        self.accounts.lock().expect("not poisoned").remove(name);
    }

    /// Checks a username and password. Costs one Argon2id verification whether or not the
    /// user exists (none when the lockout refuses it), after waiting for a hashing turn. Call
    /// it off the async runtime (it takes tens of milliseconds, more while others hash).
    pub fn login(&self, username: &str, password: &str, addr: Option<IpAddr>) -> Result<Login, AuthError> {
        let name = username.to_lowercase();
        let turn = self.hashing.enter();
        // Checked once the turn has come, so attempts that waited behind others from the same
        // account or address see their failures.
        if let Some(retry_after_secs) = self.locked(&name, addr) {
            return Ok(Login::Locked { retry_after_secs });
        }
        // Read once the turn has come: a user disabled meanwhile is seen as disabled.
        let user = if username_is_valid(&name) { self.user(&name)? } else { None };
        let hash = user.as_ref().map(|u| u.password_hash.as_str()).unwrap_or(&self.dummy_hash);
        let password_ok = self.verify_password(&turn, hash, password);
        let user = match user {
            Some(u) if password_ok && !u.disabled => u,
            other => {
                // Counted before the turn is given back, so the next in line sees it.
                self.record_failure(&name, addr);
                return Ok(Login::Invalid { username: other.map(|u| u.username) });
            }
        };
        drop(turn);
        if user.has_totp() {
            let mfa_token = new_token("mfa_")?;
            let mut pending = self.pending.lock().expect("not poisoned");
            let now = self.now();
            pending.retain(|_, p| p.expires_at_ms > now);
            if pending.len() >= COUNTERS_MAX {
                return Err(AuthError::Internal("too many logins waiting for their second step".into()));
            }
            pending.insert(
                token_hash(&mfa_token),
                Pending {
                    username: user.username.clone(),
                    expires_at_ms: now + self.config.mfa_secs * 1000,
                    attempts: 0,
                },
            );
            return Ok(Login::MfaRequired { mfa_token, username: user.username });
        }
        self.clear_failures(&name);
        let (token, expires_at_ms) = self.new_session(&user.username)?;
        Ok(Login::Session { token, expires_at_ms, username: user.username })
    }

    /// The second step: exchanges an mfa token and a TOTP code for a session. Returns the
    /// username either way (for the audit trail) when the mfa token was valid.
    pub fn login_totp(
        &self,
        mfa_token: &str,
        code: &str,
        addr: Option<IpAddr>,
        key: &SubjectKey,
    ) -> Result<(Option<String>, Login), AuthError> {
        let hash = token_hash(mfa_token);
        let now = self.now();
        let username = {
            let pending = self.pending.lock().expect("not poisoned");
            match pending.get(&hash) {
                Some(p) if p.expires_at_ms > now => p.username.clone(),
                _ => return Ok((None, Login::Invalid { username: None })),
            }
        };
        if let Some(retry_after_secs) = self.locked(&username, addr) {
            return Ok((Some(username), Login::Locked { retry_after_secs }));
        }
        let Some(mut user) = self.user(&username)?.filter(|u| !u.disabled) else {
            return Ok((Some(username), Login::Invalid { username: None }));
        };
        if self.check_code_with(&mut user, code, key)? {
            self.put_user(&user)?;
            self.pending.lock().expect("not poisoned").remove(&hash);
            self.clear_failures(&username);
            let (token, expires_at_ms) = self.new_session(&username)?;
            return Ok((Some(username.clone()), Login::Session { token, expires_at_ms, username }));
        }
        self.record_failure(&username, addr);
        let mut pending = self.pending.lock().expect("not poisoned");
        if let Some(p) = pending.get_mut(&hash) {
            p.attempts += 1;
            if p.attempts >= 5 {
                pending.remove(&hash);
            }
        }
        Ok((Some(username.clone()), Login::Invalid { username: Some(username) }))
    }

    fn new_session(&self, username: &str) -> Result<(String, u64), AuthError> {
        let token = new_token("pdl_")?;
        let expires_at_ms = self.now() + self.config.session_secs * 1000;
        let session = Session { username: username.to_owned(), expires_at_ms };
        self.kv.put(&session_key(&token_hash(&token)), &serde_json::to_vec(&session).expect("serializes"))?;
        Ok((token, expires_at_ms))
    }

    /// The caller behind a bearer token, checked against the store every time.
    pub fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        if !token.starts_with("pdl_") || token.len() != 68 {
            return Err(AuthError::BadToken);
        }
        let hash = token_hash(token);
        let Some(v) = self.kv.get(&session_key(&hash))? else { return Err(AuthError::BadToken) };
        let session: Session = serde_json::from_slice(&v).map_err(|e| AuthError::Damaged(e.to_string()))?;
        if session.expires_at_ms <= self.now() {
            self.kv.remove(&session_key(&hash))?;
            return Err(AuthError::BadToken);
        }
        let user = self.user(&session.username)?.ok_or(AuthError::BadToken)?;
        if user.disabled {
            return Err(AuthError::BadToken);
        }
        Ok(Caller { username: user.username, role: user.role, token_hash: hash })
    }

    pub fn logout(&self, caller: &Caller) -> Result<(), AuthError> {
        Ok(self.kv.remove(&session_key(&caller.token_hash))?)
    }

    /// Starts (or restarts) two-step enrolment: a new secret, inactive until a first code
    /// proves the authenticator has it. Returns (base32 secret, otpauth URI).
    pub fn totp_enroll(&self, username: &str, key: &SubjectKey) -> Result<(String, String), AuthError> {
        let mut user = self.user(username)?.ok_or(AuthError::NoUser)?;
        let secret: [u8; 20] = random_bytes().map_err(|e| AuthError::Internal(e.to_string()))?;
        let (nonce, ct) = key.seal(&totp_aad(username), &secret).map_err(|e| AuthError::Internal(e.to_string()))?;
        user.totp = Some(TotpState { sealed: hex(&[nonce.as_slice(), &ct].concat()), active: false, last_step: 0 });
        self.put_user(&user)?;
        let base32 = totp_rs::Secret::Raw(secret.to_vec()).to_encoded().to_string();
        // Usernames are [a-z0-9._-]: nothing in the label needs escaping.
        let uri = format!("otpauth://totp/pdledger:{username}?secret={base32}&issuer=pdledger&algorithm=SHA1&digits=6&period={TOTP_STEP_SECS}");
        Ok((base32, uri))
    }

    pub fn totp_activate(&self, username: &str, code: &str, key: &SubjectKey) -> Result<(), AuthError> {
        let mut user = self.user(username)?.ok_or(AuthError::NoUser)?;
        if user.totp.is_none() {
            return Err(AuthError::NotEnrolled);
        }
        if !self.check_code_with(&mut user, code, key)? {
            return Err(AuthError::BadCode);
        }
        if let Some(t) = user.totp.as_mut() {
            t.active = true;
        }
        self.put_user(&user)
    }

    /// Checks a code one step either side of now, accepting each step at most once.
    fn check_code_with(&self, user: &mut User, code: &str, key: &SubjectKey) -> Result<bool, AuthError> {
        let Some(state) = user.totp.as_mut() else { return Ok(false) };
        if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(false);
        }
        let sealed = unhex(&state.sealed).ok_or_else(|| AuthError::Damaged("totp secret".into()))?;
        if sealed.len() < 24 {
            return Err(AuthError::Damaged("totp secret".into()));
        }
        let nonce: [u8; 24] = sealed[..24].try_into().expect("24 bytes");
        let secret = zeroize::Zeroizing::new(
            key.open(&nonce, &totp_aad(&user.username), &sealed[24..])
                .map_err(|e| AuthError::Damaged(e.to_string()))?,
        );
        let totp = totp(secret.to_vec())?;
        let now_s = self.now() / 1000;
        let step_now = now_s / TOTP_STEP_SECS;
        for step in [step_now.saturating_sub(1), step_now, step_now + 1] {
            let expected = totp.generate(step * TOTP_STEP_SECS);
            if step > state.last_step && constant_time_eq(expected.as_bytes(), code.as_bytes()) {
                state.last_step = step;
                return Ok(true);
            }
        }
        Ok(false)
    }
}

fn totp_aad(username: &str) -> Vec<u8> {
    [b"pdledger totp v1 ".as_slice(), username.as_bytes()].concat()
}

fn totp(secret: Vec<u8>) -> Result<totp_rs::TOTP, AuthError> {
    totp_rs::TOTP::new(totp_rs::Algorithm::SHA1, 6, 1, TOTP_STEP_SECS, secret)
        .map_err(|e| AuthError::Internal(e.to_string()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A TOTP code for a base32 secret at a time: what an authenticator app shows. For tests and
/// the `pdledger` client commands.
pub fn totp_code(secret_base32: &str, at_ms: u64) -> Option<String> {
    let secret = totp_rs::Secret::Encoded(secret_base32.to_owned()).to_bytes().ok()?;
    let t = totp_rs::TOTP::new_unchecked(totp_rs::Algorithm::SHA1, 6, 1, TOTP_STEP_SECS, secret);
    Some(t.generate(at_ms / 1000))
}
