//! The check shared by `import_line` and `api_body`: a refusal never quotes a value.
//!
//! Every fixed message is ASCII (but for the `…` that stands in for a blanked value), so a
//! non-ASCII character in a refusal came from the input. It may come from a key or an event
//! type, which messages name on purpose; one that occurs only in string values is a value
//! quoted back, which a refusal must not do (a value may be personal). Values that are ASCII
//! only are not checked this way.

use serde_json::Value;

fn walk<'v>(v: &'v Value, keys: &mut Vec<&'v str>, values: &mut Vec<&'v str>) {
    match v {
        Value::String(s) => values.push(s),
        Value::Array(a) => a.iter().for_each(|x| walk(x, keys, values)),
        Value::Object(m) => {
            for (k, x) in m {
                keys.push(k);
                walk(x, keys, values);
            }
        }
        _ => {}
    }
}

/// Panics if `message` holds a character found only in `input`'s string values. `named` are
/// further strings (an event type) the message may name.
pub fn assert_no_value_quoted(message: &str, input: &Value, named: &[&str]) {
    let (mut keys, mut values) = (named.to_vec(), vec![]);
    walk(input, &mut keys, &mut values);
    for c in message.chars().filter(|c| !c.is_ascii() && *c != '…') {
        if values.iter().any(|v| v.contains(c)) && !keys.iter().any(|k| k.contains(c)) {
            panic!("the refusal quotes a value ({c:?} occurs only in values): {message}");
        }
    }
}
