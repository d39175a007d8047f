//! Retention rules per data category (`schemas/retention/rules.json`), and what they mean for
//! an erasure request and for keeping data over time.
//!
//! - An erasure request shreds at once every category whose rule says `"on_erasure": "shred"`.
//!   A category whose rule says `"retain"` (a legal obligation to keep it, GDPR Art. 17(3)(b))
//!   keeps its key, restricted to the dpo, until the end of the N-th year after the calendar
//!   year of the subject's latest event of that category; then the retention run shreds it.
//! - `run` (inside `serve`, and `pdledger retention run` for cron) shreds every hold that has
//!   expired, one writer commit each (a `category.shredded` event, the key, the documents and
//!   the hold go together), so a crash leaves each key shredded or still due; nothing is
//!   shredded before its time. Running it twice changes nothing the second time.
//! - `report` lists subjects with no activity for longer than every category's
//!   `inactive_after`; `pdledger retention report --erase` erases them by the same rules.
//!
//! Every rule names its legal reference; the receipt and the register extract repeat it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ledger::{Ledger, ReadError};
use crate::record::Position;
use crate::schema::{Category, Label};
use crate::writer::{Hold, Op};

const BUILTIN: &str = include_str!("../schemas/retention/rules.json");
const BUILTIN_NAME: &str = "schemas/retention/rules.json";

#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct RulesError {
    pub file: String,
    pub message: String,
}

/// A period `PnY`, `PnM` or `PnD` (ISO 8601, one unit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Period {
    Years(u32),
    Months(u32),
    Days(u32),
}

impl Period {
    pub fn parse(s: &str) -> Option<Period> {
        let body = s.strip_prefix('P')?;
        let (n, unit) = body.split_at(body.len().checked_sub(1)?);
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || n.len() > 4 {
            return None;
        }
        let n: u32 = n.parse().ok()?;
        match unit {
            "Y" => Some(Period::Years(n)),
            "M" => Some(Period::Months(n)),
            "D" => Some(Period::Days(n)),
            _ => None,
        }
    }

