//! The simulator's books: one account per (appid, openid) and every pay/present
//! order (and 2.0 refund), so tests can check after the fact that a bill_no was
//! charged exactly once. 1.0 orders are unique per (appid, op, bill_no); 2.0 orders
//! per (appid, openid, zone_id, op, bill_no), as the 2.0 pages define idempotency.
//!
//! Pure data and arithmetic, no I/O: the HTTP layer in `sim/mod.rs` decides *whether*
//! an operation is applied (auth, faults); this module decides *what* it does.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::midas::errcode;

/// One user's wallet, as `getbalance` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub appid: String,
    pub openid: String,
    pub balance: i64,
    pub gen_balance: i64,
    pub save_sum: i64,
    pub cost_sum: i64,
    pub present_sum: i64,
    pub save_amt: i64,
    pub first_save: bool,
}

fn v1() -> String {
    "v1".to_string()
}

/// One applied pay, present or (2.0) refund.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// `"v1"` (Midas 1.0) or `"v2"` (virtual payment 2.0).
    #[serde(default = "v1")]
    pub api: String,
    pub appid: String,
    pub bill_no: String,
    /// `"pay"`, `"present"` or, 2.0 only, `"refund"`.
    pub op: String,
    pub openid: String,
    pub amount: i64,
    /// For a pay: how much of `amount` came out of the gift balance.
    pub used_gen_amt: i64,
    /// A pay undone by cancelpay (2.0: refunded in full).
    pub cancelled: bool,
    /// Unix milliseconds when the order was applied.
    pub at_ms: i64,
    /// 2.0: the zone the order belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_id: Option<String>,
    /// 2.0 refund: the pay it refunds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pay_bill_no: Option<String>,
    /// 2.0 pay: coins refunded so far (never more than `amount`).
    #[serde(default)]
    pub refunded: i64,
}

/// Everything the simulator knows, as served by `GET /sim/ledger`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LedgerDump {
    pub accounts: Vec<Account>,
    /// In the order they were applied.
    pub orders: Vec<Order>,
    /// Requests received per path kind: `pay`, `present`, `cancelpay`, `getbalance`,
    /// `stable_token`, `token` (sandbox and official paths count together).
    pub calls: BTreeMap<String, u64>,
    /// Successful pay/present/cancelpay operations that changed the books.
    pub applied: u64,
    /// Calls that arrived while another call for the same (appid, openid) was
    /// still being answered (a worker must never make such calls).
    #[serde(default)]
    pub overlapping_calls: u64,
    /// The most calls to the Midas endpoints (money and balance paths, 1.0 and 2.0,
    /// any openid) that were being answered at the same time: what a client's
    /// concurrency limit must keep down.
    #[serde(default)]
    pub peak_in_flight: u64,
    /// TCP connections the simulator accepted.
    #[serde(default)]
    pub connections: u64,
}

/// Why the books refused an operation (each maps to a Midas errcode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LedgerError {
    OrderExists,
    Insufficient,
    NoSuchOrder,
    AlreadyCancelled,
    /// An amount would overflow i64: reported as a parameter error.
    Overflow,
    /// 2.0: a refund above what is left of the pay (90018, the simulator's choice).
    OverRefund,
}

impl LedgerError {
    pub fn errcode(self) -> i64 {
        match self {
            LedgerError::OrderExists => errcode::ORDER_EXISTS,
            LedgerError::Insufficient => errcode::INSUFFICIENT_BALANCE,
            LedgerError::NoSuchOrder => errcode::ORDER_NOT_FOUND,
            LedgerError::AlreadyCancelled => errcode::ORDER_ROLLED_BACK,
            LedgerError::Overflow | LedgerError::OverRefund => errcode::PARAM_ERROR,
        }
    }

    pub fn errmsg(self) -> &'static str {
        match self {
            LedgerError::OrderExists => "order already exists",
            LedgerError::Insufficient => "balance not enough",
            LedgerError::NoSuchOrder => "order not exist",
            LedgerError::AlreadyCancelled => "order already rolled back",
            LedgerError::Overflow => "param error: amount too large",
            LedgerError::OverRefund => "param error: refund amount exceeds what is left of the pay",
        }
    }
}

/// Result of a successful pay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paid {
    pub balance: i64,
    pub used_gen_amt: i64,
}

const OP_PAY: &str = "pay";
const OP_PRESENT: &str = "present";
const OP_REFUND: &str = "refund";

/// Whose 2.0 order: idempotency is per openid + zone_id (within the app).
#[derive(Clone, Copy, Debug)]
pub struct Who<'a> {
    pub appid: &'a str,
    pub openid: &'a str,
    pub zone_id: &'a str,
}

