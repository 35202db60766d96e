//! Fingerprints: what a stage's result depends on, as an explicit struct.
//!
//! A stage is fresh when a result is recorded for the digest of its [`Fingerprint`]. The struct
//! (not just its digest) is kept per stage so that `plan` can say *why* a stage is dirty. Items are
//! memoized on [`Fingerprint::item_key`], which leaves out the upstream artifact digests: an item's
//! own input already carries what it depends on, so adding rows to a dataset recomputes only the
//! new rows. It leaves out the stage config too: a stage puts into each item's input exactly the
//! settings that item depends on (a sampler, a model's weights digest), so adding a second model to
//! a stage does not recompute the first model's items. Upstream digests are what make early cutoff work: a rerun stage whose output is
//! byte-identical leaves its dependents' fingerprints, and so their freshness, unchanged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::hash::{Digest, write_canonical};

/// Bump when the store layout or the fingerprint encoding changes.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub format: u32,
    pub kind: String,
    pub plugin_version: u32,
    /// Canonical config of the stage.
    pub config: Value,
    /// Upstream artifact digests by input port.
    pub inputs: BTreeMap<String, Digest>,
    /// Referenced file digests by path as written.
    pub files: BTreeMap<String, Digest>,
    pub seed: u64,
}

/// What an item is memoized on. [`Fingerprint::item_key`] writes its canonical JSON by hand; the
/// tests check the two agree.
#[cfg(test)]
#[derive(Serialize)]
struct ItemKey<'a> {
    format: u32,
    kind: &'a str,
    plugin_version: u32,
    seed: u64,
    item: &'a Value,
}

impl Fingerprint {
    pub fn digest(&self) -> Digest {
        Digest::of(self)
    }

    /// Memo key of one item of this stage.
    /// The digest of [`ItemKey`]'s canonical JSON, written straight from the item's input (a
    /// stage lists a million of them: no copy of each into a `Value` first).
    pub fn item_key(&self, item_input: &Value) -> Digest {
        let mut out = Vec::with_capacity(256);
        // `ItemKey`'s fields in code-point order, as canonical JSON sorts them.
        out.extend_from_slice(format!("{{\"format\":{},\"item\":", self.format).as_bytes());
        write_canonical(item_input, &mut out);
        out.extend_from_slice(b",\"kind\":");
        serde_json::to_writer(&mut out, &self.kind).expect("writing to a Vec cannot fail");
        out.extend_from_slice(format!(",\"plugin_version\":{},\"seed\":{}}}", self.plugin_version, self.seed).as_bytes());
        Digest::of_bytes(&out)
    }

    /// Human reasons why `self` differs from `old`, most specific first. Empty when equal.
    pub fn explain(&self, old: &Fingerprint) -> Vec<String> {
        let mut why = Vec::new();
        if self.format != old.format {
            why.push(format!("store format changed: {} → {}", old.format, self.format));
        }
        if self.kind != old.kind {
            why.push(format!("kind changed: {} → {}", old.kind, self.kind));
        } else if self.plugin_version != old.plugin_version {
            why.push(format!("plugin `{}` changed: version {} → {}", self.kind, old.plugin_version, self.plugin_version));
        }
        let mut changes = Vec::new();
        diff_values("", &old.config, &self.config, &mut changes);
        if !changes.is_empty() {
            why.push(format!("config changed: {}", changes.join(", ")));
        }
        for (name, digest) in &self.inputs {
            match old.inputs.get(name) {
                Some(d) if d == digest => {}
                Some(_) => why.push(format!("input `{name}` changed")),
                None => why.push(format!("new input `{name}`")),
            }
        }
        for name in old.inputs.keys().filter(|n| !self.inputs.contains_key(*n)) {
            why.push(format!("input `{name}` removed"));
        }
        for (path, digest) in &self.files {
            match old.files.get(path) {
                Some(d) if d == digest => {}
                Some(_) => why.push(format!("file `{path}` changed")),
                None => why.push(format!("new file `{path}`")),
            }
        }
        for path in old.files.keys().filter(|p| !self.files.contains_key(*p)) {
            why.push(format!("file `{path}` no longer used"));
        }
        if self.seed != old.seed {
            why.push(format!("seed changed: {} → {}", old.seed, self.seed));
        }
        why
    }
}

