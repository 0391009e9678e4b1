//! The JSON Schemas in `schema/` and the decoder in `src/command/decode.rs` must agree.
//!
//! `deploy/check.sh` validates the same example files against
//! `schema/command.schema.json` (valid ones must pass, invalid ones must fail); this
//! test feeds them to `midas_worker::command::decode` with the shipped `config.toml`.
//! An example on which the two disagree is a contract bug, not a test to bend.
//!
//! It also checks that the reply examples match the `Reply` the worker serialises,
//! and that the config shipped in `deploy/k8s/configmap.yaml` loads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use midas_worker::command::{decode, Reply};
use midas_worker::config::{load_from, Settings};

fn settings() -> Settings {
    load_from(
        include_str!("../../config.toml"),
        &BTreeMap::new(),
        "config.toml",
    )
    .expect("the shipped config.toml loads")
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `*.json` files directly in `dir`, sorted.
fn examples(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let body = std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
            (name, body)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn valid_command_examples_decode() {
    let settings = settings();
    let files = examples(&root().join("schema/examples/valid"));
    assert!(
        files.len() >= 6,
        "expected at least 6 valid examples, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    for (name, body) in &files {
        if let Err(r) = decode(body, &settings) {
            failures.push(format!("{name}: rejected ({}: {})", r.code, r.message));
        }
    }
    assert!(
        failures.is_empty(),
        "valid examples the decoder rejects:\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn invalid_command_examples_are_rejected() {
    let settings = settings();
    let files = examples(&root().join("schema/examples/invalid"));
    assert!(
        files.len() >= 10,
        "expected at least 10 invalid examples, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    for (name, body) in &files {
        match decode(body, &settings) {
            Ok(c) => failures.push(format!("{name}: accepted as {}", c.params.canonical())),
            Err(r) => {
                assert!(
                    ["invalid_command", "unknown_app"].contains(&r.code),
                    "{name}: unexpected rejection code {}",
                    r.code
                );
                assert!(!r.message.is_empty(), "{name}: rejection without a message");
            }
        }
    }
    assert!(
        failures.is_empty(),
        "invalid examples the decoder accepts:\n  {}",
        failures.join("\n  ")
    );
}

/// Every valid reply example is exactly what `Reply` would serialise: same field
/// names, same types, nothing the struct would drop.
#[test]
fn reply_examples_match_the_reply_struct() {
    let files = examples(&root().join("schema/examples/replies/valid"));
    assert!(!files.is_empty(), "no reply examples");
    for (name, body) in &files {
        let reply: Reply = serde_json::from_slice(body)
            .unwrap_or_else(|e| panic!("{name}: does not deserialise as Reply: {e}"));
        let want: serde_json::Value = serde_json::from_slice(body).unwrap();
        let got: serde_json::Value = serde_json::from_slice(&reply.to_bytes()).unwrap();
        assert_eq!(got, want, "{name}: Reply round-trip differs");
    }
}

/// The `config.toml: |` block of `deploy/k8s/configmap.yaml`, de-indented.
fn configmap_config_toml() -> String {
    let yaml = std::fs::read_to_string(root().join("deploy/k8s/configmap.yaml"))
        .expect("deploy/k8s/configmap.yaml");
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "config.toml: |");
    lines
        .next()
        .expect("configmap.yaml has a `config.toml: |` block");
    let block: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.starts_with("    "))
        .collect();
    block
        .iter()
        .map(|l| l.strip_prefix("    ").unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The Kubernetes config loads with the environment the StatefulSet gives it
/// (secrets from `midas-worker-secrets`, production, outbox on the volume).
#[test]
fn kubernetes_configmap_config_loads() {
    let text = configmap_config_toml();
    let env: BTreeMap<String, String> = [
        ("MIDAS_APP_KEY", "k8s-test-app-key"),
        ("WECHAT_APP_SECRET", "k8s-test-app-secret"),
        ("MIDAS_WORKER__MIDAS__ENVIRONMENT", "production"),
        (
            "MIDAS_WORKER__OUTBOX__PATH",
            "/var/lib/midas-worker/outbox.sqlite",
        ),
        ("MIDAS_WORKER__HTTP__LISTEN", "0.0.0.0:9464"),
        (
            "MIDAS_WORKER__BROKER__URL",
            "amqp://midas:secret@rabbitmq:5672/%2f",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if let Err(e) = load_from(&text, &env, "deploy/k8s/configmap.yaml") {
        panic!("deploy/k8s/configmap.yaml config does not load: {e}\n---\n{text}");
    }
    // And the container defaults alone (simulator config, no secrets) load too.
    let env: BTreeMap<String, String> = [
        (
            "MIDAS_WORKER__OUTBOX__PATH",
            "/var/lib/midas-worker/outbox.sqlite",
        ),
        ("MIDAS_WORKER__HTTP__LISTEN", "0.0.0.0:9464"),
        (
            "MIDAS_WORKER__BROKER__URL",
            "amqp://guest:guest@rabbitmq:5672/%2f",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    load_from(include_str!("../../config.toml"), &env, "config.toml")
        .expect("config.toml with the Dockerfile/compose environment loads");
}
