//! `MIDAS_WORKER__SECTION__KEY` environment overrides, and where each value came
//! from (default, the file, or which environment variable) for `check-config`.
//!
//! An override names a key path: `MIDAS_WORKER__BROKER__URL` sets `broker.url`,
//! `MIDAS_WORKER__APPS__1__APPID` sets `apps[1].appid`. A list index may reach one
//! past the entries the file has (or up to [`MAX_ENV_INDEX`]): a typo such as
//! `APPS__99999999999__APPID` is an error, not a request to allocate that many apps.

use std::collections::{BTreeMap, BTreeSet};

use super::{invalid, ConfigError, ENV_PREFIX};

/// The largest list index an override may name when the list is shorter.
pub const MAX_ENV_INDEX: usize = 256;

/// Where an effective value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File,
    /// The environment variable that set it.
    Env(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File => f.write_str("file"),
            Source::Env(name) => f.write_str(name),
        }
    }
}

/// The keys the file set and the keys the environment set, as `section.key` /
/// `apps[0].appid` paths.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    file: BTreeSet<String>,
    env: BTreeMap<String, String>,
    /// `apps[i].app_key` / `apps[i].app_secret`: the variable read, or Default for
    /// the simulator's stand-in.
    secrets: BTreeMap<String, Source>,
}

impl Provenance {
    /// Record every leaf key of the parsed file.
    pub(super) fn from_file(table: &toml::Table) -> Provenance {
        let mut file = BTreeSet::new();
        leaves(table, "", &mut file);
        Provenance {
            file,
            env: BTreeMap::new(),
            secrets: BTreeMap::new(),
        }
    }

    pub(super) fn set_secret(&mut self, key: String, source: Source) {
        self.secrets.insert(key, source);
    }

    /// The resolved secrets (`apps[0].app_key`, …) and where each came from.
    pub fn secrets(&self) -> impl Iterator<Item = (&str, &Source)> {
        self.secrets.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Where `key` (e.g. `broker.url`, `apps[0].zone_id`) came from.
    pub fn source_of(&self, key: &str) -> Source {
        if let Some(s) = self.secrets.get(key) {
            s.clone()
        } else if let Some(var) = self.env.get(key) {
            Source::Env(var.clone())
        } else if self.file.contains(key) {
            Source::File
        } else {
            Source::Default
        }
    }
}

fn leaves(table: &toml::Table, prefix: &str, out: &mut BTreeSet<String>) {
    for (k, v) in table {
        let key = format!("{prefix}{k}");
        match v {
            toml::Value::Table(t) => leaves(t, &format!("{key}."), out),
            toml::Value::Array(items)
                if items.iter().all(|i| i.is_table()) && !items.is_empty() =>
            {
                for (i, item) in items.iter().enumerate() {
                    if let toml::Value::Table(t) = item {
                        leaves(t, &format!("{key}[{i}]."), out);
                    }
                }
            }
            _ => {
                out.insert(key);
            }
        }
    }
}

/// Apply every `MIDAS_WORKER__…` variable of `env` to `root`, recording each in
/// `provenance`. A value keeps the type of the key it replaces; a new key is read
/// as an integer, float or boolean when it looks like one, else a string (string
/// fields accept a number too).
pub(super) fn apply(
    root: &mut toml::Table,
    env: &BTreeMap<String, String>,
    provenance: &mut Provenance,
) -> Result<(), ConfigError> {
    let hints = default_types();
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let parts: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(invalid(name.clone(), "malformed override name"));
        }
        let hint = type_hint(&hints, &parts);
        let key = set_path(root, &parts, raw, "", hint).map_err(|m| invalid(name.clone(), m))?;
        provenance.env.insert(key, name.clone());
    }
    Ok(())
}

