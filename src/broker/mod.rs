//! RabbitMQ: connection (named, with heartbeats), the topology of the contract
//! (with a delivery limit on the command queue), the `reply_to` allow-list,
//! the command consumer ([`consumer`]) and the confirmed reply publisher
//! ([`publisher`]). [`session`] keeps them alive across broker restarts.

pub mod consumer;
pub mod deadletter;
pub mod publisher;
pub mod session;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Connection, ConnectionProperties};

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

/// Returns after this many unsuccessful deliveries of one message (quorum
/// `x-delivery-limit`): a message that keeps killing the worker is dead-lettered
/// instead of stopping all payments. A valid command is returned only when a worker
/// dies or loses the broker holding it unacked, so 5 leaves room for restarts.
pub const COMMAND_DELIVERY_LIMIT: i64 = 5;

/// AMQP reply code of a re-declare with other arguments.
const PRECONDITION_FAILED: u16 = 406;

/// Declare the queues of `docs/contract.md` (idempotent): the durable DLQ, the
/// quorum reply queue, and the quorum command queue dead-lettering to the DLQ with
/// a delivery limit of [`COMMAND_DELIVERY_LIMIT`].
///
/// A command queue created before the limit existed cannot be re-declared with it
/// (RabbitMQ answers PRECONDITION_FAILED and closes the channel): then the queue is
/// declared again without the limit on a fresh channel (so any other difference is
/// still an error) and one warning per process asks the operator to set the limit
/// with a policy (`SECURITY.md`, "Known limits").
/// Each declaration uses a channel of its own, closed afterwards.
pub async fn declare_topology(conn: &Connection, cfg: &BrokerConfig) -> Result<(), BrokerError> {
    declare_dead_letter_queue(conn, cfg).await?;
    let ch = conn.create_channel().await?;
    ch.queue_declare(cfg.reply_queue.as_str().into(), durable(), quorum())
        .await?;
    let limited = ch
        .queue_declare(
            cfg.command_queue.as_str().into(),
            durable(),
            command_args(cfg, true),
        )
        .await;
    match limited {
        Ok(_) => {
            let _ = ch.close(200, "declared".into()).await;
        }
        Err(e) if is_precondition_failed(&e) => {
            let ch = conn.create_channel().await?;
            ch.queue_declare(
                cfg.command_queue.as_str().into(),
                durable(),
                command_args(cfg, false),
            )
            .await?;
            let _ = ch.close(200, "declared".into()).await;
            // once per process: a policy cannot be seen from here, so the warning
            // would otherwise repeat at every reconnect after the operator set one
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| tracing::warn!(
                queue = %cfg.command_queue,
                "command queue was declared without x-delivery-limit (by an older version): unless a policy sets delivery-limit, a message that crashes the worker is redelivered forever; set one with: rabbitmqctl set_policy midas-delivery-limit '^{}$' '{{\"delivery-limit\":{COMMAND_DELIVERY_LIMIT}}}' --apply-to queues",
                regex_escape(&cfg.command_queue)
            ));
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// The dead-letter queue, with `x-message-ttl` = `broker.dead_letter_ttl`. One
/// declared before the TTL existed (or with another TTL) cannot be re-declared with
/// it: then it is declared as it is, on a fresh channel, and one warning per process
/// gives the policy that sets the TTL. The copies the worker dead-letters carry the
/// TTL as their own expiration in any case.
async fn declare_dead_letter_queue(
    conn: &Connection,
    cfg: &BrokerConfig,
) -> Result<(), BrokerError> {
    let ttl_ms = i64::try_from(cfg.dead_letter_ttl.0.as_millis()).unwrap_or(i64::MAX);
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl_ms));
    let ch = conn.create_channel().await?;
    match ch
        .queue_declare(cfg.dead_letter_queue.as_str().into(), durable(), args)
        .await
    {
        Ok(_) => {
            let _ = ch.close(200, "declared".into()).await;
        }
        Err(e) if is_precondition_failed(&e) => {
            let ch = conn.create_channel().await?;
            ch.queue_declare(
                cfg.dead_letter_queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..durable()
                },
                FieldTable::default(),
            )
            .await?;
            let _ = ch.close(200, "declared".into()).await;
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| tracing::warn!(
                queue = %cfg.dead_letter_queue,
                "dead-letter queue was declared without this x-message-ttl (by an older version, or with another broker.dead_letter_ttl): the worker's copies still expire, messages the broker dead-letters itself do not; set the TTL with: rabbitmqctl set_policy midas-dead-letter-ttl '^{}$' '{{\"message-ttl\":{ttl_ms}}}' --apply-to queues",
                regex_escape(&cfg.dead_letter_queue)
            ));
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn command_args(cfg: &BrokerConfig, delivery_limit: bool) -> FieldTable {
    let mut t = quorum();
    t.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    t.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(cfg.dead_letter_queue.as_str().into()),
    );
    if delivery_limit {
        t.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(COMMAND_DELIVERY_LIMIT),
        );
    }
    t
}

