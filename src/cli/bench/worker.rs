//! One worker case of the bench: the worker's settings for this run (its own
//! queues, a temporary outbox, the simulator), then the phases, then cleanup.

use std::sync::Arc;
use std::time::Duration;

use super::args::BenchArgs;
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
    tag: &str,
    dir: &std::path::Path,
) -> anyhow::Result<CaseResult> {
    let lat_ms = latency.as_millis() as u64;
    let case = format!("{lat_ms}ms");
    let (cmd_q, reply_q, dead_q) = queues(tag, &case);
    let mut settings = base.clone();
    {
        let c = &mut settings.config;
        c.broker.command_queue = cmd_q.clone();
        c.broker.reply_queue = reply_q.clone();
        c.broker.dead_letter_queue = dead_q.clone();
        c.outbox.path = dir.join(&case).join("outbox.sqlite");
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
    let result = run_case(a, &settings, &client, &ch, &sim, lat_ms, tag, &case)
        .await
        .map(|r| CaseResult { max_in_flight, ..r });
    sim.stop().await;
    delete_queues(&client, &[&cmd_q, &reply_q, &dead_q]).await;
    let _ = client.close(200, "bye".into()).await;
    result
}
