//! A synthetic register in the sample's shape, for load tests and benchmarks: deterministic
//! for a seed, valid against the shipped schemas, any size, written as a stream.

use std::io::Write;

use serde_json::{json, Value};
use uuid::Uuid;

/// splitmix64: small, fast, good enough to vary test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len() as u64) as usize]
    }
}

const FIRST: &[&str] =
    &["Erik", "Anna", "Lars", "Maria", "Karl", "Eva", "Johan", "Sara", "Oscar", "Ingrid", "Linnea", "Nils"];
const LAST: &[&str] = &[
    "Andersson",
    "Johansson",
    "Karlsson",
    "Nilsson",
    "Eriksson",
    "Larsson",
    "Olsson",
    "Persson",
    "Svensson",
    "Lindqvist",
];
const STREET: &[&str] =
    &["Backvägen", "Storgatan", "Kyrkogatan", "Parkvägen", "Ängsstigen", "Björktorget", "Villagatan"];
const CITY: &[&str] = &["Stockholm", "Göteborg", "Malmö", "Uppsala", "Västerås", "Örebro", "Linköping", "Umeå"];

/// The subject id of subject number `n` under `seed`.
pub fn subject_id(seed: u64, n: u64) -> Uuid {
    let mut r = Rng::new(seed ^ n.wrapping_mul(0xA24B_AED4_963E_E407));
    uuid::Builder::from_random_bytes(((r.next_u64() as u128) << 64 | r.next_u64() as u128).to_be_bytes()).into_uuid()
}

fn address(r: &mut Rng) -> Value {
    json!({"street": format!("{} {}", r.pick(STREET), 1 + r.below(200)), "postal_code": format!("{:05}", 10000 + r.below(89999)), "city": r.pick(CITY)})
}

fn name(r: &mut Rng) -> String {
    format!("{} {}", r.pick(FIRST), r.pick(LAST))
}

/// Event `i` of a register with `subjects` subjects: the first `subjects` events register them.
pub fn event(seed: u64, subjects: u64, i: u64) -> Value {
    let mut r = Rng::new(seed.wrapping_mul(31).wrapping_add(i));
    let subjects = subjects.max(1);
    let n = if i < subjects { i } else { r.below(subjects) };
    let day = 1 + r.below(28);
    let date = format!("20{:02}-{:02}-{:02}", 19 + r.below(7), 1 + r.below(12), day);
    let (t, data) = if i < subjects {
        let person = r.below(4) != 0;
        let mut d = json!({
            "kind": if person { "person" } else { "company" },
            "name": if person { name(&mut r) } else { format!("{} AB", r.pick(LAST)) },
            "email": format!("user{}.{}@example.com", n, r.below(1000)),
            "phone": format!("08-{:03} {:02} {:02}", r.below(1000), r.below(100), r.below(100)),
            "address": address(&mut r),
        });
        if person {
            d["personal_number"] =
                json!(format!("19{:02}{:02}{:02}-{:04}", 40 + r.below(60), 1 + r.below(12), day, r.below(10000)));
        } else {
            d["org_number"] = json!(format!("55{:04}-{:04}", r.below(10000), r.below(10000)));
            d["contact_person"] = json!(name(&mut r));
        }
        ("customer.registered", d)
    } else {
        let project = format!("P20{:02}-{:05}-{}", 19 + r.below(7), n % 100_000, r.below(5));
        match r.below(10) {
            0 => (
                "customer.contact_changed",
                json!({"email": format!("new{}.{}@example.org", n, r.below(1000)), "address": address(&mut r)}),
            ),
            1 => ("consent.given", json!({"purpose": "newsletter", "channel": "email"})),
            2 => (
                "project.opened",
                json!({"project_id": project, "title": format!("Tillbyggnad {}", r.pick(STREET)), "property_designation": format!("{} {}:{}", r.pick(CITY), 1 + r.below(50), 1 + r.below(300)), "site_address": address(&mut r)}),
            ),
            3..=5 => (
                "drawing.registered",
                json!({"project_id": project, "drawing_id": format!("A-{:02}", 1 + r.below(5)), "title": "Planritning", "revision": r.pick(&["A", "B", "C"]), "file_name": format!("{project}-A0{}.pdf", 1 + r.below(5)), "content_hash": format!("{:016x}{:016x}{:016x}{:016x}", r.next_u64(), r.next_u64(), r.next_u64(), r.next_u64())}),
            ),
            6 | 7 => {
                let net = 100_000 * (1 + r.below(500));
                (
                    "invoice.issued",
                    json!({"invoice_number": format!("{}{:07}", 2019 + r.below(7), i % 10_000_000), "project_id": project, "issued_on": date, "due_on": date, "currency": "SEK", "lines": [{"description": "Arkitekttjänster", "hours": net / 110_000, "amount_ore": net}], "net_ore": net, "vat_ore": net / 4, "total_ore": net + net / 4, "billing_address": address(&mut r)}),
                )
            }
            8 => (
                "invoice.paid",
                json!({"invoice_number": format!("{}", 20_190_000_000 + r.below(1_000_000)), "paid_on": date, "amount_ore": 100_000 * (1 + r.below(500))}),
            ),
            _ => ("note.added", json!({"text": format!("Ringde {} angående ritningarna.", r.pick(FIRST))})),
        }
    };
    json!({"subject": subject_id(seed, n), "type": t, "occurred_at": date, "data": data})
}

pub fn write(out: &mut impl Write, events: u64, subjects: u64, seed: u64) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::with_capacity(1 << 16, out);
    for i in 0..events {
        serde_json::to_writer(&mut w, &event(seed, subjects, i))?;
        w.write_all(b"\n")?;
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_events_satisfy_the_schemas() {
        let schemas = crate::schema::Schemas::builtin();
        for i in 0..3000 {
            let e = event(7, 500, i);
            let t = e["type"].as_str().unwrap();
            if let Err(v) = schemas.validate(t, &e["data"]) {
                panic!("event {i} ({t}): {v}\n{e}");
            }
        }
        assert_eq!(event(7, 500, 42), event(7, 500, 42));
    }
}
