//! The bench's PostgreSQL databases (`--outbox postgres://…`): one fresh database
//! per case, created through the URL's server and dropped at the end (unless
//! `--keep`), and the server's transaction count for that database
//! (`pg_stat_database.xact_commit`), so the report can say what a job costs the
//! database.

use anyhow::{bail, Context};

use crate::outbox::postgres::{connect, describe, is_postgres_url};
use crate::secret::SecretUrl;

/// One case's database.
pub(super) struct CaseDb {
    admin: SecretUrl,
    pub(super) name: String,
    pub(super) url: SecretUrl,
}

/// `url` with its database (the path) replaced by `name`; the query is kept.
pub(super) fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    if !is_postgres_url(url) {
        bail!("--outbox must be a postgres:// or postgresql:// URL");
    }
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let after_scheme = head.find("://").map_or(0, |i| i + 3);
    let authority_end = head[after_scheme..]
        .find('/')
        .map_or(head.len(), |i| after_scheme + i);
    let mut out = format!("{}/{name}", &head[..authority_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

/// A database name PostgreSQL accepts unquoted: lower-case ASCII letters, digits
/// and `_`, at most 63 bytes.
pub(super) fn db_name(tag: &str, case: &str) -> String {
    format!("midas_bench_{tag}_{case}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(63)
        .collect()
}

impl CaseDb {
    /// Create the database `midas_bench_<tag>_<case>` on `admin_url`'s server.
    pub(super) async fn create(admin_url: &str, tag: &str, case: &str) -> anyhow::Result<CaseDb> {
        let name = db_name(tag, case);
        let url = SecretUrl::new(with_database(admin_url, &name)?);
        let admin = SecretUrl::new(admin_url);
        let c = connect(&admin)
            .await
            .with_context(|| format!("cannot connect to {}", admin.masked()))?;
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(|e| anyhow::anyhow!("CREATE DATABASE {name}: {}", describe(&e)))?;
        Ok(CaseDb { admin, name, url })
    }

    /// Transactions committed in this database so far (the server's statistics,
    /// which backends report at most once a second and when they exit).
    pub(super) async fn xact_commit(&self) -> anyhow::Result<i64> {
        let c = connect(&self.admin).await?;
        // statistics are cached per transaction: read fresh ones
        c.batch_execute("SELECT pg_stat_clear_snapshot()")
            .await
            .map_err(|e| anyhow::anyhow!("{}", describe(&e)))?;
        let row = c
            .query_one(
                "SELECT coalesce(xact_commit, 0) FROM pg_stat_database WHERE datname = $1",
                &[&self.name],
            )
            .await
            .map_err(|e| anyhow::anyhow!("pg_stat_database: {}", describe(&e)))?;
        Ok(row.get(0))
    }

    /// Drop the database, ending any session still connected to it.
    pub(super) async fn drop_db(&self) -> anyhow::Result<()> {
        let c = connect(&self.admin).await?;
        c.batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .await
        .map_err(|e| anyhow::anyhow!("DROP DATABASE {}: {}", self.name, describe(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_is_swapped_and_the_query_kept() {
        let u = |s: &str| with_database(s, "db1").unwrap_or_default();
        assert_eq!(
            u("postgres://postgres@127.0.0.1:5432/postgres"),
            "postgres://postgres@127.0.0.1:5432/db1"
        );
        assert_eq!(
            u("postgresql://u:p@h/x?sslmode=require"),
            "postgresql://u:p@h/db1?sslmode=require"
        );
        assert_eq!(u("postgres://h:5432"), "postgres://h:5432/db1");
        assert!(with_database("mysql://h/x", "db1").is_err());
    }

    #[test]
    fn names_are_plain_identifiers() {
        assert_eq!(db_name("123-456", "w2-50ms"), "midas_bench_123_456_w2_50ms");
        assert!(db_name(&"x".repeat(100), "c").len() <= 63);
    }
}
