//! A small game-server-side client: publish commands with confirms and read replies.
//! Used by `enqueue`, `demo`, `bench` and the integration tests — the same moves a
//! game server makes (see docs/clients.md for Node, Python and Go).
//!
//! Every command is published `mandatory` with publisher confirms, so a command the
//! broker cannot route (no queue of that name) comes back at once as
//! [`ClientError::NoQueue`] instead of vanishing. [`GameClient::attach`] declares
//! nothing (what `enqueue` and a game server do); [`GameClient::connect`] also declares
//! the worker's topology (demo, bench and tests, which may start before the worker).

use std::collections::HashMap;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};

use crate::broker::{connect, declare_topology, BrokerError};
use crate::command::Reply;
use crate::config::BrokerConfig;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker did not confirm the command (nacked {NACK_ATTEMPTS} times)")]
    NotConfirmed,
    #[error("no queue named {0} on this broker (the command was returned, not queued)")]
    NoQueue(String),
    #[error("the broker returned the command: {code} {text}")]
    Returned { code: u16, text: String },
    #[error("no reply within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
}

impl ClientError {
    /// What the broker itself said (an AMQP error such as `ACCESS_REFUSED - ...`,
    /// `PRECONDITION_FAILED - ...` or `NOT_FOUND - ...`), when the error is one.
    /// `None` for transport errors (nothing answered, connection reset, ...).
    pub fn broker_said(&self) -> Option<String> {
        let e = match self {
            ClientError::Amqp(e) | ClientError::Broker(BrokerError::Amqp(e)) => e,
            _ => return None,
        };
        match e.kind() {
            lapin::ErrorKind::ProtocolError(p) => Some(p.get_message().to_string()),
            _ => None,
        }
    }
}

/// A reply as received: its correlation_id and the decoded body (raw bytes kept).
#[derive(Debug, Clone)]
pub struct Received {
    pub correlation_id: String,
    pub reply: Reply,
    pub raw: Vec<u8>,
}

/// How many times a nacked command is published before [`ClientError::NotConfirmed`].
pub const NACK_ATTEMPTS: usize = 6;

/// Pauses between publishes of a nacked command: 0.1 s doubling, about 3 s in all.
fn nack_pauses() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_times(NACK_ATTEMPTS - 1)
        .build()
}

pub struct GameClient {
    pub conn: Connection,
    ch: Channel,
    command_queue: String,
    pub reply_queue: String,
    consumer: Option<Consumer>,
    /// Replies that arrived while waiting for another correlation_id.
    stash: HashMap<String, Vec<Received>>,
}

impl GameClient {
    /// Connect and declare the worker's topology. With `own_reply_queue`, replies come
    /// to an exclusive server-named queue; otherwise read from `cfg.reply_queue`.
    pub async fn connect(
        cfg: &BrokerConfig,
        own_reply_queue: bool,
    ) -> Result<GameClient, ClientError> {
        Self::open(cfg, own_reply_queue, true).await
    }

    /// Connect like a game server: declare nothing but our own exclusive reply queue
    /// (with `own_reply_queue`). Commands to a queue that does not exist fail with
    /// [`ClientError::NoQueue`] instead of creating it.
    pub async fn attach(
        cfg: &BrokerConfig,
        own_reply_queue: bool,
    ) -> Result<GameClient, ClientError> {
        Self::open(cfg, own_reply_queue, false).await
    }

    async fn open(
        cfg: &BrokerConfig,
        own_reply_queue: bool,
        declare: bool,
    ) -> Result<GameClient, ClientError> {
        let conn = connect(&cfg.url, "midas-worker client").await?;
        let ch = conn.create_channel().await?;
        if declare {
            declare_topology(&conn, cfg).await?;
        }
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let reply_queue = if own_reply_queue {
            ch.queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?
            .name()
            .as_str()
            .to_string()
        } else {
            cfg.reply_queue.clone()
        };
        Ok(GameClient {
            conn,
            ch,
            command_queue: cfg.command_queue.clone(),
            reply_queue,
            consumer: None,
            stash: HashMap::new(),
        })
    }

    /// Publish one command body (persistent, confirmed) asking for replies on our queue.
    pub async fn publish(&self, body: &[u8], correlation_id: &str) -> Result<(), ClientError> {
        self.publish_to(body, correlation_id, Some(&self.reply_queue))
            .await
    }

