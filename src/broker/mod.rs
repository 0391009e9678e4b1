//! RabbitMQ: connection (named, with heartbeats), the topology of docs/contract.md,
//! the command consumer ([`consumer`]) and the confirmed reply publisher
//! ([`publisher`]). [`session`] keeps them alive across broker restarts.

pub mod consumer;
pub mod publisher;
pub mod session;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties};

use crate::config::BrokerConfig;

/// How long a connection attempt may take (a black-holed broker must not hang
/// start-up or shutdown).
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Heartbeat asked of the broker when the URL does not set one, seconds.
pub const HEARTBEAT_SECS: u16 = 30;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("broker URL is invalid: {0}")]
    Url(String),
    #[error("broker connection closed")]
    Closed,
    #[error("broker did not answer within {CONNECT_TIMEOUT:?}")]
    Timeout,
}

/// Connect with a connection name (shown in the management UI) and heartbeats.
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let mut uri: lapin::uri::AMQPUri = url.parse().map_err(BrokerError::Url)?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(HEARTBEAT_SECS);
    }
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri, props)).await {
        Ok(c) => Ok(c?),
        Err(_) => Err(BrokerError::Timeout),
    }
}

/// `host:port` of the broker URL without credentials, for messages to people.
pub fn display_url(url: &str) -> String {
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(u) => format!("{}:{}", u.authority.host, u.authority.port),
        Err(_) => "(invalid URL)".into(),
    }
}

/// Declare the queues of `docs/contract.md` (idempotent): the quorum command queue
/// dead-lettering to the DLQ, the quorum reply queue, the durable DLQ.
pub async fn declare_topology(ch: &Channel, cfg: &BrokerConfig) -> Result<(), BrokerError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(
        cfg.dead_letter_queue.as_str().into(),
        durable,
        FieldTable::default(),
    )
    .await?;
    let mut cmd_args = quorum();
    cmd_args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    cmd_args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(cfg.dead_letter_queue.as_str().into()),
    );
    ch.queue_declare(cfg.command_queue.as_str().into(), durable, cmd_args)
        .await?;
    ch.queue_declare(cfg.reply_queue.as_str().into(), durable, quorum())
        .await?;
    Ok(())
}

fn quorum() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString("quorum".into()),
    );
    t
}