fn is_precondition_failed(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => amqp.get_id() == PRECONDITION_FAILED,
        _ => false,
    }
}

/// A queue name as a policy pattern (regex metacharacters escaped).
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn quorum() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString("quorum".into()),
    );
    t
}

/// Default `broker.reply_to_allow` entry: server-named (exclusive) reply queues.
pub const SERVER_NAMED: &str = "amq.gen-*";

/// Whether a command may name `reply_to` as its reply queue: it matches an entry of
/// `broker.reply_to_allow` exactly, or starts with the prefix of an entry written
/// `prefix*`. Without the key: the configured reply queue and `amq.gen-*`.
pub fn reply_to_allowed(cfg: &BrokerConfig, reply_to: &str) -> bool {
    let matches = |entry: &str| match entry.strip_suffix('*') {
        Some(prefix) => reply_to.starts_with(prefix),
        None => reply_to == entry,
    };
    match &cfg.reply_to_allow {
        Some(list) => list.iter().any(|e| matches(e)),
        None => matches(&cfg.reply_queue) || matches(SERVER_NAMED),
    }
}

/// The `reply_to_not_allowed` refusal of `cmd` when `props` name a reply queue
/// outside the allow-list (None: no `reply_to`, or an allowed one).
pub fn reply_to_refusal(
    cfg: &BrokerConfig,
    props: &lapin::BasicProperties,
    cmd: &crate::command::Command,
) -> Option<crate::command::Rejection> {
    let named = props.reply_to().as_ref().map(|s| s.as_str())?;
    if named.is_empty() || reply_to_allowed(cfg, named) {
        return None;
    }
    Some(crate::command::Rejection::of_command(
        "reply_to_not_allowed",
        "`reply_to` names a queue outside broker.reply_to_allow; this reply went to the configured reply queue and the command was not executed",
        cmd,
    ))
}

/// Serde reader of `broker.reply_to_allow`: a list of strings, or one string of
/// comma-separated entries (what an environment override gives). Entries are
/// trimmed; empty entries are dropped.
pub fn allow_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Form {
        One(String),
        Many(Vec<String>),
    }
    let raw = match <Form as serde::Deserialize>::deserialize(d)? {
        Form::One(s) => s.split(',').map(str::to_string).collect::<Vec<_>>(),
        Form::Many(v) => v,
    };
    Ok(Some(
        raw.into_iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(allow: Option<&[&str]>) -> BrokerConfig {
        let mut s = crate::config::load_from(
            include_str!("../../config.toml"),
            &std::collections::BTreeMap::new(),
            "t",
        )
        .expect("config")
        .config
        .broker;
        s.reply_to_allow = allow.map(|a| a.iter().map(|e| e.to_string()).collect());
        s
    }

    #[test]
    fn default_allow_list_is_the_reply_queue_and_server_named_queues() {
        let c = cfg(None);
        assert!(reply_to_allowed(&c, "midas.results"));
        assert!(reply_to_allowed(&c, "amq.gen-Xa2_fdsa"));
        assert!(!reply_to_allowed(&c, "midas.commands"));
        assert!(!reply_to_allowed(&c, "midas.results.other"));
        assert!(!reply_to_allowed(&c, "amq.gen"));
    }

    #[test]
    fn entries_are_exact_names_or_prefixes() {
        let c = cfg(Some(&["game.replies.*", "ops"]));
        assert!(reply_to_allowed(&c, "game.replies.eu-1"));
        assert!(reply_to_allowed(&c, "ops"));
        assert!(!reply_to_allowed(&c, "ops2"));
        assert!(
            !reply_to_allowed(&c, "midas.results"),
            "an explicit list replaces the default"
        );
        assert!(!reply_to_allowed(&cfg(Some(&[])), "midas.results"));
    }

    #[test]
    fn the_allow_list_comes_from_the_file_or_an_env_string() {
        let text = include_str!("../../config.toml").replace(
            "prefetch = 256",
            "prefetch = 256\nreply_to_allow = [\"a\", \"b*\"]",
        );
        let s = crate::config::load_from(&text, &Default::default(), "t").expect("config");
        assert_eq!(
            s.config.broker.reply_to_allow,
            Some(vec!["a".into(), "b*".into()])
        );
        let env = [(
            "MIDAS_WORKER__BROKER__REPLY_TO_ALLOW".to_string(),
            " x , y* ,".to_string(),
        )]
        .into_iter()
        .collect();
        let s =
            crate::config::load_from(include_str!("../../config.toml"), &env, "t").expect("config");
        assert_eq!(
            s.config.broker.reply_to_allow,
            Some(vec!["x".into(), "y*".into()])
        );
        assert_eq!(s.config.broker.max_command_bytes, 65_536);
    }

    #[test]
    fn policy_patterns_escape_the_queue_name() {
        assert_eq!(regex_escape("midas.commands"), "midas\\.commands");
    }
}
