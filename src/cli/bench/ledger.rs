//! The bench's exactly-once check: every bill the run published must be in the
//! simulator's ledger once, and no other bill of the run may be there.

use std::collections::HashMap;

/// The verdict on one case's bills.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LedgerCheck {
    pub ok: bool,
    pub note: String,
}

/// `bills`: every bill_no the simulator applied (any run); `prefix`: this case's
/// bill prefix; `phases`: (phase letter, commands published) — bill `{prefix}{phase}{seq}`.
pub(super) fn check<'a>(
    bills: impl Iterator<Item = &'a str>,
    prefix: &str,
    phases: &[(char, usize)],
) -> LedgerCheck {
    let expected: usize = phases.iter().map(|(_, k)| k).sum();
    let mut counts: HashMap<&str, u32> = HashMap::with_capacity(expected);
    for b in bills.filter(|b| b.starts_with(prefix)) {
        *counts.entry(b).or_default() += 1;
    }
    let mut missing = 0usize;
    let mut twice = 0usize;
    for &(phase, k) in phases {
        for seq in 0..k {
            match counts.get(format!("{prefix}{phase}{seq}").as_str()) {
                None => missing += 1,
                Some(1) => {}
                Some(_) => twice += 1,
            }
        }
    }
    let extra = counts.len().saturating_sub(expected - missing);
    LedgerCheck {
        ok: missing == 0 && twice == 0 && extra == 0,
        note: format!(
            "{} bills applied once, {missing} missing, {twice} more than once, {extra} unexpected",
            counts.values().filter(|&&c| c == 1).count()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bill_once_is_ok_and_other_runs_are_ignored() {
        let bills = ["P-b0", "P-b1", "P-s0", "OTHER-b0", "OTHER-b0"];
        let c = check(bills.into_iter(), "P-", &[('b', 2), ('s', 1)]);
        assert!(c.ok, "{}", c.note);
        assert_eq!(
            c.note,
            "3 bills applied once, 0 missing, 0 more than once, 0 unexpected"
        );
    }

    #[test]
    fn missing_twice_and_unexpected_bills_fail() {
        let bills = ["P-b0", "P-b0", "P-b9"];
        let c = check(bills.into_iter(), "P-", &[('b', 2)]);
        assert!(!c.ok);
        assert_eq!(
            c.note,
            // (the unexpected bill was applied once too)
            "1 bills applied once, 1 missing, 1 more than once, 1 unexpected"
        );
    }
}