/// The default config as a table: for a key the file does not have, the type of its
/// default decides how an override's text is read (`COMMAND_QUEUE=12345` is a name).
fn default_types() -> toml::Table {
    let mut empty = toml::Table::new();
    for section in super::SECTIONS {
        empty.insert(section.into(), toml::Value::Table(toml::Table::new()));
    }
    toml::Value::Table(empty)
        .try_into::<super::Config>()
        .ok()
        .and_then(|c| toml::Table::try_from(&c).ok())
        .unwrap_or_default()
}

/// The default value at `parts` (sections only; list entries have no default).
fn type_hint<'a>(defaults: &'a toml::Table, parts: &[String]) -> Option<&'a toml::Value> {
    let (head, tail) = parts.split_first()?;
    let v = defaults.get(head)?;
    match (v, tail.is_empty()) {
        (_, true) => Some(v),
        (toml::Value::Table(t), false) => type_hint(t, tail),
        _ => None,
    }
}

/// Set `parts` under `table`; returns the key path it set (`apps[1].appid`).
fn set_path(
    table: &mut toml::Table,
    parts: &[String],
    raw: &str,
    prefix: &str,
    hint: Option<&toml::Value>,
) -> Result<String, String> {
    let Some((head, tail)) = parts.split_first() else {
        return Err("empty key".into());
    };
    let here = format!("{prefix}{head}");
    if tail.is_empty() {
        let new = coerce(table.get(head).or(hint), raw);
        table.insert(head.clone(), new);
        return Ok(here);
    }
    let is_index = tail.first().is_some_and(|t| t.parse::<usize>().is_ok());
    let entry = table.entry(head.clone()).or_insert_with(|| {
        if is_index {
            toml::Value::Array(Vec::new())
        } else {
            toml::Value::Table(toml::Table::new())
        }
    });
    match entry {
        toml::Value::Table(t) => set_path(t, tail, raw, &format!("{here}."), hint),
        toml::Value::Array(items) => {
            let Some((index, rest)) = tail.split_first() else {
                return Err(format!("`{here}` is a list: expected an index"));
            };
            let idx: usize = index
                .parse()
                .map_err(|_| format!("`{here}` is a list: expected an index, got `{index}`"))?;
            if idx > items.len() && idx > MAX_ENV_INDEX {
                return Err(format!(
                    "index {idx} is out of range: `{here}` has {} entries; an override may add \
                     the next one (index {}) or use an index up to {MAX_ENV_INDEX}",
                    items.len(),
                    items.len()
                ));
            }
            while items.len() <= idx {
                items.push(toml::Value::Table(toml::Table::new()));
            }
            match items.get_mut(idx) {
                Some(toml::Value::Table(t)) if !rest.is_empty() => {
                    set_path(t, rest, raw, &format!("{here}[{idx}]."), hint)
                }
                _ => Err(format!("cannot set `{here}[{idx}]` as a whole")),
            }
        }
        _ => Err(format!("`{here}` is not a section")),
    }
}

fn coerce(existing: Option<&toml::Value>, raw: &str) -> toml::Value {
    match existing {
        Some(toml::Value::String(_)) => toml::Value::String(raw.to_string()),
        Some(toml::Value::Integer(_)) => raw
            .parse::<i64>()
            .map(toml::Value::Integer)
            .unwrap_or_else(|_| toml::Value::String(raw.to_string())),
        Some(toml::Value::Float(_)) => raw
            .parse::<f64>()
            .map(toml::Value::Float)
            .unwrap_or_else(|_| toml::Value::String(raw.to_string())),
        Some(toml::Value::Boolean(_)) => match raw {
            "true" => toml::Value::Boolean(true),
            "false" => toml::Value::Boolean(false),
            _ => toml::Value::String(raw.to_string()),
        },
        _ => {
            if let Ok(i) = raw.parse::<i64>() {
                toml::Value::Integer(i)
            } else if let Ok(f) = raw.parse::<f64>() {
                toml::Value::Float(f)
            } else if raw == "true" || raw == "false" {
                toml::Value::Boolean(raw == "true")
            } else {
                toml::Value::String(raw.to_string())
            }
        }
    }
}
