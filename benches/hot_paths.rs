//! Micro-benchmarks of the per-command hot paths (criterion, no plots):
//! signing, command decoding, outcome classification and the Midas request body.
//!
//! `cargo bench --bench hot_paths` (add `-- --quick` for a short run).

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};

use midas_worker::command;
use midas_worker::config::{self, Settings};
use midas_worker::midas::client::{build_body, Api};
use midas_worker::midas::errcode::classify;
use midas_worker::midas::sign::{mp_sig, sig, Param};
use midas_worker::secret::Secret;

/// The Midas 1.0 signature check values (docs/midas-v1.md).
const KEY: &str = "zNLgAGgqsEWJOg1nFVaO5r7fAlIQxr1u";
const SESSION: &str = "V7Q38/i2KXaqrQyl2Yx9Hg==";
const URI: &str = "/cgi-bin/midas/getbalance";
const SIG: &str = "1ad64e8dcb2ec1dc486b7fdf01f4a15159fc623dc3422470e51cf6870734726b";

const PAY: &[u8] = br#"{"op":"pay","bill_no":"BENCH-0001-b42","openid":"odkx20ENSNa2w5y3g_qOkOvBNM1g","amt":100,"pay_item":"sword","app_remark":"bench"}"#;
const INVALID: &[u8] =
    br#"{"op":"pay","bill_no":"BENCH-0001-b42","openid":"o1","amt":0,"pay_itme":"x"}"#;

fn vector() -> Vec<(&'static str, Param<'static>)> {
    vec![
        ("openid", Param::Str("odkx20ENSNa2w5y3g_qOkOvBNM1g")),
        ("appid", Param::Str("wx1234567")),
        ("offer_id", Param::Str("12345678")),
        ("ts", Param::Int(1507530737)),
        ("zone_id", Param::Str("1")),
        ("pf", Param::Str("android")),
    ]
}

fn settings() -> Settings {
    config::load_from(
        include_str!("../config.toml"),
        &BTreeMap::new(),
        "benches/hot_paths",
    )
    .expect("the shipped config loads")
}

fn signing(c: &mut Criterion) {
    let v = vector();
    assert_eq!(sig(&v, URI, KEY), SIG, "the MIDAS.md vector");
    c.bench_function("sign/sig (MIDAS.md vector)", |b| {
        b.iter(|| sig(black_box(&v), black_box(URI), black_box(KEY)))
    });
    c.bench_function("sign/mp_sig (MIDAS.md vector)", |b| {
        b.iter(|| {
            mp_sig(
                black_box(&v),
                black_box("ACCESSTOKEN"),
                black_box(SIG),
                black_box(URI),
                black_box(SESSION),
            )
        })
    });
}

fn decoding(c: &mut Criterion) {
    let s = settings();
    assert!(command::decode(PAY, &s).is_ok());
    assert!(command::decode(INVALID, &s).is_err());
    c.bench_function("command/decode valid pay", |b| {
        b.iter(|| command::decode(black_box(PAY), &s))
    });
    c.bench_function("command/decode invalid body", |b| {
        b.iter(|| command::decode(black_box(INVALID), &s))
    });
}

fn classification(c: &mut Criterion) {
    let codes: [i64; 8] = [0, -1, 90012, 90013, 90016, 40001, 90018, 12345];
    c.bench_function("errcode/classify x8", |b| {
        b.iter(|| {
            for code in codes {
                black_box(classify(black_box(code)));
            }
        })
    });
}

fn body(c: &mut Criterion) {
    let s = settings();
    let app = s.apps[0].clone();
    let params = command::decode(PAY, &s).expect("valid pay").params;
    let token = Secret::new("ACCESSTOKEN-0123456789abcdef0123456789abcdef");
    let session = Secret::new(SESSION);
    let path = Api::Pay.path(false);
    c.bench_function("midas/build_body pay (sig)", |b| {
        b.iter(|| {
            build_body(
                Api::Pay,
                black_box(&params),
                &app,
                black_box(1507530737),
                path,
                &token,
                None,
            )
        })
    });
    c.bench_function("midas/build_body pay (sig + mp_sig)", |b| {
        b.iter(|| {
            build_body(
                Api::Pay,
                black_box(&params),
                &app,
                black_box(1507530737),
                path,
                &token,
                Some(&session),
            )
        })
    });
}

criterion_group!(benches, signing, decoding, classification, body);
criterion_main!(benches);
