//! The overview's chart: jobs received per time slice over the last hours, stacked
//! by how they ended, with the share that ended `failed` or `unknown` (the error
//! rate) drawn over them — rendered here as inline SVG, so the page needs no
//! script and no chart library, and the Content-Security-Policy stays strict (only
//! presentation attributes, no `style`).

use maud::{html, Markup};

/// Slices per chart, whatever the window.
pub const SLICES: i64 = 24;

/// The jobs received in one slice, by state now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Slice {
    pub succeeded: i64,
    pub failed: i64,
    pub unknown: i64,
    pub pending: i64,
}

impl Slice {
    pub fn total(&self) -> i64 {
        self.succeeded + self.failed + self.unknown + self.pending
    }

    /// Failed or unknown among the final jobs (`None` when none is final).
    pub fn error_rate(&self) -> Option<f64> {
        let finals = self.succeeded + self.failed + self.unknown;
        (finals > 0).then(|| (self.failed + self.unknown) as f64 / finals as f64)
    }
}

/// The outbox's (slice, state, jobs) rows as [`SLICES`] slices; a row past the end
/// (a clock step) counts in the last one.
pub fn slices(rows: &[(i64, String, i64)]) -> Vec<Slice> {
    let mut out = vec![Slice::default(); SLICES as usize];
    for (b, state, n) in rows {
        let i = usize::try_from((*b).clamp(0, SLICES - 1)).unwrap_or(0);
        if let Some(s) = out.get_mut(i) {
            match state.as_str() {
                "succeeded" => s.succeeded += n,
                "failed" => s.failed += n,
                "unknown" => s.unknown += n,
                _ => s.pending += n,
            }
        }
    }
    out
}

/// `HH:MM` (UTC) of a unix time in ms.
pub fn hh_mm(ms: i64) -> String {
    let m = ms.max(0) / 60_000;
    format!("{:02}:{:02}", (m / 60) % 24, m % 60)
}

/// One slice's bar: where it is, its stacked parts (y, height, colour), its tooltip.
type Bar = (f64, Vec<(f64, f64, &'static str)>, String);

const W: f64 = 720.0;
const H: f64 = 220.0;
const LEFT: f64 = 44.0;
const RIGHT: f64 = 44.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 28.0;

/// The chart of `slices`, the first starting at `since`, each `slice_ms` long.
pub fn render(slices: &[Slice], since: i64, slice_ms: i64) -> Markup {
    let max = slices.iter().map(Slice::total).max().unwrap_or(0).max(1);
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let n = slices.len().max(1) as f64;
    let step = plot_w / n;
    let bar_w = (step * 0.8).max(1.0);
    let y_of = |v: i64| TOP + plot_h - (v as f64 / max as f64) * plot_h;
    let rate_y = |r: f64| TOP + plot_h - r.clamp(0.0, 1.0) * plot_h;
    // the error rate of each slice with final jobs, as a line with a dot per slice
    let dots: Vec<(f64, f64)> = slices
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            s.error_rate()
                .map(|r| (LEFT + step * (i as f64 + 0.5), rate_y(r)))
        })
        .collect();
    let points: Vec<String> = dots.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    let total: i64 = slices.iter().map(Slice::total).sum();
    // per slice: where its bar is, its stacked parts (y, height, colour), its tooltip
    let bars: Vec<Bar> = slices
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let x = LEFT + step * i as f64 + (step - bar_w) / 2.0;
            let mut base = 0i64;
            let mut rects = Vec::new();
            for (n, color) in [
                (s.succeeded, "#2e7d32"),
                (s.pending, "#9e9e9e"),
                (s.failed, "#c62828"),
                (s.unknown, "#ef8f00"),
            ] {
                if n > 0 {
                    rects.push((y_of(base + n), y_of(base) - y_of(base + n), color));
                    base += n;
                }
            }
            let start = since + slice_ms * i as i64;
            let tip = format!(
                "{}–{} UTC: {} received; {} succeeded, {} pending, {} failed, {} unknown",
                hh_mm(start),
                hh_mm(start + slice_ms),
                s.total(),
                s.succeeded,
                s.pending,
                s.failed,
                s.unknown
            );
            (x, rects, tip)
        })
        .collect();
    let label = format!(
        "Jobs received per {} over the last {} ({} in all), by how they ended, with the share that ended failed or unknown",
        crate::cli::outbox::fmt::age(slice_ms),
        crate::cli::outbox::fmt::age(slice_ms * slices.len() as i64),
        total
    );
    html! {
        svg class="chart" viewBox=(format!("0 0 {W} {H}")) role="img" aria-label=(label) {
            title { (label) }
            // axes
            line x1=(LEFT) y1=(TOP + plot_h) x2=(W - RIGHT) y2=(TOP + plot_h) stroke="#999" stroke-width="1" {}
            line x1=(LEFT) y1=(TOP) x2=(LEFT) y2=(TOP + plot_h) stroke="#999" stroke-width="1" {}
            text x=(LEFT - 6.0) y=(TOP + 4.0) text-anchor="end" font-size="11" fill="#555" { (max) }
            text x=(LEFT - 6.0) y=(TOP + plot_h) text-anchor="end" font-size="11" fill="#555" { "0" }
            text x=(W - RIGHT + 6.0) y=(TOP + 4.0) font-size="11" fill="#b42318" { "100%" }
            text x=(W - RIGHT + 6.0) y=(TOP + plot_h) font-size="11" fill="#b42318" { "0%" }
            @for (x, rects, tip) in &bars {
                g {
                    title { (tip) }
                    @for (y, h, color) in rects {
                        rect x=(format!("{x:.1}")) y=(format!("{y:.1}")) width=(format!("{bar_w:.1}"))
                            height=(format!("{h:.1}")) fill=(color) {}
                    }
                }
            }
            @if !points.is_empty() {
                polyline points=(points.join(" ")) fill="none" stroke="#b42318" stroke-width="2" {}
            }
            @for (x, y) in &dots {
                circle cx=(format!("{x:.1}")) cy=(format!("{y:.1}")) r="4" fill="#b42318" stroke="#fff" stroke-width="1.5" {}
            }
            @for i in [0i64, SLICES / 2, SLICES] {
                @let x = LEFT + step * i as f64;
                text x=(format!("{x:.1}")) y=(H - 8.0) text-anchor="middle" font-size="11" fill="#555" {
                    (hh_mm(since + slice_ms * i)) @if i == SLICES { " UTC" }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_fill_their_slices_and_late_rows_count_in_the_last() {
        let rows = vec![
            (0, "succeeded".to_string(), 3),
            (0, "unknown".to_string(), 1),
            (5, "failed".to_string(), 2),
            (99, "pending".to_string(), 4),
        ];
        let s = slices(&rows);
        assert_eq!(s.len(), SLICES as usize);
        assert_eq!(s[0].total(), 4);
        assert_eq!(s[0].error_rate(), Some(0.25));
        assert_eq!(s[5].error_rate(), Some(1.0));
        assert_eq!(s[23].pending, 4);
        assert_eq!(s[23].error_rate(), None);
    }

    #[test]
    fn the_chart_is_svg_without_style_or_script() {
        let s = slices(&[(1, "succeeded".into(), 5), (2, "failed".into(), 1)]);
        let svg = render(&s, 0, 900_000).into_string();
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("<rect"));
        assert!(svg.contains("<polyline"));
        assert!(!svg.contains("style"));
        assert!(!svg.contains("<script"));
        assert_eq!(hh_mm(3_600_000 * 25 + 60_000 * 7), "01:07");
    }
}
