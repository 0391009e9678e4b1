//! A real PostgreSQL for the shared-outbox tests: one fresh database per test,
//! dropped at the end. The server is the one `scripts/test.sh` makes sure of
//! (`MIDAS_TEST_PG_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`).

use midas_worker::secret::SecretUrl;

/// The maintenance database the per-test databases are created from.
pub fn admin_url() -> String {
    std::env::var("MIDAS_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of its own for one test; dropped (connections and all) on drop.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new(tag: &str) -> TestDb {
        let name: String = format!("mw_{}_{}", tag, rand::random::<u32>())
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(60)
            .collect();
        let admin = client(&admin_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        let base = admin_url();
        // MIDAS_TEST_PG_URL names a database: swap it for this test's
        let cut = base
            .rfind('/')
            .expect("MIDAS_TEST_PG_URL ends with /<database>");
        let url = format!("{}/{name}", &base[..cut]);
        TestDb { name, url }
    }

    pub fn secret_url(&self) -> SecretUrl {
        SecretUrl::new(self.url.clone())
    }

    /// The PostgreSQL outbox writer of a worker named `test-worker` (30 s leases,
    /// 3 s calls) on this database, and its task (ends once the writer is dropped).
    pub async fn writer(
        &self,
    ) -> (
        midas_worker::outbox::postgres::writer::PgWriter,
        tokio::task::JoinHandle<()>,
    ) {
        midas_worker::outbox::postgres::writer::PgWriter::start(self.secret_url(), test_fence())
            .await
            .expect("writer")
    }

    /// A connection to this test's database.
    pub async fn client(&self) -> tokio_postgres::Client {
        client(&self.url).await
    }

    /// One number from a query (`SELECT count(*) ...`).
    pub async fn count(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // a plain thread: Drop may run inside or outside a runtime
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async move {
                    let admin = client(&admin_url()).await;
                    let _ = admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                });
            }
        })
        .join();
    }
}

pub async fn client(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e} (scripts/test.sh starts one)"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c
}

/// The fence of the worker [`TestDb::writer`] writes as.
pub fn test_fence() -> midas_worker::outbox::postgres::writer::Fence {
    midas_worker::outbox::postgres::writer::Fence {
        me: "test-worker".into(),
        lease_ms: 30_000,
        call_ms: 3_000,
    }
}
