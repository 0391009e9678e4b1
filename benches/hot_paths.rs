//! Micro-benchmarks of the per-command hot paths (criterion, no plots):
//! signing, command decoding, outcome classification, the Midas request body and
//! one job's trip through the engine (accepted → mark → call → answer → record).
//!
//! `cargo bench --bench hot_paths` (add `-- --quick` for a short run).
//!
//! Instruction counts (stable on a noisy machine, unlike time): with
//! `HOT_PATHS_CALLGRIND=N` set, each path runs N times in its own `#[inline(never)]`
//! function and the process exits without criterion; run it under
//! `valgrind --tool=callgrind` and divide each `count_*` function's inclusive
//! instruction count by N (docs/bench.md has the command).
//!
//! Allocations (what malloc/free cost the worker, ~11 % of its CPU samples): with
//! `HOT_PATHS_ALLOCS=N` each path runs N times under a counting allocator and the
//! heap allocations and bytes per run are printed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, Criterion};

use midas_worker::command;
use midas_worker::config::{self, Settings};
use midas_worker::dispatch::engine_config;
use midas_worker::engine::job::Job;
use midas_worker::engine::{Action, Engine, Event};
use midas_worker::midas::client::build_body;
use midas_worker::midas::errcode::classify;
use midas_worker::midas::sign::{mp_sig, sig, Param};
use midas_worker::midas::Api;
use midas_worker::midas::{Answer, Body, OutcomeClass};
use midas_worker::secret::Secret;

/// The system allocator, counting allocations (and reallocations) and bytes asked
/// for. Only this benchmark binary uses it.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counters
// are plain atomics and allocate nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: `ptr` came from `System` through this allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

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

/// One job through the engine as the dispatcher drives it on success: accepted
/// (→ mark), marked (→ call), answered 0 (→ record), recorded. Returns the actions.
fn engine_trip(e: &mut Engine, job: Job, out: &mut Vec<Action>) -> usize {
    let id = job.id;
    let now = 1_000;
    out.clear();
    e.handle(Event::Accepted(job), now, out);
    e.handle(Event::Marked(id, None), now, out);
    let answer = Answer {
        api: Api::Pay,
        class: OutcomeClass::Success,
        http_status: Some(200),
        errcode: Some(0),
        errmsg: None,
        body: Body::default(),
        latency: std::time::Duration::ZERO,
    };
    e.handle(Event::Answered(id, Box::new(answer)), now, out);
    e.handle(Event::Recorded(id), now, out);
    out.len()
}

/// An engine with the shipped config but no rate limit (the trips share one instant).
fn new_engine(s: &Settings) -> Engine {
    let mut cfg = engine_config(s);
    cfg.max_rps = u32::MAX;
    Engine::new(cfg, 1)
}

fn engine(c: &mut Criterion) {
    let s = settings();
    let params = command::decode(PAY, &s).expect("valid pay").params;
    let mut e = new_engine(&s);
    let mut out = Vec::new();
    let mut id = 0;
    assert_eq!(
        engine_trip(&mut e, Job::new(1, params.clone(), None, 0), &mut out),
        3,
        "mark, call, record"
    );
    c.bench_function("engine/one job accepted → recorded", |b| {
        b.iter(|| {
            id += 1;
            let job = Job::new(1 + id, params.clone(), None, 0);
            engine_trip(&mut e, job, &mut out)
        })
    });
}

#[inline(never)]
fn count_sign(n: u64) {
    let v = vector();
    for _ in 0..n {
        black_box(sig(black_box(&v), black_box(URI), black_box(KEY)));
    }
}

#[inline(never)]
fn count_decode(n: u64, s: &Settings) {
    for _ in 0..n {
        let _ = black_box(command::decode(black_box(PAY), s));
    }
}

#[inline(never)]
fn count_build_body(n: u64, s: &Settings) {
    let app = &s.apps[0];
    let params = command::decode(PAY, s).expect("valid pay").params;
    let token = Secret::new("ACCESSTOKEN-0123456789abcdef0123456789abcdef");
    for _ in 0..n {
        black_box(build_body(
            Api::Pay,
            black_box(&params),
            app,
            1507530737,
            Api::Pay.path(false),
            &token,
            None,
        ));
    }
}

#[inline(never)]
fn count_engine(n: u64, s: &Settings) {
    let params = command::decode(PAY, s).expect("valid pay").params;
    let mut e = new_engine(s);
    let mut out = Vec::new();
    for i in 0..n {
        let job = Job::new(i as i64 + 1, params.clone(), None, 0);
        assert_eq!(engine_trip(&mut e, job, &mut out), 3, "mark, call, record");
    }
}

/// `HOT_PATHS_CALLGRIND=N`: run each path N times for an instruction count, no criterion.
fn callgrind_mode() -> bool {
    let Some(n) = std::env::var("HOT_PATHS_CALLGRIND")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return false;
    };
    let s = settings();
    count_sign(n);
    count_decode(n, &s);
    count_build_body(n, &s);
    count_engine(n, &s);
    println!("hot_paths: each path ran {n} times");
    true
}

/// `HOT_PATHS_ALLOCS=N`: heap allocations and bytes per run of each path.
fn allocs_mode() -> bool {
    let Some(n) = std::env::var("HOT_PATHS_ALLOCS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|n| *n > 0)
    else {
        return false;
    };
    let s = settings();
    let paths: [(&str, &dyn Fn()); 4] = [
        ("sign/sig", &|| count_sign(n)),
        ("command/decode valid pay", &|| count_decode(n, &s)),
        ("midas/build_body pay (sig)", &|| count_build_body(n, &s)),
        ("engine/one job accepted → recorded", &|| {
            count_engine(n, &s)
        }),
    ];
    for (name, run) in paths {
        let (a0, b0) = (
            ALLOCS.load(Ordering::Relaxed),
            BYTES.load(Ordering::Relaxed),
        );
        run();
        let (a1, b1) = (
            ALLOCS.load(Ordering::Relaxed),
            BYTES.load(Ordering::Relaxed),
        );
        println!(
            "{name:<40} {:>6.1} allocations {:>8.0} bytes per run",
            (a1 - a0) as f64 / n as f64,
            (b1 - b0) as f64 / n as f64
        );
    }
    true
}

criterion_group!(benches, signing, decoding, classification, body, engine);

fn main() {
    if callgrind_mode() || allocs_mode() {
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