    /// Publish with an explicit `reply_to` (None: the worker's default reply queue).
    /// Mandatory and confirmed: an unroutable command is an error, never dropped.
    pub async fn publish_to(
        &self,
        body: &[u8],
        correlation_id: &str,
        reply_to: Option<&str>,
    ) -> Result<(), ClientError> {
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_correlation_id(correlation_id.into());
        if let Some(r) = reply_to {
            props = props.with_reply_to(r.into());
        }
        // A nack means the broker did not take the command (a quorum queue whose
        // leader is being elected, e.g. just after it was declared or while a node
        // restarts): publish it again, as docs/clients.md tells every game server to.
        // The same bytes are re-sent, so the worker sees at most one command.
        let mut pauses = nack_pauses();
        for attempt in 1.. {
            let confirm = self
                .ch
                .basic_publish(
                    "".into(),
                    self.command_queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    props.clone(),
                )
                .await?
                .await?;
            let acked = confirm.is_ack();
            match confirm.take_message() {
                // 312 NO_ROUTE: nothing bound under that name on the default exchange
                Some(r) if r.reply_code == 312 => {
                    return Err(ClientError::NoQueue(self.command_queue.clone()))
                }
                Some(r) => {
                    return Err(ClientError::Returned {
                        code: r.reply_code,
                        text: r.reply_text.to_string(),
                    })
                }
                None if acked => return Ok(()),
                None => match pauses.next() {
                    Some(pause) => {
                        tracing::debug!(
                            attempt,
                            "the broker nacked a command; publishing it again"
                        );
                        tokio::time::sleep(pause).await;
                    }
                    None => break,
                },
            }
        }
        Err(ClientError::NotConfirmed)
    }

    /// The next reply on our queue, whatever its correlation_id.
    pub async fn next_reply(&mut self, timeout: Duration) -> Result<Received, ClientError> {
        if let Some(key) = self.stash.keys().next().cloned() {
            if let Some(v) = self.stash.get_mut(&key) {
                if let Some(r) = v.pop() {
                    if v.is_empty() {
                        self.stash.remove(&key);
                    }
                    return Ok(r);
                }
            }
        }
        self.receive(timeout).await
    }

    /// The next reply carrying `correlation_id` (others are kept for later).
    pub async fn reply_for(
        &mut self,
        correlation_id: &str,
        timeout: Duration,
    ) -> Result<Received, ClientError> {
        if let Some(v) = self.stash.get_mut(correlation_id) {
            if !v.is_empty() {
                let r = v.remove(0);
                if v.is_empty() {
                    self.stash.remove(correlation_id);
                }
                return Ok(r);
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // report the timeout as asked for ("5s"), not what was left of it
            let r = match self.receive(left).await {
                Err(ClientError::Timeout(_)) => return Err(ClientError::Timeout(timeout)),
                other => other?,
            };
            if r.correlation_id == correlation_id {
                return Ok(r);
            }
            self.stash
                .entry(r.correlation_id.clone())
                .or_default()
                .push(r);
        }
    }

    async fn receive(&mut self, timeout: Duration) -> Result<Received, ClientError> {
        if self.consumer.is_none() {
            let c = self
                .ch
                .basic_consume(
                    self.reply_queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            self.consumer = Some(c);
        }
        let Some(consumer) = self.consumer.as_mut() else {
            return Err(ClientError::Timeout(timeout));
        };
        loop {
            let d = match tokio::time::timeout(timeout, consumer.next()).await {
                Ok(Some(Ok(d))) => d,
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(None) | Err(_) => return Err(ClientError::Timeout(timeout)),
            };
            d.acker.ack(BasicAckOptions::default()).await?;
            let correlation_id = d
                .properties
                .correlation_id()
                .as_ref()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default();
            match serde_json::from_slice::<Reply>(&d.data) {
                Ok(reply) => {
                    return Ok(Received {
                        correlation_id,
                        reply,
                        raw: d.data,
                    })
                }
                Err(e) => tracing::warn!(error = %e, "ignoring a reply that is not JSON"),
            }
        }
    }

    /// Delete queues (demo and test clean-up).
    pub async fn delete_queues(&self, names: &[&str]) {
        for n in names {
            let _ = self
                .ch
                .queue_delete((*n).into(), QueueDeleteOptions::default())
                .await;
        }
    }

    pub async fn close(self) {
        let _ = self.conn.close(200, "bye".into()).await;
    }
}
