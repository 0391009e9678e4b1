//! `cargo +nightly fuzz run decode` (from the project root; needs cargo-fuzz).
//!
//! Feeds arbitrary bytes to the command decoder, with one app configured and with
//! two (appid required). The properties are those of tests/decoder_props.rs: never a
//! panic; an accepted command re-decodes from its canonical form to the same
//! parameters; a rejection has a non-empty message and a known code.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use midas_worker::command::{decode, valid_bill_no, Op, MAX_AMOUNT};
use midas_worker::config::{self, Settings};

const CONFIG: &str = include_str!("../../config.toml");

fn settings() -> &'static [Settings; 2] {
    static S: OnceLock<[Settings; 2]> = OnceLock::new();
    S.get_or_init(|| {
        let one = config::load_from(CONFIG, &BTreeMap::new(), "fuzz").expect("config");
        // a second [[apps]] entry (offer_id in TOML: an env override of a new key
        // that looks like a number would be read as an integer)
        let text = format!(
            "{}\n[[apps]]\nappid = \"wx7654321\"\noffer_id = \"87654321\"\napp_key_env = \"OTHER_APP_KEY\"\napp_secret_env = \"OTHER_APP_SECRET\"\n",
            CONFIG
        );
        let two = config::load_from(&text, &BTreeMap::new(), "fuzz").expect("config");
        [one, two]
    })
}

fuzz_target!(|data: &[u8]| {
    for s in settings() {
        match decode(data, s) {
            Ok(cmd) => {
                let p = &cmd.params;
                assert_eq!(p.op == Op::Balance, p.bill_no.is_none());
                if let Some(b) = &p.bill_no {
                    assert!(valid_bill_no(b));
                }
                for n in [p.amt, p.present_counts].into_iter().flatten() {
                    assert!((1..=MAX_AMOUNT).contains(&n));
                }
                let again = decode(p.canonical().as_bytes(), s).expect("canonical decodes");
                assert_eq!(&again.params, p);
            }
            Err(rej) => {
                assert!(!rej.message.trim().is_empty());
                assert!(matches!(rej.code, "invalid_command" | "unknown_app"));
                if let Some(b) = &rej.bill_no {
                    assert!(valid_bill_no(b));
                }
            }
        }
    }
});
