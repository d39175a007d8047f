//! The audit trail: who did what to whose data, and when.
//!
//! An audit entry is a ledger event (type `audit`) in the same hash-chained log as everything
//! else, so nobody can rewrite it without breaking the chain. It holds ids, never personal
//! data: the actor's username, the action, the subject id, the outcome, the request id.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::record::Position;
use crate::store::{AuditKey, Store, StoreError};
use crate::writer::Op;

pub const EVENT_TYPE: &str = "audit";

/// The subject the audit index files an audit record under, beside the index of every entry:
/// the record's own subject, none for the nil id (logins, user changes). The writer, the crash
/// redo, the tail repair and `verify --deep` all ask this one function, so they agree.
pub fn indexed_subject(subject: Uuid) -> Option<Uuid> {
    Some(subject).filter(|s| !s.is_nil())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Login,
    LoginFailed,
    Logout,
    Append,
    Read,
    Lookup,
    View,
    Export,
    Erase,
    Restrict,
    Unrestrict,
    UserCreated,
    UserDisabled,
    KeysRotated,
    Backup,
    Denied,
    SubjectCreated,
    TotpEnrolled,
    TotpActivated,
    Verify,
}

impl Action {
    /// Every action, for the API's document (the `action` filter's values).
    pub const ALL: [Action; 20] = [
        Action::Login,
        Action::LoginFailed,
        Action::Logout,
        Action::Append,
        Action::Read,
        Action::Lookup,
        Action::View,
        Action::Export,
        Action::Erase,
        Action::Restrict,
        Action::Unrestrict,
        Action::UserCreated,
        Action::UserDisabled,
        Action::KeysRotated,
        Action::Backup,
        Action::Denied,
        Action::SubjectCreated,
        Action::TotpEnrolled,
        Action::TotpActivated,
        Action::Verify,
    ];

    pub fn name(self) -> String {
        serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
    }
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Action, String> {
        serde_json::from_value(Value::String(s.to_owned())).map_err(|_| format!("unknown audit action `{s}`"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Denied,
    Failed,
}

/// What the server records.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub action: Action,
    /// Always present in the JSON (`null` when the entry concerns no subject).
    #[serde(default)]
    pub subject: Option<Uuid>,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The route template (`/v1/subjects/{id}/events`), never the raw path or query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// A target that is not a subject: a username for user management.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl Entry {
    pub fn new(action: Action, subject: Option<Uuid>, outcome: Outcome) -> Entry {
        Entry { action, subject, outcome, request_id: None, route: None, target: None }
    }

    pub fn into_op(self, actor: &str) -> Op {
        Op::Note {
            subject: self.subject,
            event_type: EVENT_TYPE.into(),
            json: serde_json::to_value(&self).expect("serializes"),
            actor: actor.to_owned(),
        }
    }
}

/// What a reader of the trail sees: the entry, with where and when it was recorded and by whom.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Line {
    pub position: Position,
    pub at: String,
    pub actor: String,
    #[serde(flatten)]
    pub entry: Entry,
}

#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub subject: Option<Uuid>,
    pub actor: Option<String>,
    pub action: Option<Action>,
    /// Entries recorded at or after this time (ms since the epoch)...
    pub since_ms: Option<u64>,
    /// ...and before this one.
    pub until_ms: Option<u64>,
}

pub struct Page {
    pub entries: Vec<Line>,
    /// Pass as `before` to continue (older entries), `None` when the trail is exhausted.
    pub next_cursor: Option<Position>,
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("audit entry at position {0} is damaged: {1}")]
    Damaged(Position, String),
}

/// Entries matching `filter`, newest first, before position `before` (exclusive) and at most
/// `head`, at most `limit`. Walks the subject's audit index, or else the index of every entry,
/// and checks the other conditions (actor, action, time) on each entry, reading at most
/// `scan_max` entries per call so one request stays bounded (a page can then be short, with a
/// cursor to go on from). Needs no key: audit entries hold no personal data.
pub fn query(
    store: &Store,
    head: Position,
    filter: &Filter,
    before: Position,
    limit: usize,
    scan_max: usize,
) -> Result<Page, QueryError> {
    let mut before = before.min(head.saturating_add(1));
    if let Some(until) = filter.until_ms {
        before = before.min(position_at_time(store, head, until)?);
    }
    let key = filter.subject.map_or(AuditKey::All, AuditKey::Subject);
    let mut entries = vec![];
    for (scanned, pos) in store.audit_rev(key, before).enumerate() {
        let pos = pos?;
        if scanned >= scan_max {
            return Ok(Page { entries, next_cursor: Some(pos + 1) });
        }
        let bytes = store.record(pos)?.ok_or_else(|| QueryError::Damaged(pos, "missing".into()))?;
        let rec = crate::record::decode(&bytes).map_err(|e| QueryError::Damaged(pos, e.to_string()))?;
        if filter.since_ms.is_some_and(|since| rec.header.recorded_at_ms < since) {
            return Ok(Page { entries, next_cursor: None });
        }
        let e: Entry = serde_json::from_slice(&rec.payload).map_err(|e| QueryError::Damaged(pos, e.to_string()))?;
        let keep = filter.subject.is_none_or(|s| e.subject == Some(s))
            && filter.actor.as_deref().is_none_or(|a| a == rec.header.actor)
            && filter.action.is_none_or(|a| a == e.action);
        if keep {
            entries.push(Line {
                position: pos,
                at: crate::time::rfc3339(rec.header.recorded_at_ms),
                actor: rec.header.actor,
                entry: e,
            });
            if entries.len() >= limit {
                return Ok(Page { entries, next_cursor: Some(pos) });
            }
        }
    }
    Ok(Page { entries, next_cursor: None })
}

/// The first position recorded at or after `ms` (`head + 1` when none). The writer never
/// lets recorded times go backwards, so this is a binary search over the log.
pub fn position_at_time(store: &Store, head: Position, ms: u64) -> Result<Position, QueryError> {
    let (mut lo, mut hi) = (1, head + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let bytes = store.record(mid)?.ok_or_else(|| QueryError::Damaged(mid, "missing".into()))?;
        let rec = crate::record::decode(&bytes).map_err(|e| QueryError::Damaged(mid, e.to_string()))?;
        if rec.header.recorded_at_ms < ms {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

#[cfg(test)]
mod tests {
    use super::Action;

    #[test]
    fn all_lists_every_action_once() {
        let names: std::collections::BTreeSet<String> = Action::ALL.iter().map(|a| a.name()).collect();
        assert_eq!(names.len(), Action::ALL.len());
        for a in Action::ALL {
            assert_eq!(a.name().parse::<Action>(), Ok(a));
            // A new action stops this match from compiling: add it to `ALL` too.
            match a {
                Action::Login
                | Action::LoginFailed
                | Action::Logout
                | Action::Append
                | Action::Read
                | Action::Lookup
                | Action::View
                | Action::Export
                | Action::Erase
                | Action::Restrict
                | Action::Unrestrict
                | Action::UserCreated
                | Action::UserDisabled
                | Action::KeysRotated
                | Action::Backup
                | Action::Denied
                | Action::SubjectCreated
                | Action::TotpEnrolled
                | Action::TotpActivated
                | Action::Verify => {}
            }
        }
    }
}
