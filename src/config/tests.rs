//! Unit tests of config loading: defaults, overrides and their limits, masking,
//! `check-config` output and the pre-run refusals.

use super::*;

const SHIPPED: &str = include_str!("../../config.toml");
const MINIMAL: &str = include_str!("../../examples/minimal.toml");

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn source(s: &Settings, key: &str) -> String {
    show::entries(s)
        .into_iter()
        .find(|e| e.key == key)
        .map(|e| e.source.to_string())
        .unwrap_or_else(|| panic!("no key {key}"))
}

fn value(s: &Settings, key: &str) -> serde_json::Value {
    show::entries(s)
        .into_iter()
        .find(|e| e.key == key)
        .map(|e| e.value)
        .unwrap_or_else(|| panic!("no key {key}"))
}

#[test]
fn shipped_config_loads_without_secrets() {
    let s = load_from(SHIPPED, &env(&[]), "config.toml").unwrap();
    assert_eq!(s.config.midas.environment, Environment::Simulator);
    assert_eq!(s.config.retry.initial.0, Duration::from_millis(500));
    assert_eq!(s.apps.len(), 1);
}

#[test]
fn a_file_with_only_apps_gets_the_contract_defaults() {
    let s = load_from(MINIMAL, &env(&[]), "minimal.toml").unwrap();
    let c = &s.config;
    assert_eq!(c.broker.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
    assert_eq!(c.broker.command_queue, "midas.commands");
    assert_eq!(c.broker.reply_queue, "midas.results");
    assert_eq!(c.broker.dead_letter_queue, "midas.commands.dead");
    assert_eq!(c.broker.prefetch, 256);
    assert_eq!(c.broker.max_command_bytes, 65536);
    assert_eq!(c.outbox.path, PathBuf::from("data/outbox.sqlite"));
    assert!(c.outbox.url.is_none());
    assert_eq!(c.outbox.retention.to_string(), "90d");
    assert_eq!(c.midas.environment, Environment::Simulator);
    assert_eq!(c.midas.base_url, "https://api.weixin.qq.com");
    assert_eq!(c.midas.request_timeout.to_string(), "5s");
    assert_eq!(c.midas.max_in_flight, 128);
    assert_eq!(c.midas.max_rps, 500);
    assert!(c.midas.mp_sig);
    assert_eq!(c.retry.initial.to_string(), "500ms");
    assert_eq!(c.retry.max.to_string(), "5m");
    assert_eq!(c.retry.give_up_after.to_string(), "24h");
    assert_eq!(c.retry.balance_give_up_after.to_string(), "30s");
    assert_eq!(c.http.listen.to_string(), "127.0.0.1:9464");
    assert_eq!(s.apps[0].zone_id, "1");
    assert_eq!(s.apps[0].pf, "android");
    assert_eq!(s.apps[0].api, ApiVersion::V1);
    assert_eq!(s.apps[0].default_user_ip, None);
    // and they say so
    assert_eq!(source(&s, "broker.url"), "default");
    assert_eq!(source(&s, "apps[0].appid"), "file");
    assert_eq!(source(&s, "apps[0].zone_id"), "default");
    // the shipped config.toml and the defaults agree on every key
    let shipped = load_from(SHIPPED, &env(&[]), "config.toml").unwrap();
    let (a, b) = (show::entries(&s), show::entries(&shipped));
    let pairs = |v: Vec<show::Entry>| -> Vec<(String, serde_json::Value)> {
        v.into_iter().map(|e| (e.key, e.value)).collect()
    };
    let (a, b) = (pairs(a), pairs(b));
    for (key, v) in &b {
        let d = a.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        // the example app's zone/pf/api are written out in config.toml
        assert_eq!(d, Some(v), "config.toml and the default differ on {key}");
    }
}

#[test]
fn the_shipped_config_lists_every_key() {
    let s = load_from(SHIPPED, &env(&[]), "config.toml").unwrap();
    // a key is listed when it is set in the file, or written there as a comment
    // (`# url = …`: optional keys without a value, defaults that depend on others)
    let commented = |key: &str| {
        let leaf = key.rsplit('.').next().unwrap_or(key);
        SHIPPED
            .lines()
            .any(|l| l.trim_start().starts_with(&format!("# {leaf} =")))
    };
    for e in show::entries(&s) {
        // secrets are never in the file
        if e.key.ends_with(".app_key") || e.key.ends_with(".app_secret") {
            continue;
        }
        assert!(
            e.source == Source::File || commented(&e.key),
            "{} is not listed in config.toml",
            e.key
        );
    }
    for key in [
        "outbox.url",
        "outbox.max_size_mb",
        "apps[0].default_user_ip",
    ] {
        assert!(commented(key), "{key}");
    }
}

#[test]
fn unknown_keys_stay_errors_in_a_minimal_file() {
    let text = format!("{MINIMAL}\n[broker]\nprefech = 10\n");
    let e = load_from(&text, &env(&[]), "t").unwrap_err().to_string();
    assert!(e.contains("broker") && e.contains("prefech"), "{e}");
    assert!(!e.contains('\n'));
    let e = load_from(MINIMAL, &env(&[("MIDAS_WORKER__OUTBOX__PAHT", "x")]), "t")
        .unwrap_err()
        .to_string();
    assert!(e.contains("pah"), "{e}");
    let e = load_from("", &env(&[]), "t").unwrap_err().to_string();
    assert!(e.contains("apps") && e.contains("at least one"), "{e}");
}

#[test]
fn env_overrides_keep_types() {
    let s = load_from(
        SHIPPED,
        &env(&[
            ("MIDAS_WORKER__BROKER__URL", "amqp://u:p@h:1/%2f"),
            ("MIDAS_WORKER__BROKER__PREFETCH", "10"),
            ("MIDAS_WORKER__APPS__0__OFFER_ID", "999"),
            ("MIDAS_WORKER__RETRY__MAX", "10s"),
            ("MIDAS_WORKER__MIDAS__MP_SIG", "false"),
        ]),
        "t",
    )
    .unwrap();
    assert_eq!(s.config.broker.url.expose(), "amqp://u:p@h:1/%2f");
    assert_eq!(s.config.broker.prefetch, 10);
    assert_eq!(s.config.apps[0].offer_id, "999");
    assert_eq!(s.config.retry.max.0, Duration::from_secs(10));
    assert!(!s.config.midas.mp_sig);
    // a second app entirely from the environment, numeric-looking ids stay text
    let s = load_from(
        SHIPPED,
        &env(&[
            ("MIDAS_WORKER__APPS__1__APPID", "wx7654321"),
            ("MIDAS_WORKER__APPS__1__OFFER_ID", "87654321"),
            ("MIDAS_WORKER__APPS__1__APP_KEY_ENV", "KEY2"),
            ("MIDAS_WORKER__APPS__1__APP_SECRET_ENV", "SECRET2"),
            ("MIDAS_WORKER__APPS__1__ZONE_ID", "2"),
            ("MIDAS_WORKER__APPS__1__API", "v2"),
        ]),
        "t",
    )
    .unwrap();
    assert_eq!(s.apps[1].offer_id, "87654321");
    assert_eq!(s.apps[1].zone_id, "2");
    assert_eq!(s.apps[1].api, ApiVersion::V2);
    assert_eq!(
        source(&s, "apps[1].zone_id"),
        "MIDAS_WORKER__APPS__1__ZONE_ID"
    );
    assert_eq!(source(&s, "apps[1].pf"), "default");
}

#[test]
fn env_overrides_work_for_defaulted_keys() {
    let s = load_from(
        MINIMAL,
        &env(&[
            ("MIDAS_WORKER__BROKER__MAX_COMMAND_BYTES", "1024"),
            ("MIDAS_WORKER__RETRY__BALANCE_GIVE_UP_AFTER", "1m"),
            ("MIDAS_WORKER__HTTP__LISTEN", "0.0.0.0:9000"),
            ("MIDAS_WORKER__MIDAS__ENVIRONMENT", "sandbox"),
            ("MIDAS_APP_KEY", "k"),
            ("WECHAT_APP_SECRET", "s"),
        ]),
        "t",
    )
    .unwrap();
    assert_eq!(s.config.broker.max_command_bytes, 1024);
    // a key the file does not have is read with its default's type
    let s2 = load_from(
        MINIMAL,
        &env(&[
            ("MIDAS_WORKER__BROKER__COMMAND_QUEUE", "12345"),
            ("MIDAS_WORKER__SIMULATOR__BUSY_RATE", "1"),
            ("MIDAS_WORKER__LOG__LEVEL", "debug"),
        ]),
        "t",
    )
    .unwrap();
    assert_eq!(s2.config.broker.command_queue, "12345");
    assert_eq!(s2.config.simulator.busy_rate, 1.0);
    assert_eq!(s.config.retry.balance_give_up_after.to_string(), "1m");
    assert_eq!(s.config.http.listen.port(), 9000);
    assert_eq!(s.config.midas.environment, Environment::Sandbox);
    assert_eq!(
        source(&s, "broker.max_command_bytes"),
        "MIDAS_WORKER__BROKER__MAX_COMMAND_BYTES"
    );
    assert_eq!(source(&s, "apps[0].app_key"), "MIDAS_APP_KEY");
    assert_eq!(value(&s, "apps[0].app_key"), "***");
    // apps entirely from the environment, no [[apps]] in the file
    let s = load_from(
        "",
        &env(&[
            ("MIDAS_WORKER__APPS__0__APPID", "wx1"),
            ("MIDAS_WORKER__APPS__0__OFFER_ID", "1"),
            ("MIDAS_WORKER__APPS__0__APP_KEY_ENV", "K"),
            ("MIDAS_WORKER__APPS__0__APP_SECRET_ENV", "S"),
        ]),
        "t",
    )
    .unwrap();
    assert_eq!(s.apps[0].appid, "wx1");
}

#[test]
fn an_env_override_index_is_capped() {
    let e = load_from(
        SHIPPED,
        &env(&[("MIDAS_WORKER__APPS__99999999999__APPID", "wx9")]),
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("MIDAS_WORKER__APPS__99999999999__APPID") && e.contains("out of range"),
        "{e}"
    );
    assert!(!e.contains('\n'));
    let e = load_from(
        SHIPPED,
        &env(&[("MIDAS_WORKER__APPS__257__APPID", "wx9")]),
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("out of range"), "{e}");
    // up to 256 is allowed (the gap then fails validation as incomplete apps)
    let e = load_from(
        SHIPPED,
        &env(&[("MIDAS_WORKER__APPS__256__APPID", "wx9")]),
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(!e.contains("out of range") && e.contains("apps[1]"), "{e}");
}

#[test]
fn errors_name_the_key() {
    let e = load_from(SHIPPED, &env(&[("MIDAS_WORKER__BROKER__URLL", "x")]), "t")
        .unwrap_err()
        .to_string();
    assert!(e.contains("broker") && e.contains("urll"), "{e}");
    let e = load_from(SHIPPED, &env(&[("MIDAS_WORKER__RETRY__MAX", "soon")]), "t")
        .unwrap_err()
        .to_string();
    assert!(e.contains("retry.max"), "{e}");
    let e = load_from(
        SHIPPED,
        &env(&[("MIDAS_WORKER__RETRY__GIVE_UP_AFTER", "48h")]),
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("retry.give_up_after"), "{e}");
    let e = load_from(
        SHIPPED,
        &env(&[("MIDAS_WORKER__MIDAS__ENVIRONMENT", "production")]),
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("apps[0].app_key_env") && e.contains("MIDAS_APP_KEY"),
        "{e}"
    );
    assert!(!e.contains('\n'));
    for (var, val, key) in [
        ("MIDAS_WORKER__APPS__0__API", "v3", "apps[0].api"),
        (
            "MIDAS_WORKER__APPS__0__DEFAULT_USER_IP",
            "not-an-ip",
            "apps[0].default_user_ip",
        ),
        (
            "MIDAS_WORKER__BROKER__MAX_COMMAND_BYTES",
            "0",
            "broker.max_command_bytes",
        ),
        (
            "MIDAS_WORKER__RETRY__BALANCE_GIVE_UP_AFTER",
            "0s",
            "retry.balance_give_up_after",
        ),
        ("MIDAS_WORKER__OUTBOX__URL", "mysql://x", "outbox.url"),
    ] {
        let e = load_from(MINIMAL, &env(&[(var, val)]), "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{var}={val}: {e}");
    }
}

#[test]
fn a_v2_app_is_accepted() {
    let text = r#"
[[apps]]
appid = "wx2"
offer_id = "2"
app_key_env = "K"
app_secret_env = "S"
api = "v2"
default_user_ip = "203.0.113.7"
"#;
    let s = load_from(text, &env(&[]), "t").unwrap();
    assert_eq!(s.apps[0].api, ApiVersion::V2);
    assert_eq!(s.apps[0].default_user_ip.as_deref(), Some("203.0.113.7"));
    assert_eq!(value(&s, "apps[0].api"), "v2");
}

const BROKER_PW: &str = "brokerpw-s3cret";
const PG_PW: &str = "pgpw-s3cret";

fn secret_env() -> BTreeMap<String, String> {
    env(&[
        ("MIDAS_WORKER__MIDAS__ENVIRONMENT", "sandbox"),
        ("MIDAS_APP_KEY", "very-secret-app-key"),
        ("WECHAT_APP_SECRET", "very-secret-app-secret"),
        (
            "MIDAS_WORKER__BROKER__URL",
            "amqp://worker:brokerpw-s3cret@rabbit.internal:5672/%2f",
        ),
        (
            "MIDAS_WORKER__OUTBOX__URL",
            "postgres://midas:pgpw-s3cret@db.internal:5432/midas?password=pgpw-s3cret",
        ),
    ])
}

#[test]
fn secrets_and_url_passwords_are_masked_everywhere() {
    // a lease too short for the timeout: check-config has a problem to show too
    let mut e = secret_env();
    e.insert("MIDAS_WORKER__OUTBOX__LEASE".into(), "8s".into());
    let s = load_from(SHIPPED, &e, "t").unwrap();
    let problems: Vec<String> = unavailable(&s)
        .err()
        .map(|e| e.to_string())
        .into_iter()
        .collect();
    assert_eq!(problems.len(), 1);
    let outputs = [
        format!("{s:?}"),
        format!("{:?}", s.config),
        format!("{:?}", s.config.broker),
        format!("{:?}", s.config.outbox),
        format!("{}", s.config.broker.url),
        show::render_table(&s, &problems),
        show::render_json(&s, &problems),
        problems.join("\n"),
    ];
    for out in &outputs {
        for secret in ["very-secret", BROKER_PW, PG_PW] {
            assert!(!out.contains(secret), "{secret} leaked: {out}");
        }
    }
    let table = &outputs[5];
    assert!(
        table.contains("amqp://worker:***@rabbit.internal:5672/%2f"),
        "{table}"
    );
    assert!(
        table.contains("postgres://midas:***@db.internal:5432/midas"),
        "{table}"
    );
    assert_eq!(s.apps[0].app_key.expose(), "very-secret-app-key");
    assert!(s.config.broker.url.expose().contains(BROKER_PW));
}

#[test]
fn a_url_under_the_wrong_key_is_masked_in_the_error() {
    let e = load_from(
        MINIMAL,
        &env(&[(
            "MIDAS_WORKER__MIDAS__ENVIRONMENT",
            "amqp://u:wrongkey-s3cret@h/%2f",
        )]),
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("midas.environment") && !e.contains("wrongkey-s3cret"),
        "{e}"
    );
}

#[test]
fn a_postgres_outbox_needs_a_lease_that_covers_a_call() {
    let s = load_from(SHIPPED, &secret_env(), "t").unwrap();
    assert!(
        unavailable(&s).is_ok(),
        "the default lease covers the default timeout"
    );
    let mut e = secret_env();
    e.insert("MIDAS_WORKER__OUTBOX__LEASE".into(), "8s".into());
    let s = load_from(SHIPPED, &e, "t").unwrap();
    let e = unavailable(&s).unwrap_err().to_string();
    assert!(
        e.contains("outbox.lease") && !e.contains('\n') && !e.contains(PG_PW),
        "{e}"
    );
    assert!(run_preflight(&s, true, &env(&[])).is_err());
}

/// The rule in docs/config.md: lease ≥ 1.5 × (request_timeout + 3.5 s). The old
/// minimum (1.5 × (request_timeout + 2 s)) left marks refused near the end of
/// every renewal period, and is refused now.
#[test]
fn the_minimum_lease_leaves_the_fence_margin_after_the_latest_renewal() {
    let lease_for = |timeout: &str, lease: &str| {
        let mut e = secret_env();
        e.insert(
            "MIDAS_WORKER__MIDAS__REQUEST_TIMEOUT".into(),
            timeout.into(),
        );
        e.insert("MIDAS_WORKER__OUTBOX__LEASE".into(), lease.into());
        let s = load_from(SHIPPED, &e, "t").unwrap();
        unavailable(&s).is_ok()
    };
    assert!(!lease_for("1s", "4500ms"), "the old minimum for 1 s");
    assert!(!lease_for("1s", "6749ms"));
    assert!(lease_for("1s", "6750ms"));
    assert!(lease_for("5s", "12750ms") && !lease_for("5s", "12s"));
    // whatever the timeout, the lease left just before the latest renewal covers
    // a call and its margin
    for t in [1u64, 2, 5, 10, 30] {
        let t = Duration::from_secs(t);
        let lease = min_lease(t);
        let latest = lease / 3 + LEASE_RENEW_DELAY;
        assert!(lease - latest >= t + LEASE_CALL_MARGIN, "{t:?}");
    }
}

#[test]
fn check_config_shows_values_as_written_with_their_sources() {
    let s = load_from(
        SHIPPED,
        &env(&[("MIDAS_WORKER__RETRY__GIVE_UP_AFTER", "36h")]),
        "config.toml",
    )
    .unwrap();
    let table = show::render_table(&s, &[]);
    let line = |key: &str| -> Vec<String> {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("no {key} in {table}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    assert_eq!(
        line("outbox.retention"),
        ["outbox.retention", "90d", "file"]
    );
    assert_eq!(
        line("retry.give_up_after"),
        [
            "retry.give_up_after",
            "36h",
            "MIDAS_WORKER__RETRY__GIVE_UP_AFTER"
        ]
    );
    assert_eq!(line("outbox.url"), ["outbox.url", "(unset)", "default"]);
    assert_eq!(
        line("apps[0].app_key"),
        ["apps[0].app_key", "(simulator", "stand-in)", "default"]
    );
    assert!(table.ends_with("config OK\n"), "{table}");
    let json: serde_json::Value = serde_json::from_str(&show::render_json(&s, &[])).unwrap();
    assert_eq!(json["ok"], true);
    let keys = json["keys"].as_array().unwrap();
    assert_eq!(keys[0]["key"], "broker.url");
    let retention = keys
        .iter()
        .find(|k| k["key"] == "outbox.retention")
        .unwrap();
    assert_eq!(retention["value"], "90d");
    assert_eq!(retention["source"], "file");
    let prefetch = keys.iter().find(|k| k["key"] == "broker.prefetch").unwrap();
    assert_eq!(prefetch["value"], 256);
}

#[test]
fn simulator_mode_refuses_a_shared_broker() {
    let with = |url: &str| {
        let e = env(&[
            ("MIDAS_WORKER__BROKER__URL", url),
            ("MIDAS_WORKER__MIDAS__ENVIRONMENT", "simulator"),
        ]);
        load_from(MINIMAL, &e, "t").unwrap()
    };
    let shared = with("amqp://u:p4ss@10.255.255.1:5672/%2f");
    let e = run_preflight(&shared, false, &env(&[]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("simulator")
            && e.contains("10.255.255.1")
            && e.contains("--allow-simulator-on-shared-broker"),
        "{e}"
    );
    assert!(!e.contains("p4ss") && !e.contains('\n'));
    assert!(run_preflight(&shared, true, &env(&[])).is_ok());
    assert!(run_preflight(&shared, false, &env(&[(ENV_ALLOW_SIMULATOR, "1")])).is_ok());
    assert!(run_preflight(&shared, false, &env(&[(ENV_ALLOW_SIMULATOR, "0")])).is_err());
    for url in [
        "amqp://rabbitmq:5672/%2f",
        "amqp://u:p@example.com/%2f",
        "amqp://u:p@localhost.evil.com/x",
    ] {
        assert!(
            run_preflight(&with(url), false, &env(&[])).is_err(),
            "{url}"
        );
    }
    for url in [
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        "amqp://guest:guest@localhost:5672/%2f",
        "amqp://127.0.0.2/%2f",
        "amqp://u:p@[::1]:5672/%2f",
    ] {
        assert!(run_preflight(&with(url), false, &env(&[])).is_ok(), "{url}");
    }
    // not in simulator mode: any broker
    let prod = load_from(
        MINIMAL,
        &env(&[
            (
                "MIDAS_WORKER__BROKER__URL",
                "amqp://u:p@10.255.255.1:5672/%2f",
            ),
            ("MIDAS_WORKER__MIDAS__ENVIRONMENT", "production"),
            ("MIDAS_APP_KEY", "k"),
            ("WECHAT_APP_SECRET", "s"),
        ]),
        "t",
    )
    .unwrap();
    assert!(run_preflight(&prod, false, &env(&[])).is_ok());
}

#[test]
fn run_requires_an_explicit_environment() {
    // the apps alone: complete for the other verbs, not for `run`
    let apps_only = MINIMAL;
    let s = load_from(apps_only, &env(&[]), "t").unwrap();
    let e = run_preflight(&s, false, &env(&[])).unwrap_err().to_string();
    assert!(
        e.contains("midas.environment") && e.contains("run") && !e.contains('\n'),
        "{e}"
    );
    // check-config says so (a note: the other verbs run without it)
    assert!(
        show::notes(&s)
            .iter()
            .any(|n| n.contains("midas.environment is not set")),
        "{:?}",
        show::notes(&s)
    );
    // whatever the image's variable says
    let require = env(&[(ENV_REQUIRE_ENVIRONMENT, "0")]);
    assert!(run_preflight(&s, false, &require).is_err());
    let s = load_from(
        apps_only,
        &env(&[("MIDAS_WORKER__MIDAS__ENVIRONMENT", "simulator")]),
        "t",
    )
    .unwrap();
    assert!(run_preflight(&s, false, &env(&[])).is_ok());
    // the shipped file says it
    let s = load_from(SHIPPED, &env(&[]), "t").unwrap();
    assert!(run_preflight(&s, false, &env(&[])).is_ok());
    assert!(!show::notes(&s).iter().any(|n| n.contains("not set")));
}