    /// `ms` plus this period (calendar years and months; a day past a month's end clamps).
    pub fn after(self, ms: u64) -> u64 {
        let (y, m, d) = crate::time::ymd(ms);
        let rest = ms % 86_400_000;
        let (y, m, d) = match self {
            Period::Days(n) => return ms + n as u64 * 86_400_000,
            Period::Years(n) => (y + n as i64, m, d),
            Period::Months(n) => {
                let total = y * 12 + (m as i64 - 1) + n as i64;
                (total.div_euclid(12), (total.rem_euclid(12) + 1) as u32, d)
            }
        };
        let mut d = d;
        while crate::time::parse_date(&format!("{y:04}-{m:02}-{d:02}")).is_none() && d > 28 {
            d -= 1;
        }
        crate::time::date_ms(y, m, d) + rest
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnErasure {
    Shred,
    Retain,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    label: Label,
    #[serde(default)]
    recipients: Vec<Label>,
    on_erasure: OnErasure,
    #[serde(default)]
    retain_until_end_of_year_after: Option<u32>,
    inactive_after: String,
    basis: Label,
    legal_reference: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    description: String,
    categories: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Rule {
    pub category: Category,
    /// What the category is called in the register extract.
    pub label: Label,
    /// Who receives data of this category (the controller's declaration).
    pub recipients: Vec<Label>,
    pub on_erasure: OnErasure,
    /// With `retain`: kept until the end of this many years after the calendar year of the
    /// subject's latest event of the category.
    pub retain_years: Option<u32>,
    pub inactive_after: Period,
    pub basis: Label,
    pub legal_reference: String,
}

#[derive(Clone, Debug)]
pub struct Rules {
    pub description: String,
    rules: BTreeMap<Category, Rule>,
}

impl Rules {
    pub fn builtin() -> Rules {
        Rules::parse(BUILTIN_NAME, BUILTIN).expect("the shipped retention rules are valid (a unit test checks)")
    }

    pub fn load(path: &Path) -> Result<Rules, RulesError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RulesError { file: path.display().to_string(), message: e.to_string() })?;
        Rules::parse(&path.display().to_string(), &text)
    }

    pub fn parse(file: &str, text: &str) -> Result<Rules, RulesError> {
        let err = |message: String| RulesError { file: file.to_owned(), message };
        let f: RulesFile = serde_json::from_str(text).map_err(|e| err(format!("line {}: {e}", e.line())))?;
        let mut rules = BTreeMap::new();
        for (name, v) in f.categories {
            let category = Category::ALL.into_iter().find(|c| c.name() == name).ok_or_else(|| {
                let known: Vec<&str> = Category::ALL.iter().map(|c| c.name()).collect();
                err(format!("unknown category `{name}` (known: {})", known.join(", ")))
            })?;
            let r: RuleFile = serde_json::from_value(v).map_err(|e| err(format!("category `{name}`: {e}")))?;
            let inactive_after = Period::parse(&r.inactive_after).ok_or_else(|| {
                err(format!(
                    "category `{name}`: inactive_after `{}` is not a period like P3Y, P18M or P90D",
                    r.inactive_after
                ))
            })?;
            match (r.on_erasure, r.retain_until_end_of_year_after) {
                (OnErasure::Retain, None) => {
                    return Err(err(format!("category `{name}`: `retain` needs retain_until_end_of_year_after")))
                }
                (OnErasure::Shred, Some(_)) => {
                    return Err(err(format!(
                        "category `{name}`: retain_until_end_of_year_after only goes with \"on_erasure\": \"retain\""
                    )))
                }
                (_, Some(n)) if n > 100 => return Err(err(format!("category `{name}`: {n} years is not a period"))),
                _ => {}
            }
            if r.legal_reference.trim().is_empty() {
                return Err(err(format!("category `{name}`: every rule names its legal reference")));
            }
            rules.insert(
                category,
                Rule {
                    category,
                    label: r.label,
                    recipients: r.recipients,
                    on_erasure: r.on_erasure,
                    retain_years: r.retain_until_end_of_year_after,
                    inactive_after,
                    basis: r.basis,
                    legal_reference: r.legal_reference,
                },
            );
        }
        for c in Category::ALL {
            if !rules.contains_key(&c) {
                return Err(err(format!("no rule for category `{}`: every category needs one", c.name())));
            }
        }
        Ok(Rules { description: f.description, rules })
    }

    pub fn get(&self, c: Category) -> &Rule {
        &self.rules[&c]
    }

    pub fn all(&self) -> impl Iterator<Item = &Rule> {
        self.rules.values()
    }
}

/// What an erasure of `subject` at `now_ms` keeps: for each category whose rule retains and
/// whose key exists, until when. Reads (decrypts) the subject's events of those categories
/// for the latest one's date.
pub fn plan(ledger: &Ledger, rules: &Rules, subject: Uuid, now_ms: u64) -> Result<Vec<Hold>, ReadError> {
    let mut latest: BTreeMap<u8, u64> = BTreeMap::new();
    let retaining: Vec<&Rule> = rules.all().filter(|r| r.on_erasure == OnErasure::Retain).collect();
    if retaining.is_empty() {
        return Ok(vec![]);
    }
    for e in ledger.read_stream(subject, 0, usize::MAX)? {
        let Some(schema) = ledger.schemas().get(&e.event_type, e.schema_version) else { continue };
        if !retaining.iter().any(|r| r.category == schema.category) {
            continue;
        }
        let at = crate::time::parse_timestamp(&e.occurred_at).unwrap_or(0);
        let slot = latest.entry(schema.category as u8).or_insert(0);
        *slot = (*slot).max(at);
    }
    let mut holds = vec![];
    for r in retaining {
        let Some(at) = latest.get(&(r.category as u8)) else { continue };
        let years = r.retain_years.unwrap_or(0) as i64;
        // The end of the N-th year after the event's calendar year: midnight on 1 January of
        // the year after that.
        let (y, _, _) = crate::time::ymd(*at);
        let until_ms = crate::time::date_ms(y + years + 1, 1, 1);
        if until_ms > now_ms {
            holds.push(Hold { category: r.category as u8, until_ms });
        }
    }
    Ok(holds)
}

/// Erases a subject by the rules: what is not retained is shredded now, the rest is held.
pub fn erase(
    ledger: &Ledger,
    rules: &Rules,
    subject: Uuid,
    reason: &str,
    actor: &str,
    now_ms: u64,
    extra: Vec<Op>,
) -> Result<Result<Vec<crate::writer::Committed>, crate::writer::WriteError>, ReadError> {
    let retain = plan(ledger, rules, subject, now_ms)?;
    let mut ops = vec![Op::Erase { subject, reason: reason.to_owned(), actor: actor.to_owned(), retain }];
    ops.extend(extra);
    Ok(ledger.submit(ops))
}

/// One shredding a run did.
#[derive(Clone, Debug, Serialize)]
pub struct Shredded {
    pub subject: Uuid,
    pub category: String,
    pub held_until: String,
    pub legal_reference: String,
    pub position: Position,
}

/// Shreds every hold that expired by `now_ms`: one commit each, with its audit entry.
pub fn run(ledger: &Ledger, rules: &Rules, now_ms: u64, actor: &str) -> Result<Vec<Shredded>, String> {
    let due: Vec<(Uuid, u8, u64)> = ledger
        .store()
        .holds()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|(_, _, until)| *until <= now_ms)
        .collect();
    let mut out = vec![];
    for (subject, category, until) in due {
        let audit = crate::audit::Entry {
            target: Category::from_u8(category).map(|c| c.name().to_owned()),
            ..crate::audit::Entry::new(crate::audit::Action::Erase, Some(subject), crate::audit::Outcome::Ok)
        };
        let r = ledger
            .submit(vec![Op::Shred { subject, category, actor: actor.to_owned() }, audit.into_op(actor)])
            .map_err(|e| e.to_string())?;
        let c = Category::from_u8(category);
        out.push(Shredded {
            subject,
            category: c.map(|c| c.name().to_owned()).unwrap_or_else(|| category.to_string()),
            held_until: crate::time::rfc3339(until),
            legal_reference: c.map(|c| rules.get(c).legal_reference.clone()).unwrap_or_default(),
            position: r[0].positions[0],
        });
    }
    Ok(out)
}

