//! Lookup keys for the blind index: which kinds exist and how their values are normalised
//! before the keyed hash (so `Anna@Example.com ` finds `anna@example.com`, and `19810615-1502`
//! finds `810615-1502`). Pure.

use uuid::Uuid;

use crate::crypto::SubjectKey;
use crate::record::NONCE_LEN;

/// One blind-index entry of an event: the lookup key, the keyed hash of the normalised value,
/// and the normalised value itself (kept only sealed, beside the entry, so a key rotation can
/// re-hash it without reading events).
#[derive(Debug)]
pub struct Lookup {
    pub kind: u8,
    pub blind: [u8; 32],
    pub value: zeroize::Zeroizing<String>,
}

fn value_aad(subject: Uuid, kind: u8, category: u8) -> Vec<u8> {
    let mut a = b"pdledger lookup value v1".to_vec();
    a.extend_from_slice(subject.as_bytes());
    a.push(kind);
    a.push(category);
    a
}

/// Seals a normalised value under the subject's key for `category`: category ‖ nonce ‖ ciphertext.
pub fn seal_value(
    key: &SubjectKey,
    subject: Uuid,
    kind: u8,
    category: u8,
    value: &str,
) -> Result<Vec<u8>, crate::crypto::CryptoError> {
    let (nonce, ct) = key.seal(&value_aad(subject, kind, category), value.as_bytes())?;
    let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
    out.push(category);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// The category a sealed value is sealed under (its first byte).
pub fn sealed_category(sealed: &[u8]) -> Option<u8> {
    sealed.first().copied()
}

pub fn open_value(key: &SubjectKey, subject: Uuid, kind: u8, sealed: &[u8]) -> Option<zeroize::Zeroizing<String>> {
    if sealed.len() < 1 + NONCE_LEN {
        return None;
    }
    let nonce: [u8; NONCE_LEN] = sealed[1..1 + NONCE_LEN].try_into().ok()?;
    let plain = key.open(&nonce, &value_aad(subject, kind, sealed[0]), &sealed[1 + NONCE_LEN..]).ok()?;
    String::from_utf8(plain).ok().map(zeroize::Zeroizing::new)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum LookupKey {
    Email = 1,
    PersonalNumber = 2,
    OrgNumber = 3,
}

impl LookupKey {
    pub const ALL: [LookupKey; 3] = [LookupKey::Email, LookupKey::PersonalNumber, LookupKey::OrgNumber];

    pub fn name(self) -> &'static str {
        match self {
            LookupKey::Email => "email",
            LookupKey::PersonalNumber => "personal_number",
            LookupKey::OrgNumber => "org_number",
        }
    }

    pub fn from_u8(v: u8) -> Option<LookupKey> {
        LookupKey::ALL.into_iter().find(|k| *k as u8 == v)
    }

    pub fn from_name(name: &str) -> Option<LookupKey> {
        LookupKey::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The canonical form of a value, or `None` when it cannot be one of these.
    pub fn normalise(self, raw: &str) -> Option<String> {
        let raw = raw.trim();
        if raw.len() > 320 {
            return None;
        }
        match self {
            LookupKey::Email => {
                let v = raw.to_lowercase();
                (v.contains('@') && !v.chars().any(char::is_whitespace)).then_some(v)
            }
            // Swedish personal and organisation numbers: digits only, without the century
            // (YYYYMMDD-NNNN and YYMMDD-NNNN are the same person; `+` marks age over 100).
            LookupKey::PersonalNumber | LookupKey::OrgNumber => {
                if !raw.chars().all(|c| c.is_ascii_digit() || matches!(c, '-' | '+' | ' ')) {
                    return None;
                }
                let digits: String = raw.chars().filter(char::is_ascii_digit).collect();
                match digits.len() {
                    10 => Some(digits),
                    12 => Some(digits[2..].to_owned()),
                    _ => None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_people_type() {
        let e = LookupKey::Email;
        assert_eq!(e.normalise("  Anna.Svensson@Example.COM "), Some("anna.svensson@example.com".into()));
        assert_eq!(e.normalise("not an email"), None);
        let p = LookupKey::PersonalNumber;
        let want = Some("8106151502".to_owned());
        for v in ["19810615-1502", "810615-1502", "198106151502", "8106151502", " 810615 1502 "] {
            assert_eq!(p.normalise(v), want, "{v}");
        }
        assert_eq!(p.normalise("81061-1502"), None);
        assert_eq!(p.normalise("abc"), None);
        assert_eq!(LookupKey::OrgNumber.normalise("848987-2153"), Some("8489872153".into()));
    }
}
