//! What `check-config` prints: every effective key with its value and where the
//! value came from (`default`, `file`, or the environment variable that set it), as
//! a table for people or JSON for machines.
//!
//! Values are taken from the effective config's `Serialize` output, so a secret
//! prints the way its type serializes (`***`, URLs with the password masked), never
//! its value. Key order is the config's own (section by section, as declared).

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::{Environment, Settings, Source};

/// One effective key.
#[derive(Debug, Clone)]
pub struct Entry {
    /// `broker.url`, `apps[0].appid`.
    pub key: String,
    pub value: Value,
    pub source: Source,
}

/// A serialized value with map order kept (serde_json's `Value` sorts keys).
enum Node {
    Leaf(Value),
    Map(Vec<(String, Node)>),
    Seq(Vec<Node>),
}

impl Node {
    fn into_value(self) -> Value {
        match self {
            Node::Leaf(v) => v,
            Node::Map(kv) => {
                Value::Object(kv.into_iter().map(|(k, v)| (k, v.into_value())).collect())
            }
            Node::Seq(items) => Value::Array(items.into_iter().map(Node::into_value).collect()),
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
                Ok(Node::Leaf(Value::Bool(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
                Ok(Node::Leaf(Value::from(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
                Ok(Node::Leaf(Value::from(v)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
                Ok(Node::Leaf(Value::from(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
                Ok(Node::Leaf(Value::String(v.to_string())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Leaf(Value::Null))
            }
            fn visit_none<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Leaf(Value::Null))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                Node::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Node>()? {
                    items.push(item);
                }
                Ok(Node::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut kv = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Node>()? {
                    kv.push((k, v));
                }
                Ok(Node::Map(kv))
            }
        }
        d.deserialize_any(V)
    }
}

fn flatten(node: Node, key: &str, out: &mut Vec<(String, Value)>) {
    match node {
        Node::Map(kv) => {
            for (k, v) in kv {
                let sub = if key.is_empty() {
                    k
                } else {
                    format!("{key}.{k}")
                };
                flatten(v, &sub, out);
            }
        }
        Node::Seq(items)
            if !items.is_empty() && items.iter().all(|i| matches!(i, Node::Map(_))) =>
        {
            for (i, item) in items.into_iter().enumerate() {
                flatten(item, &format!("{key}[{i}]"), out);
            }
        }
        other => out.push((key.to_string(), other.into_value())),
    }
}

/// Every effective key in config order, each app followed by its resolved secrets
/// (masked, with the variable they were read from): AppKey and AppSecret, and the
/// sandbox AppKey, push Token and EncodingAESKey of an app that names them.
pub fn entries(s: &Settings) -> Vec<Entry> {
    let mut flat = Vec::new();
    // serde_json writes fields in declaration order; Node keeps it
    match serde_json::to_string(&s.config).map(|t| serde_json::from_str::<Node>(&t)) {
        Ok(Ok(node)) => flatten(node, "", &mut flat),
        Ok(Err(e)) | Err(e) => flat.push(("error".into(), Value::String(e.to_string()))),
    }
    let mut out: Vec<Entry> = Vec::with_capacity(flat.len() + 2 * s.apps.len());
    let entry = |key: String, value: Value| Entry {
        source: s.provenance.source_of(&key),
        key,
        value,
    };
    let mut iter = flat.into_iter().peekable();
    while let Some((key, value)) = iter.next() {
        let app = key
            .strip_prefix("apps[")
            .and_then(|r| r.split_once(']'))
            .map(|(i, _)| i.to_string());
        out.push(entry(key, value));
        if let Some(i) = app {
            let next_same = iter
                .peek()
                .is_some_and(|(k, _)| k.starts_with(&format!("apps[{i}]")));
            if !next_same {
                for field in secret_fields(s, &i) {
                    let k = format!("apps[{i}].{field}");
                    let shown = match s.provenance.source_of(&k) {
                        Source::Env(_) => "***",
                        _ => "(simulator stand-in)",
                    };
                    out.push(entry(k, Value::String(shown.into())));
                }
            }
        }
    }
    out
}

/// The secrets an app reads from the environment: its AppKey and AppSecret, and
/// (2.0 apps) the sandbox AppKey, the push Token and the EncodingAESKey when the
/// app names their variables.
fn secret_fields(s: &Settings, index: &str) -> Vec<&'static str> {
    let mut fields = vec!["app_key", "app_secret"];
    if let Some(a) = index
        .parse::<usize>()
        .ok()
        .and_then(|n| s.config.apps.get(n))
    {
        for (var, field) in [
            (&a.sandbox_app_key_env, "sandbox_app_key"),
            (&a.push_token_env, "push_token"),
            (&a.push_aes_key_env, "push_aes_key"),
        ] {
            if var.is_some() {
                fields.push(field);
            }
        }
    }
    fields
}

/// Remarks worth a line in `check-config` that do not make the config bad.
pub fn notes(s: &Settings) -> Vec<String> {
    let mut notes = Vec::new();
    if s.provenance.source_of("midas.environment") == super::Source::Default {
        notes.push(
            "midas.environment is not set: `run` refuses to start until it is \
             (\"simulator\", \"sandbox\" or \"production\", in the file or \
             MIDAS_WORKER__MIDAS__ENVIRONMENT); the other verbs take \"simulator\""
                .to_string(),
        );
    }
    if s.config.midas.environment == Environment::Simulator {
        notes.push(
            "midas.environment is \"simulator\": Midas calls go to the embedded simulator, \
             no real currency moves"
                .to_string(),
        );
        if !super::broker_is_loopback(&s.config.broker.url) {
            notes.push(format!(
                "broker.url is not a loopback address: `run` refuses simulator mode there unless \
                 given --allow-simulator-on-shared-broker or {}=1",
                super::ENV_ALLOW_SIMULATOR
            ));
        }
    }
    let takes_pushes: Vec<&str> = s
        .config
        .apps
        .iter()
        .filter(|a| a.push_token_env.is_some())
        .map(|a| a.appid.as_str())
        .collect();
    match (s.config.push.listen, takes_pushes.is_empty()) {
        (Some(_), true) => notes.push(
            "push.listen is set but no app has push_token_env: every push is refused".to_string(),
        ),
        (None, false) => notes.push(format!(
            "{} {} push_token_env but push.listen is not set: no push is received",
            takes_pushes.join(", "),
            if takes_pushes.len() == 1 {
                "has"
            } else {
                "have"
            }
        )),
        _ => {}
    }
    notes
}

fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "(unset)".into(),
        other => other.to_string(),
    }
}

/// The people's form: a `KEY  VALUE  SOURCE` table, then notes and problems.
pub fn render_table(s: &Settings, problems: &[String]) -> String {
    let rows = entries(s);
    let kw = rows.iter().map(|e| e.key.len()).max().unwrap_or(3).max(3);
    let vw = rows
        .iter()
        .map(|e| shown(&e.value).chars().count())
        .max()
        .unwrap_or(5)
        .clamp(5, 48);
    let mut out = format!("config file: {}\n", s.source);
    out.push_str(&format!("{:kw$}  {:vw$}  SOURCE\n", "KEY", "VALUE"));
    for e in &rows {
        out.push_str(&format!(
            "{:kw$}  {:vw$}  {}\n",
            e.key,
            shown(&e.value),
            e.source
        ));
    }
    for n in notes(s) {
        out.push_str(&format!("note: {n}\n"));
    }
    for p in problems {
        out.push_str(&format!("{p}\n"));
    }
    if problems.is_empty() {
        out.push_str("config OK\n");
    }
    out
}

/// The machines' form: `{"config_file", "ok", "keys": [{key, value, source}], "notes", "problems"}`.
pub fn render_json(s: &Settings, problems: &[String]) -> String {
    let keys: Vec<Value> = entries(s)
        .into_iter()
        .map(|e| {
            serde_json::json!({
                "key": e.key,
                "value": e.value,
                "source": e.source.to_string(),
            })
        })
        .collect();
    let doc = serde_json::json!({
        "config_file": s.source,
        "ok": problems.is_empty(),
        "keys": keys,
        "notes": notes(s),
        "problems": problems,
    });
    serde_json::to_string_pretty(&doc)
        .unwrap_or_else(|e| format!("{{\"error\":{:?}}}", e.to_string()))
}