/// A subject with no activity for longer than every category's `inactive_after`.
#[derive(Clone, Debug, Serialize)]
pub struct Inactive {
    pub subject: Uuid,
    pub last_activity: String,
}

/// Subjects (not erased) whose latest event is older than the longest `inactive_after` of the
/// categories they hold, as of `now_ms`. Keyless: uses the records' recorded times.
pub fn report(ledger: &Ledger, rules: &Rules, now_ms: u64) -> Result<Vec<Inactive>, ReadError> {
    let mut out = vec![];
    for s in ledger.store().subjects() {
        let s = s?;
        if ledger.store().erased(s)?.is_some() {
            continue;
        }
        let Some(Ok((_, pos))) = ledger.store().stream_rev(s).next() else { continue };
        let bytes =
            ledger.store().record(pos)?.ok_or(ReadError::Damaged { position: pos, detail: "missing".into() })?;
        let rec =
            crate::record::decode(&bytes).map_err(|e| ReadError::Damaged { position: pos, detail: e.to_string() })?;
        let last = rec.header.recorded_at_ms;
        let categories = ledger.store().key_categories(s)?;
        let longest = categories
            .iter()
            .filter_map(|c| Category::from_u8(*c))
            .map(|c| rules.get(c).inactive_after.after(last))
            .max()
            .unwrap_or(u64::MAX);
        if longest <= now_ms {
            out.push(Inactive { subject: s, last_activity: crate::time::rfc3339(last) });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_rules_parse_and_bad_ones_are_refused() {
        let r = Rules::builtin();
        assert_eq!(r.get(Category::Billing).on_erasure, OnErasure::Retain);
        assert_eq!(r.get(Category::Contact).on_erasure, OnErasure::Shred);
        let bad_cat = BUILTIN.replace("\"projects\": {", "\"drawings\": {");
        let e = Rules::parse("rules.json", &bad_cat).unwrap_err().to_string();
        assert!(e.contains("unknown category `drawings`"), "{e}");
        let bad_period = BUILTIN.replace("\"P3Y\"", "\"3 years\"");
        let e = Rules::parse("rules.json", &bad_period).unwrap_err().to_string();
        assert!(e.contains("`3 years` is not a period"), "{e}");
        assert!(Rules::parse("rules.json", "{").unwrap_err().to_string().contains("line"));
    }

    #[test]
    fn periods() {
        assert_eq!(Period::parse("P7Y"), Some(Period::Years(7)));
        assert_eq!(Period::parse("P18M"), Some(Period::Months(18)));
        assert_eq!(Period::parse("7Y"), None);
        assert_eq!(Period::parse("PY"), None);
        assert_eq!(Period::parse("P1W"), None);
        let t = crate::time::parse_timestamp("2024-01-31").unwrap();
        assert_eq!(crate::time::rfc3339(Period::Months(1).after(t)), "2024-02-29T00:00:00.000Z");
        assert_eq!(crate::time::rfc3339(Period::Years(3).after(t)), "2027-01-31T00:00:00.000Z");
    }
}
