//! One worker case of the bench: the workers' settings for this run (their own
//! queues, a temporary outbox — a SQLite file, or a fresh PostgreSQL database the
//! workers share — the simulator), then the phases, then cleanup.

use std::sync::Arc;
use std::time::Duration;

use super::args::{BenchArgs, WorkerMode};
use super::pgdb::CaseDb;
use super::phases::run_case;
use super::report::CaseResult;
use super::sim::Sim;
use super::{delete_queues, queues};
use crate::broker::{connect, declare_topology};
use crate::config::{Environment, Settings};

pub(super) async fn worker_case(
    a: &BenchArgs,
    base: &Settings,
    latency: Duration,
    workers: usize,
    tag: &str,
    dir: &std::path::Path,
) -> anyhow::Result<CaseResult> {
    let lat_ms = latency.as_millis() as u64;
    let case = match &a.outbox {
        None => format!("{lat_ms}ms"),
        Some(_) => format!("w{workers}-{lat_ms}ms"),
    };
    let db = match &a.outbox {
        None => None,
        Some(url) => Some(CaseDb::create(url, tag, &case).await?),
    };
    let result = worker_case_in(a, base, latency, workers, tag, dir, &case, db.as_ref()).await;
    if let Some(db) = db {
        if a.keep {
            if !a.json {
                eprintln!("bench: database {} kept", db.name);
            }
        } else if let Err(e) = db.drop_db().await {
            eprintln!("bench: could not drop database {}: {e:#}", db.name);
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn worker_case_in(
    a: &BenchArgs,
    base: &Settings,
    latency: Duration,
    workers: usize,
    tag: &str,
    dir: &std::path::Path,
    case: &str,
    db: Option<&CaseDb>,
) -> anyhow::Result<CaseResult> {
    let lat_ms = latency.as_millis() as u64;
    let case = case.to_string();
    let (cmd_q, reply_q, dead_q) = queues(tag, &case);
    let mut settings = base.clone();
    {
        let c = &mut settings.config;
        c.broker.command_queue = cmd_q.clone();
        c.broker.reply_queue = reply_q.clone();
        c.broker.dead_letter_queue = dead_q.clone();
        c.outbox.path = dir.join(&case).join("outbox.sqlite");
        c.outbox.url = db.map(|d| d.url.clone());
        c.http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        c.midas.environment = Environment::Simulator;
        if let Some(m) = a.max_in_flight {
            c.midas.max_in_flight = m;
        }
        c.midas.max_rps = a.max_rps;
    }
    if a.api == "v2" {
        for app in &mut settings.apps {
            app.api = crate::config::ApiVersion::V2;
            app.default_user_ip
                .get_or_insert_with(|| "127.0.0.1".into());
        }
    }
    let max_in_flight = settings.config.midas.max_in_flight;
    let settings = Arc::new(settings);
    let url = settings.config.broker.url.clone();
    let client = connect(&url, "midas-worker bench client").await?;
    let ch = client.create_channel().await?;
    declare_topology(&client, &settings.config.broker).await?;
    let sim = Sim::start(a.sim, &settings, latency).await?;
    let xacts0 = match db {
        Some(d) => Some(d.xact_commit().await?),
        None => None,
    };
    // in-process workers count their round trips in this process
    let trips0 =
        (db.is_some() && a.worker == WorkerMode::Inproc).then(crate::outbox::postgres::round_trips);
    let mut result = run_case(
        a, &settings, &client, &ch, &sim, lat_ms, workers, tag, &case, dir,
    )
    .await
    .map(|r| CaseResult { max_in_flight, ..r });
    if let (Ok(r), Some(t0)) = (&mut result, trips0) {
        let trips = crate::outbox::postgres::round_trips().saturating_sub(t0);
        r.pg_round_trips_per_job = Some(trips as f64 / r.total_jobs.max(1) as f64);
    }
    if let (Ok(r), Some(d), Some(x0)) = (&mut result, db, xacts0) {
        // the workers have stopped; their backends report statistics as they exit
        tokio::time::sleep(Duration::from_millis(1500)).await;
        if let Ok(x1) = d.xact_commit().await {
            r.pg_xacts_per_job = Some((x1 - x0) as f64 / r.total_jobs.max(1) as f64);
        }
    }
    sim.stop().await;
    delete_queues(&client, &[&cmd_q, &reply_q, &dead_q]).await;
    let _ = client.close(200, "bye".into()).await;
    result
}
