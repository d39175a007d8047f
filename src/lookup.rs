//! Lookup keys for the blind index: which kinds exist and how their values are normalised
//! before the keyed hash (so `Anna@Example.com ` finds `anna@example.com`, and `19810615-1502`
//! finds `810615-1502`). Pure.

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