/// `path old → new` for every leaf that differs.
fn diff_values(path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    let join = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff_values(&join(k), x, y, out),
                    (None, Some(y)) if !y.is_null() => out.push(format!("{} added ({})", join(k), short(y))),
                    (Some(x), None) if !x.is_null() => out.push(format!("{} removed (was {})", join(k), short(x))),
                    _ => {}
                }
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{} {} → {}", if path.is_empty() { "value" } else { path }, short(a), short(b))),
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 40 { format!("{}…", s.chars().take(39).collect::<String>()) } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fp() -> Fingerprint {
        Fingerprint {
            format: FORMAT_VERSION,
            kind: "infer".into(),
            plugin_version: 1,
            config: json!({"max_tokens": 16, "sampler": {"temperature": 0.0}}),
            inputs: BTreeMap::from([("data".into(), Digest::of_bytes(b"data"))]),
            files: BTreeMap::from([("prompts/a.j2".into(), Digest::of_bytes(b"a"))]),
            seed: 7,
        }
    }

    #[test]
    fn digests_are_pinned() {
        // A changed fingerprint digest makes every user's store and lockfile stale: bump
        // FORMAT_VERSION. A changed item key only orphans memo entries (they are recomputed, never
        // misread): item keys stopped covering files, and FORMAT_VERSION stayed.
        assert_eq!(fp().digest().hex(), "e66baa3bf796036ecd6d9aaa58bb7bb57cd1842170128eb17969e66a9124e5c1");
        assert_eq!(fp().item_key(&json!({"id": "s1", "text": "hi"})).hex(), "7f01424eecfdadabba79a34fbe915380bff6b2674d3a9729d7cc245576022616");
    }

    #[test]
    fn an_item_key_is_the_digest_of_its_struct() {
        let mut f = fp();
        for (kind, item) in [
            ("render", json!({"id": "s1", "fields": {"b": [1, 2.5, null], "a": "x\"y\\z\u{1}é"}, "template": "{{ text }}"})),
            ("weird \"kind\"\n", json!("a string")),
            ("infer", json!(null)),
        ] {
            f.kind = kind.into();
            f.seed = u64::MAX;
            let by_struct = Digest::of(&ItemKey { format: f.format, kind: &f.kind, plugin_version: f.plugin_version, seed: f.seed, item: &item });
            assert_eq!(f.item_key(&item), by_struct, "{kind}");
        }
    }

    #[test]
    fn item_key_is_the_item_input_not_upstream_digests_or_config() {
        let a = fp();
        let mut b = fp();
        b.inputs.insert("data".into(), Digest::of_bytes(b"more rows"));
        let item = json!({"id": "s1"});
        assert_ne!(a.digest(), b.digest());
        assert_eq!(a.item_key(&item), b.item_key(&item));
        b.config = json!({"max_tokens": 32});
        assert_eq!(a.item_key(&item), b.item_key(&item));
        // A stage puts what its items read from files into their inputs: an edited file that
        // changes no item's input (human labels beside a rubric) recomputes no item.
        b.files.insert("labels.jsonl".into(), Digest::of_bytes(b"a label"));
        assert_eq!(a.item_key(&item), b.item_key(&item));
        b.seed = 8;
        assert_ne!(a.item_key(&item), b.item_key(&item));
    }

    #[test]
    fn explains_each_difference() {
        let old = fp();
        let mut new = fp();
        new.config = json!({"max_tokens": 32, "sampler": {"temperature": 0.0}, "stop": ["\n"]});
        new.inputs.insert("data".into(), Digest::of_bytes(b"other"));
        new.files.insert("prompts/a.j2".into(), Digest::of_bytes(b"b"));
        new.seed = 8;
        new.plugin_version = 2;
        assert_eq!(
            new.explain(&old),
            vec![
                "plugin `infer` changed: version 1 → 2",
                "config changed: max_tokens 16 → 32, stop added ([\"\\n\"])",
                "input `data` changed",
                "file `prompts/a.j2` changed",
                "seed changed: 7 → 8",
            ]
        );
        assert!(fp().explain(&fp()).is_empty());
    }
}
