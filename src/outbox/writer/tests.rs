//! Unit tests of the writer's per-request savepoints: one failing request of a
//! group commit must leave no trace while the others in the same batch commit.

use rusqlite::{Connection, TransactionBehavior};

use super::in_savepoint;
use crate::outbox::OutboxError;

fn insert(c: &Connection, v: &str) -> Result<(), OutboxError> {
    c.execute("INSERT INTO t (v) VALUES (?1)", [v])?;
    Ok(())
}

#[test]
fn a_failing_request_is_undone_alone_and_the_batch_commits_the_rest() {
    let mut conn = Connection::open_in_memory().expect("in-memory db");
    conn.execute_batch("CREATE TABLE t (v TEXT UNIQUE)")
        .expect("schema");
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .expect("tx");
    assert!(in_savepoint(&tx, |c| insert(c, "a")).is_ok());
    // a request that wrote a row, then failed: its row must go
    let failed = in_savepoint(&tx, |c| {
        insert(c, "b")?;
        Err::<(), _>(OutboxError::Corrupt("request failed".into()))
    });
    assert!(failed.is_err());
    // a request failing in SQLite itself (a UNIQUE violation) is undone too
    assert!(in_savepoint(&tx, |c| insert(c, "a")).is_err());
    // the cached savepoint statements work again after a rollback
    assert!(in_savepoint(&tx, |c| insert(c, "c")).is_ok());
    tx.commit().expect("commit");
    let mut rows: Vec<String> = conn
        .prepare("SELECT v FROM t ORDER BY v")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("rows");
    rows.sort();
    assert_eq!(rows, ["a", "c"]);
}