type V2Key = (String, String, String, &'static str, String);

fn v2_key(who: &Who<'_>, op: &'static str, bill_no: &str) -> V2Key {
    (
        who.appid.to_string(),
        who.openid.to_string(),
        who.zone_id.to_string(),
        op,
        bill_no.to_string(),
    )
}

/// Deduct `amt` from an account, gift balance first.
fn deduct(acct: &mut Account, amt: i64) -> Result<Paid, LedgerError> {
    if acct.balance < amt {
        return Err(LedgerError::Insufficient);
    }
    let cost_sum = acct
        .cost_sum
        .checked_add(amt)
        .ok_or(LedgerError::Overflow)?;
    let used_gen_amt = acct.gen_balance.clamp(0, amt);
    acct.gen_balance -= used_gen_amt;
    acct.balance -= amt;
    acct.cost_sum = cost_sum;
    Ok(Paid {
        balance: acct.balance,
        used_gen_amt,
    })
}

/// Add `count` gift coins to an account; the new balance.
fn gift(acct: &mut Account, count: i64) -> Result<i64, LedgerError> {
    let balance = acct.balance.checked_add(count);
    let gen = acct.gen_balance.checked_add(count);
    let sum = acct.present_sum.checked_add(count);
    let (Some(balance), Some(gen), Some(sum)) = (balance, gen, sum) else {
        return Err(LedgerError::Overflow);
    };
    acct.balance = balance;
    acct.gen_balance = gen;
    acct.present_sum = sum;
    Ok(balance)
}

/// The books. Accounts are created on first use with `initial_balance`, counted as a
/// top-up (`save_sum`, `save_amt`, `first_save`).
#[derive(Debug)]
pub struct Ledger {
    initial_balance: i64,
    accounts: BTreeMap<(String, String), Account>,
    orders: Vec<Order>,
    /// (appid, op, bill_no) → index into `orders` (1.0).
    index: HashMap<(String, &'static str, String), usize>,
    /// (appid, openid, zone_id, op, bill_no) → index into `orders` (2.0).
    v2_index: HashMap<V2Key, usize>,
    applied: u64,
}

impl Ledger {
    pub fn new(initial_balance: i64) -> Ledger {
        Ledger {
            initial_balance: initial_balance.max(0),
            accounts: BTreeMap::new(),
            orders: Vec::new(),
            index: HashMap::new(),
            v2_index: HashMap::new(),
            applied: 0,
        }
    }

    fn account(&mut self, appid: &str, openid: &str) -> &mut Account {
        let initial = self.initial_balance;
        self.accounts
            .entry((appid.to_string(), openid.to_string()))
            .or_insert_with(|| Account {
                appid: appid.to_string(),
                openid: openid.to_string(),
                balance: initial,
                gen_balance: 0,
                save_sum: initial,
                cost_sum: 0,
                present_sum: 0,
                save_amt: initial,
                first_save: true,
            })
    }

    /// The account (created if new).
    pub fn balance(&mut self, appid: &str, openid: &str) -> Account {
        self.account(appid, openid).clone()
    }

    /// Deduct `amt`, gift balance first. A bill_no already used for a pay → 90012.
    pub fn pay(
        &mut self,
        appid: &str,
        openid: &str,
        bill_no: &str,
        amt: i64,
        now_ms: i64,
    ) -> Result<Paid, LedgerError> {
        let key = (appid.to_string(), OP_PAY, bill_no.to_string());
        if self.index.contains_key(&key) {
            return Err(LedgerError::OrderExists);
        }
        let paid = deduct(self.account(appid, openid), amt)?;
        self.record(key, openid, amt, paid.used_gen_amt, now_ms);
        Ok(paid)
    }

    /// Gift `count`: added to balance, gen_balance and present_sum. Repeat → 90012.
    pub fn present(
        &mut self,
        appid: &str,
        openid: &str,
        bill_no: &str,
        count: i64,
        now_ms: i64,
    ) -> Result<i64, LedgerError> {
        let key = (appid.to_string(), OP_PRESENT, bill_no.to_string());
        if self.index.contains_key(&key) {
            return Err(LedgerError::OrderExists);
        }
        let balance = gift(self.account(appid, openid), count)?;
        self.record(key, openid, count, 0, now_ms);
        Ok(balance)
    }

    /// Undo a pay of this user: refund the amount (the gift part back to gen_balance).
    pub fn cancel_pay(
        &mut self,
        appid: &str,
        openid: &str,
        bill_no: &str,
    ) -> Result<(), LedgerError> {
        let key = (appid.to_string(), OP_PAY, bill_no.to_string());
        let Some(&i) = self.index.get(&key) else {
            return Err(LedgerError::NoSuchOrder);
        };
        let Some(order) = self.orders.get(i) else {
            return Err(LedgerError::NoSuchOrder);
        };
        if order.openid != openid {
            return Err(LedgerError::NoSuchOrder);
        }
        if order.cancelled {
            return Err(LedgerError::AlreadyCancelled);
        }
        let (amount, used_gen) = (order.amount, order.used_gen_amt);
        let acct = self.account(appid, openid);
        let (Some(balance), Some(gen)) = (
            acct.balance.checked_add(amount),
            acct.gen_balance.checked_add(used_gen),
        ) else {
            return Err(LedgerError::Overflow);
        };
        acct.balance = balance;
        acct.gen_balance = gen;
        acct.cost_sum -= amount;
        if let Some(order) = self.orders.get_mut(i) {
            order.cancelled = true;
        }
        self.applied += 1;
        Ok(())
    }

    fn record(
        &mut self,
        key: (String, &'static str, String),
        openid: &str,
        amount: i64,
        used_gen_amt: i64,
        at_ms: i64,
    ) {
        self.orders.push(Order {
            api: v1(),
            appid: key.0.clone(),
            bill_no: key.2.clone(),
            op: key.1.to_string(),
            openid: openid.to_string(),
            amount,
            used_gen_amt,
            cancelled: false,
            at_ms,
            zone_id: None,
            pay_bill_no: None,
            refunded: 0,
        });
        self.index.insert(key, self.orders.len() - 1);
        self.applied += 1;
    }

    fn record_v2(&mut self, key: V2Key, order: Order) {
        self.orders.push(order);
        self.v2_index.insert(key, self.orders.len() - 1);
        self.applied += 1;
    }

    fn v2_order(who: &Who<'_>, op: &str, bill_no: &str, amount: i64, at_ms: i64) -> Order {
        Order {
            api: "v2".to_string(),
            appid: who.appid.to_string(),
            bill_no: bill_no.to_string(),
            op: op.to_string(),
            openid: who.openid.to_string(),
            amount,
            used_gen_amt: 0,
            cancelled: false,
            at_ms,
            zone_id: Some(who.zone_id.to_string()),
            pay_bill_no: None,
            refunded: 0,
        }
    }

    /// 2.0 pay: like [`Ledger::pay`], unique per openid + zone_id.
    pub fn pay_v2(
        &mut self,
        who: &Who<'_>,
        bill_no: &str,
        amt: i64,
        now_ms: i64,
    ) -> Result<Paid, LedgerError> {
        let key = v2_key(who, OP_PAY, bill_no);
        if self.v2_index.contains_key(&key) {
            return Err(LedgerError::OrderExists);
        }
        let paid = deduct(self.account(who.appid, who.openid), amt)?;
        let mut order = Self::v2_order(who, OP_PAY, bill_no, amt, now_ms);
        order.used_gen_amt = paid.used_gen_amt;
        self.record_v2(key, order);
        Ok(paid)
    }

    /// 2.0 present: like [`Ledger::present`], unique per openid + zone_id.
    pub fn present_v2(
        &mut self,
        who: &Who<'_>,
        bill_no: &str,
        count: i64,
        now_ms: i64,
    ) -> Result<i64, LedgerError> {
        let key = v2_key(who, OP_PRESENT, bill_no);
        if self.v2_index.contains_key(&key) {
            return Err(LedgerError::OrderExists);
        }
        let balance = gift(self.account(who.appid, who.openid), count)?;
        self.record_v2(key, Self::v2_order(who, OP_PRESENT, bill_no, count, now_ms));
        Ok(balance)
    }

    /// 2.0 cancelpay: refund `amount` of the pay `pay_bill_no` under the refund's own
    /// `bill_no`. Partial and repeated refunds are allowed while their sum stays within
    /// the pay; the gift part of the pay is given back last.
    pub fn refund_v2(
        &mut self,
        who: &Who<'_>,
        bill_no: &str,
        pay_bill_no: &str,
        amount: i64,
        now_ms: i64,
    ) -> Result<(), LedgerError> {
        let key = v2_key(who, OP_REFUND, bill_no);
        if self.v2_index.contains_key(&key) {
            return Err(LedgerError::OrderExists);
        }
        let Some(&i) = self.v2_index.get(&v2_key(who, OP_PAY, pay_bill_no)) else {
            return Err(LedgerError::NoSuchOrder);
        };
        let Some(pay) = self.orders.get(i) else {
            return Err(LedgerError::NoSuchOrder);
        };
        let left = pay.amount - pay.refunded;
        if amount > left {
            return Err(LedgerError::OverRefund);
        }
        let paid_part = pay.amount - pay.used_gen_amt;
        let (before, after) = (pay.refunded, pay.refunded + amount);
        let gift_back = (after - paid_part).max(0) - (before - paid_part).max(0);
        let full = amount == left;
        let acct = self.account(who.appid, who.openid);
        let (Some(balance), Some(gen)) = (
            acct.balance.checked_add(amount),
            acct.gen_balance.checked_add(gift_back),
        ) else {
            return Err(LedgerError::Overflow);
        };
        acct.balance = balance;
        acct.gen_balance = gen;
        acct.cost_sum -= amount;
        if let Some(pay) = self.orders.get_mut(i) {
            pay.refunded = after;
            pay.cancelled = full;
        }
        let mut order = Self::v2_order(who, OP_REFUND, bill_no, amount, now_ms);
        order.used_gen_amt = gift_back;
        order.pay_bill_no = Some(pay_bill_no.to_string());
        self.record_v2(key, order);
        Ok(())
    }

    pub fn dump(&self, calls: BTreeMap<String, u64>) -> LedgerDump {
        LedgerDump {
            accounts: self.accounts.values().cloned().collect(),
            orders: self.orders.clone(),
            calls,
            applied: self.applied,
            overlapping_calls: 0,
            peak_in_flight: 0,
            connections: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pay_present_cancel_round_trip() {
        let mut l = Ledger::new(100);
        assert_eq!(l.present("a", "u", "g1", 30, 1), Ok(130));
        assert_eq!(
            l.pay("a", "u", "p1", 50, 2),
            Ok(Paid {
                balance: 80,
                used_gen_amt: 30
            })
        );
        assert_eq!(l.pay("a", "u", "p1", 50, 3), Err(LedgerError::OrderExists));
        assert_eq!(l.pay("a", "u", "p2", 81, 3), Err(LedgerError::Insufficient));
        assert_eq!(l.cancel_pay("a", "u", "p1"), Ok(()));
        assert_eq!(
            l.cancel_pay("a", "u", "p1"),
            Err(LedgerError::AlreadyCancelled)
        );
        assert_eq!(
            l.cancel_pay("a", "u", "nope"),
            Err(LedgerError::NoSuchOrder)
        );
        let acct = l.balance("a", "u");
        assert_eq!(
            (acct.balance, acct.gen_balance, acct.cost_sum),
            (130, 30, 0)
        );
        assert_eq!(l.dump(BTreeMap::new()).applied, 3);
    }

    #[test]
    fn v2_partial_refunds_never_exceed_the_pay() {
        let mut l = Ledger::new(100);
        let who = Who {
            appid: "a",
            openid: "u",
            zone_id: "1",
        };
        assert_eq!(l.present_v2(&who, "g", 20, 1), Ok(120));
        let paid = l.pay_v2(&who, "p", 50, 2).unwrap();
        assert_eq!((paid.balance, paid.used_gen_amt), (70, 20));
        assert_eq!(l.pay_v2(&who, "p", 50, 2), Err(LedgerError::OrderExists));
        // Same bill_no in another zone or for another openid is another order.
        let other_zone = Who {
            zone_id: "2",
            ..who
        };
        assert!(l.pay_v2(&other_zone, "p", 1, 2).is_ok());
        assert_eq!(l.refund_v2(&who, "r1", "p", 20, 3), Ok(()));
        assert_eq!(
            l.refund_v2(&who, "r1", "p", 20, 3),
            Err(LedgerError::OrderExists)
        );
        assert_eq!(l.refund_v2(&who, "r2", "p", 25, 3), Ok(()));
        assert_eq!(
            l.refund_v2(&who, "r3", "p", 6, 3),
            Err(LedgerError::OverRefund)
        );
        assert_eq!(l.refund_v2(&who, "r3", "p", 5, 3), Ok(()));
        assert_eq!(
            l.refund_v2(&who, "r4", "p", 1, 3),
            Err(LedgerError::OverRefund)
        );
        assert_eq!(
            l.refund_v2(&who, "r5", "nope", 1, 3),
            Err(LedgerError::NoSuchOrder)
        );
        let acct = l.balance("a", "u");
        // 120 - 50 + 50 - 1 (the other zone's pay)
        assert_eq!((acct.balance, acct.gen_balance), (119, 20));
        let pay = l
            .orders
            .iter()
            .find(|o| o.bill_no == "p" && o.zone_id.as_deref() == Some("1"));
        assert!(pay.is_some_and(|o| o.cancelled && o.refunded == 50 && o.api == "v2"));
    }

    #[test]
    fn present_and_pay_bill_numbers_are_separate() {
        let mut l = Ledger::new(10);
        assert!(l.present("a", "u", "same", 5, 1).is_ok());
        assert!(l.pay("a", "u", "same", 5, 1).is_ok());
        assert_eq!(
            l.present("a", "u", "same", 5, 1),
            Err(LedgerError::OrderExists)
        );
    }
}
