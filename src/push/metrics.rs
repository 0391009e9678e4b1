//! Push counters for `/metrics`: every push by event kind and outcome (stored,
//! repeat, mock, refused reasons, store failures), and events confirmed by the
//! broker. Labels are fixed vocabularies, never an OutTradeNo or openid.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};

use crate::metrics::{family, series};

#[derive(Default)]
pub struct PushMetrics {
    pushes: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    published: AtomicU64,
}

pub static PUSH_METRICS: LazyLock<PushMetrics> = LazyLock::new(PushMetrics::default);

impl PushMetrics {
    /// One push answered: `kind` (`unknown` when the body named no known event)
    /// and `outcome`.
    pub fn push(&self, kind: &'static str, outcome: &'static str) {
        let mut m = match self.pushes.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *m.entry((kind, outcome)).or_insert(0) += 1;
    }

    pub fn published(&self, n: u64) {
        self.published.fetch_add(n, Ordering::Relaxed);
    }

    /// The count of (`kind`, `outcome`) so far (tests).
    pub fn count(&self, kind: &str, outcome: &str) -> u64 {
        let m = match self.pushes.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        m.iter()
            .filter(|((k, o), _)| *k == kind && *o == outcome)
            .map(|(_, v)| *v)
            .sum()
    }
}

/// Append the push metrics to a Prometheus text page (after
/// [`crate::metrics::Metrics::render`]'s).
pub fn render(out: &mut String) {
    let p = "midas_worker";
    let m = &*PUSH_METRICS;
    let help = "WeChat payment pushes answered, by event kind and outcome.";
    family(out, &format!("{p}_pushes_total"), "counter", help);
    {
        let g = match m.pushes.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for ((kind, outcome), v) in g.iter() {
            let _ = writeln!(
                out,
                "{p}_pushes_total{{kind=\"{kind}\",outcome=\"{outcome}\"}} {v}"
            );
        }
    }
    series(
        out,
        &format!("{p}_push_events_published_total"),
        "counter",
        "Push events confirmed by the broker on the events queue.",
        m.published.load(Ordering::Relaxed),
    );
}
