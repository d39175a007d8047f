//! The audit trail: who did what to whose data, and when.
//!
//! An audit entry is a ledger event (type `audit`) in the same hash-chained log as everything
//! else, so nobody can rewrite it without breaking the chain. It holds ids, never personal
//! data: the actor's username, the action, the subject id, the outcome, the request id.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::ledger::{Ledger, ReadError};
use crate::record::Position;
use crate::writer::Op;

pub const EVENT_TYPE: &str = "audit";

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
    pub since_ms: Option<u64>,
}

pub struct Page {
    pub entries: Vec<Line>,
    /// Pass as `before` to continue (older entries), `None` when the trail is exhausted.
    pub next_cursor: Option<Position>,
}

/// Entries matching `filter`, newest first, before position `before` (exclusive), at most
/// `limit`, scanning at most `scan_max` records per call so one request stays bounded.
pub fn query(
    ledger: &Ledger,
    filter: &Filter,
    before: Position,
    limit: usize,
    scan_max: usize,
) -> Result<Page, ReadError> {
    let mut entries = vec![];
    let mut scanned = 0;
    for item in ledger.notes_rev(before) {
        let (header, json) = item?;
        scanned += 1;
        if header.event_type == EVENT_TYPE {
            if let Some(since) = filter.since_ms {
                if header.recorded_at_ms < since {
                    return Ok(Page { entries, next_cursor: None });
                }
            }
            let Ok(e) = serde_json::from_value::<Entry>(json) else { continue };
            let keep = filter.subject.is_none_or(|s| e.subject == Some(s))
                && filter.actor.as_deref().is_none_or(|a| a == header.actor)
                && filter.action.is_none_or(|a| a == e.action);
            if keep {
                entries.push(Line {
                    position: header.position,
                    at: crate::time::rfc3339(header.recorded_at_ms),
                    actor: header.actor,
                    entry: e,
                });
                if entries.len() >= limit {
                    return Ok(Page { entries, next_cursor: Some(header.position) });
                }
            }
        }
        if scanned >= scan_max {
            return Ok(Page { entries, next_cursor: Some(header.position) });
        }
    }
    Ok(Page { entries, next_cursor: None })
}
