//! The errors of the `outbox` verbs: each prints as one line, and its exit status
//! says whether the operator asked for something wrong (2) or the outbox failed (1).

use std::io;

use super::fmt::one_line;
use crate::outbox::OutboxError;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("outbox database {path} does not exist (is {} right?)", setting_of(.path))]
    MissingDatabase { path: String },
    #[error("no job with bill_no {bill_no}{}{}", op_suffix(.op), appid_suffix(.appid))]
    UnknownBillNo {
        bill_no: String,
        op: Option<String>,
        appid: Option<String>,
    },
    #[error("bad {flag} {value:?}: expected {expected}")]
    BadFilter {
        flag: &'static str,
        value: String,
        expected: String,
    },
    /// Bad usage of a verb (missing or conflicting arguments).
    #[error("{0}")]
    Usage(String),
    /// The action was refused; the message says why and what to do instead.
    #[error("{0}")]
    Refused(String),
    #[error("outbox database error: {0}")]
    Database(#[from] rusqlite::Error),
    /// A PostgreSQL error, on one line (the server's DETAIL and HINT lines joined).
    #[error("PostgreSQL outbox error: {0}")]
    Postgres(String),
    #[error("{0}")]
    Outbox(OutboxError),
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
}

/// The setting that names the missing outbox.
fn setting_of(path: &str) -> &'static str {
    if crate::outbox::postgres::is_postgres_url(path) {
        "outbox.url"
    } else {
        "outbox.path"
    }
}

fn appid_suffix(appid: &Option<String>) -> String {
    appid
        .as_ref()
        .map(|a| format!(" for appid {a}"))
        .unwrap_or_default()
}

fn op_suffix(op: &Option<String>) -> String {
    op.as_ref()
        .map(|o| format!(" and op {o}"))
        .unwrap_or_default()
}

impl AuditError {
    /// 2: unknown bill_no, bad filter or usage, missing database. 1: anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            AuditError::MissingDatabase { .. }
            | AuditError::UnknownBillNo { .. }
            | AuditError::BadFilter { .. }
            | AuditError::Usage(_) => 2,
            AuditError::Refused(_)
            | AuditError::Database(_)
            | AuditError::Postgres(_)
            | AuditError::Outbox(_)
            | AuditError::Output(_) => 1,
        }
    }
}

impl From<OutboxError> for AuditError {
    fn from(e: OutboxError) -> Self {
        match e {
            OutboxError::Missing { path } => AuditError::MissingDatabase { path },
            OutboxError::Sqlite(e) => AuditError::Database(e),
            OutboxError::Postgres(e) => AuditError::Postgres(pg_message(&e)),
            other => AuditError::Outbox(other),
        }
    }
}

/// A PostgreSQL error as one line: tokio-postgres prints only "db error" for what
/// the server said (the server's message is its source), so the chain is joined.
fn pg_message(e: &tokio_postgres::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let part = s.to_string();
        if !msg.contains(&part) {
            msg.push_str(": ");
            msg.push_str(&part);
        }
        source = s.source();
    }
    one_line(&msg).into_owned()
}
