//! A read-only JSON tree that borrows from its text: how a rebuild reads events.
//!
//! `serde_json::Value` keeps objects in an `IndexMap`: every field parsed is hashed (SipHash)
//! and every string copied, though a view reads only a few fields of an event. A rebuild parses
//! every event of the log, and that map was a tenth of its time. [`Json`] keeps an object's
//! fields as a list and its strings as slices of the text (copied only when they hold escapes),
//! and becomes a `Value` only where a view takes a value out of it ([`Json::to_value`]).
//!
//! It reads exactly what `Value` reads: it is parsed by serde_json's own deserializer, numbers
//! are `serde_json::Number`s, and where a field appears twice the last one counts, as in a
//! `Value` (tests compare the two).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// A JSON value borrowing its strings from the text it was parsed from where it can.
#[derive(Clone, Debug, PartialEq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    /// Fields in the order written, repeats included (`get` takes the last, as `Value` does).
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

impl<'a> Json<'a> {
    /// The field `key` of an object: the last one of that name, as in a `Value`, where the
    /// field is written twice.
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        match self {
            Json::Object(fields) => fields.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The same value as a `serde_json::Value`: equal to what `serde_json::from_str` makes of
    /// the same text.
    pub fn to_value(&self) -> Value {
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(n) => Value::Number(n.clone()),
            Json::String(s) => Value::String(s.as_ref().to_owned()),
            Json::Array(items) => Value::Array(items.iter().map(Json::to_value).collect()),
            Json::Object(fields) => {
                let mut m = Map::with_capacity(fields.len());
                for (k, v) in fields {
                    // A repeated field: the last value, in the first one's place (`Value`'s rule).
                    m.insert(k.as_ref().to_owned(), v.to_value());
                }
                Value::Object(m)
            }
        }
    }
}

/// A string that borrows from the text when it has no escapes (serde's `Cow<str>` always copies).
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V(PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Json<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        // Each arm as serde_json's visitor for `Value` does it.
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Json<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any valid JSON value")
            }
            fn visit_bool<E>(self, b: bool) -> Result<Json<'a>, E> {
                Ok(Json::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Json<'a>, E> {
                Ok(Json::Number(n.into()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Json<'a>, E> {
                Ok(Json::Number(n.into()))
            }
            fn visit_f64<E>(self, n: f64) -> Result<Json<'a>, E> {
                Ok(Number::from_f64(n).map_or(Json::Null, Json::Number))
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Json<'a>, E> {
                Ok(Json::String(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Json<'a>, E> {
                Ok(Json::String(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Json<'a>, E> {
                Ok(Json::String(Cow::Owned(s)))
            }
            fn visit_none<E>(self) -> Result<Json<'a>, E> {
                Ok(Json::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Json<'a>, D::Error> {
                Json::deserialize(d)
            }
            fn visit_unit<E>(self) -> Result<Json<'a>, E> {
                Ok(Json::Null)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'a>, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Json::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'a>, A::Error> {
                let mut fields = Vec::new();
                while let Some(Text(k)) = map.next_key()? {
                    fields.push((k, map.next_value()?));
                }
                Ok(Json::Object(fields))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::tests::any_value;
    use proptest::prelude::*;

    /// Every path into `v` (as pointer tokens), and one missing step below each.
    fn paths(v: &Value, here: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        out.push(here.clone());
        let mut missing = here.clone();
        missing.push("no such field".into());
        out.push(missing);
        match v {
            Value::Object(m) => {
                for (k, item) in m {
                    here.push(k.clone());
                    paths(item, here, out);
                    here.pop();
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    here.push(i.to_string());
                    paths(item, here, out);
                    here.pop();
                }
            }
            _ => {}
        }
    }

    fn walk<'j, 'a>(j: &'j Json<'a>, tokens: &[String]) -> Option<&'j Json<'a>> {
        let mut cur = j;
        for t in tokens {
            cur = match cur {
                Json::Object(_) => cur.get(t)?,
                Json::Array(items) => items.get(t.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(cur)
    }

    fn walk_value<'v>(v: &'v Value, tokens: &[String]) -> Option<&'v Value> {
        let mut cur = v;
        for t in tokens {
            cur = match cur {
                Value::Object(m) => m.get(t)?,
                Value::Array(items) => items.get(t.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(cur)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn it_reads_what_a_value_reads(v in any_value()) {
            let text = serde_json::to_string(&v).unwrap();
            let j: Json = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(j.to_value(), v.clone());
            let mut all = vec![];
            paths(&v, &mut vec![], &mut all);
            for p in &all {
                let got = walk(&j, p).map(Json::to_value);
                prop_assert_eq!(got.as_ref(), walk_value(&v, p), "path {:?}", p);
            }
        }
    }

    #[test]
    fn a_repeated_field_reads_as_in_a_value() {
        let text = r#"{"a":1,"b":{"x":1},"a":{"c":2},"b":{"y":2}}"#;
        let v: Value = serde_json::from_str(text).unwrap();
        let j: Json = serde_json::from_str(text).unwrap();
        assert_eq!(j.to_value(), v);
        assert_eq!(serde_json::to_string(&j.to_value()).unwrap(), r#"{"a":{"c":2},"b":{"y":2}}"#);
        assert_eq!(j.get("a").map(Json::to_value).as_ref(), v.get("a"));
        assert_eq!(j.get("b").map(Json::to_value).as_ref(), v.get("b"));
    }

    #[test]
    fn strings_borrow_unless_escaped() {
        let text = r#"{"plain":"abc","escaped":"a\"b\u00e9","k\\ey":1}"#;
        let j: Json = serde_json::from_str(text).unwrap();
        let Json::Object(fields) = &j else { panic!("an object") };
        assert!(matches!(&fields[0].0, Cow::Borrowed("plain")));
        assert!(matches!(&fields[0].1, Json::String(Cow::Borrowed("abc"))));
        assert!(matches!(&fields[1].1, Json::String(Cow::Owned(s)) if s == "a\"bé"));
        assert!(matches!(&fields[2].0, Cow::Owned(k) if k == "k\\ey"));
    }

    #[test]
    fn bad_text_is_refused_as_value_refuses_it() {
        for text in ["", "{", "[1,]", r#"{"a" 1}"#, "nul", "\"\\x\"", "1e999", &"[".repeat(200)] {
            let v = serde_json::from_str::<Value>(text).is_err();
            let j = serde_json::from_str::<Json>(text).is_err();
            assert_eq!(j, v, "{text:?}");
            assert!(j, "{text:?}");
        }
    }
}
