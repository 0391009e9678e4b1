//! The simulator's books: one account per (appid, openid) and every pay/present
//! order, so tests can check after the fact that a bill_no was charged exactly once.
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

/// One applied pay or present.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub appid: String,
    pub bill_no: String,
    /// `"pay"` or `"present"`.
    pub op: String,
    pub openid: String,
    pub amount: i64,
    /// For a pay: how much of `amount` came out of the gift balance.
    pub used_gen_amt: i64,
    /// A pay undone by cancelpay.
    pub cancelled: bool,
    /// Unix milliseconds when the order was applied.
    pub at_ms: i64,
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
}

impl LedgerError {
    pub fn errcode(self) -> i64 {
        match self {
            LedgerError::OrderExists => errcode::ORDER_EXISTS,
            LedgerError::Insufficient => errcode::INSUFFICIENT_BALANCE,
            LedgerError::NoSuchOrder => errcode::ORDER_NOT_FOUND,
            LedgerError::AlreadyCancelled => errcode::ORDER_ROLLED_BACK,
            LedgerError::Overflow => errcode::PARAM_ERROR,
        }
    }

    pub fn errmsg(self) -> &'static str {
        match self {
            LedgerError::OrderExists => "order already exists",
            LedgerError::Insufficient => "balance not enough",
            LedgerError::NoSuchOrder => "order not exist",
            LedgerError::AlreadyCancelled => "order already rolled back",
            LedgerError::Overflow => "param error: amount too large",
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

/// The books. Accounts are created on first use with `initial_balance`, counted as a
/// top-up (`save_sum`, `save_amt`, `first_save`).
#[derive(Debug)]
pub struct Ledger {
    initial_balance: i64,
    accounts: BTreeMap<(String, String), Account>,
    orders: Vec<Order>,
    /// (appid, op, bill_no) → index into `orders`.
    index: HashMap<(String, &'static str, String), usize>,
    applied: u64,
}

impl Ledger {
    pub fn new(initial_balance: i64) -> Ledger {
        Ledger {
            initial_balance: initial_balance.max(0),
            accounts: BTreeMap::new(),
            orders: Vec::new(),
            index: HashMap::new(),
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
        let acct = self.account(appid, openid);
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
        let paid = Paid {
            balance: acct.balance,
            used_gen_amt,
        };
        self.record(key, openid, amt, used_gen_amt, now_ms);
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
        let acct = self.account(appid, openid);
        let balance = acct.balance.checked_add(count);
        let gen = acct.gen_balance.checked_add(count);
        let sum = acct.present_sum.checked_add(count);
        let (Some(balance), Some(gen), Some(sum)) = (balance, gen, sum) else {
            return Err(LedgerError::Overflow);
        };
        acct.balance = balance;
        acct.gen_balance = gen;
        acct.present_sum = sum;
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
            appid: key.0.clone(),
            bill_no: key.2.clone(),
            op: key.1.to_string(),
            openid: openid.to_string(),
            amount,
            used_gen_amt,
            cancelled: false,
            at_ms,
        });
        self.index.insert(key, self.orders.len() - 1);
        self.applied += 1;
    }

    pub fn dump(&self, calls: BTreeMap<String, u64>) -> LedgerDump {
        LedgerDump {
            accounts: self.accounts.values().cloned().collect(),
            orders: self.orders.clone(),
            calls,
            applied: self.applied,
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
