//! `midas-worker demo`: the quickest way to see the whole system. Starts the
//! embedded simulator and the worker against the local broker (on demo-only queues
//! and a fresh outbox), enqueues a handful of sample commands, prints the replies
//! and the outbox as a table, cleans up and exits. A virtual payment 2.0 app is
//! added next to the configured (1.0) one, so both APIs show in one run.

use std::sync::Arc;
use std::time::Duration;

use crate::client::GameClient;
use crate::config::{Environment, Settings};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Keep the demo outbox here instead of a temporary directory.
    #[arg(long)]
    pub outbox: Option<std::path::PathBuf>,
}

/// Make sure a broker answers at `url`: if none does and the URL is local, start an
/// installed `rabbitmq-server` and wait for it. The error is one line for people.
pub async fn ensure_broker(url: &str) -> Result<(), String> {
    if let Ok(c) = crate::broker::connect(url, "midas-worker probe").await {
        let _ = c.close(200, "probe".into()).await;
        return Ok(());
    }
    let shown = crate::broker::display_url(url);
    let local =
        shown.starts_with("127.") || shown.starts_with("localhost") || shown.starts_with("[::1]");
    let installed = std::process::Command::new("sh")
        .args(["-c", "command -v rabbitmq-server"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if local && installed {
        eprintln!("no broker answers at {shown}; starting the installed rabbitmq-server…");
        let _ = std::process::Command::new("rabbitmq-server")
            .arg("-detached")
            .status();
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Ok(c) = crate::broker::connect(url, "midas-worker probe").await {
                let _ = c.close(200, "probe".into()).await;
                return Ok(());
            }
        }
    }
    Err(format!(
        "no RabbitMQ broker answers at {shown} (broker.url). Start one with `rabbitmq-server -detached` (Debian: `apt-get install -y rabbitmq-server`) or `docker compose -f deploy/compose.yaml up -d rabbitmq`, or point MIDAS_WORKER__BROKER__URL at yours."
    ))
}

/// `s` in at most `max` characters for the table: whole when it fits, otherwise cut
/// at the last word boundary before the limit and marked with `…` (a single overlong
/// word is cut where it must be).
pub fn shorten(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.chars().count() <= max {
        return s.to_string();
    }
    let keep: String = s.chars().take(max.saturating_sub(1)).collect();
    // the character after the kept part: if it is a space, `keep` ends on a word
    let next_is_space = s
        .chars()
        .nth(keep.chars().count())
        .is_some_and(char::is_whitespace);
    let cut = if next_is_space {
        keep.as_str()
    } else {
        match keep.rfind(char::is_whitespace) {
            Some(i) => &keep[..i],
            None => keep.as_str(),
        }
    };
    let cut = cut.trim_end_matches(|c: char| c.is_whitespace() || c == ',' || c == ';' || c == ':');
    format!("{cut}…")
}

/// The 2.0 app the demo adds next to the configured one (simulator only).
const DEMO_V2_APPID: &str = "wxdemo0000000v2";
/// The session_key the demo's 2.0 commands carry (2.0 signs every call with it; the
/// simulator checks it only for registered players).
const DEMO_SESSION_KEY: &str = "demo-session-key";

/// Add a virtual payment 2.0 app (`api = "v2"`) with simulator stand-in secrets, so
/// that the demo shows both APIs side by side.
fn add_v2_app(settings: &mut Settings) {
    if settings.app(DEMO_V2_APPID).is_some() {
        return;
    }
    settings.apps.push(crate::config::App {
        appid: DEMO_V2_APPID.into(),
        offer_id: "87654321".into(),
        zone_id: "1".into(),
        pf: "android".into(),
        api: crate::config::ApiVersion::V2,
        default_user_ip: Some("203.0.113.10".into()),
        app_key: crate::config::App::simulator_key(DEMO_V2_APPID),
        app_secret: crate::config::App::simulator_secret(DEMO_V2_APPID),
        sandbox_app_key: None,
        push_token: Some(crate::config::App::simulator_push_token(DEMO_V2_APPID)),
        push_aes_key: None,
    });
}

/// A command for the demo's 2.0 app and player D: `fields` plus bill_no, openid,
/// appid and session_key.
fn v2_command(fields: &str, bill_no: &str) -> String {
    format!(
        r#"{{{fields},"appid":"{DEMO_V2_APPID}","bill_no":"{bill_no}","openid":"player-D","session_key":"{DEMO_SESSION_KEY}"}}"#
    )
}

struct Sample {
    label: &'static str,
    corr: String,
    body: String,
}

pub async fn run(args: DemoArgs, mut settings: Settings) -> anyhow::Result<()> {
    ensure_broker(&settings.config.broker.url)
        .await
        .map_err(anyhow::Error::msg)?;
    let tag = format!(
        "{}-{}",
        std::process::id(),
        crate::command::now_ms() % 1_000_000
    );
    let tmp = std::env::temp_dir().join(format!("midas-worker-demo-{tag}"));
    let owns_tmp = args.outbox.is_none();
    let outbox = args.outbox.unwrap_or_else(|| tmp.join("outbox.sqlite"));
    {
        let c = &mut settings.config;
        c.midas.environment = Environment::Simulator;
        c.broker.command_queue = format!("midas-demo-{tag}.commands");
        c.broker.reply_queue = format!("midas-demo-{tag}.results");
        c.broker.dead_letter_queue = format!("midas-demo-{tag}.commands.dead");
        c.outbox.path = outbox.clone();
        c.http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        c.retry.initial = crate::config::Dur(Duration::from_millis(100));
        c.push.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        c.push.event_queue = format!("midas-demo-{tag}.events");
    }
    let v1_app = settings
        .apps
        .first()
        .map(|a| a.appid.clone())
        .unwrap_or_default();
    add_v2_app(&mut settings);
    let settings = Arc::new(settings);
    println!(
        "midas-worker demo: embedded Midas simulator (no real currency), broker {}, outbox {}",
        crate::broker::display_url(&settings.config.broker.url),
        outbox.display()
    );
    let running = crate::worker::start(settings.clone(), None).await?;
    let mut client = GameClient::connect(&settings.config.broker, true).await?;
    let run_id = crate::command::now_ms();
    let bill = |n: &str| format!("DEMO-{run_id}-{n}");
    let samples = vec![
        Sample {
            label: "pay 100 (player A)",
            corr: "c1".into(),
            body: format!(
                r#"{{"op":"pay","appid":"{v1_app}","bill_no":"{}","openid":"player-A","amt":100,"pay_item":"sword"}}"#,
                bill("1")
            ),
        },
        Sample {
            label: "present 50 (player B)",
            corr: "c2".into(),
            body: format!(
                r#"{{"op":"present","appid":"{v1_app}","bill_no":"{}","openid":"player-B","present_counts":50}}"#,
                bill("2")
            ),
        },
        Sample {
            label: "pay 5000, too much (player C)",
            corr: "c3".into(),
            body: format!(
                r#"{{"op":"pay","appid":"{v1_app}","bill_no":"{}","openid":"player-C","amt":5000}}"#,
                bill("3")
            ),
        },
        Sample {
            label: "the first pay re-sent (same bill_no)",
            corr: "c4".into(),
            body: format!(
                r#"{{"op":"pay","appid":"{v1_app}","bill_no":"{}","openid":"player-A","amt":100,"pay_item":"sword"}}"#,
                bill("1")
            ),
        },
        Sample {
            label: "same bill_no, other amount",
            corr: "c5".into(),
            body: format!(
                r#"{{"op":"pay","appid":"{v1_app}","bill_no":"{}","openid":"player-A","amt":999,"pay_item":"sword"}}"#,
                bill("1")
            ),
        },
        Sample {
            label: "invalid: amt 0, misspelt field",
            corr: "c6".into(),
            body: format!(
                r#"{{"op":"pay","appid":"{v1_app}","bill_no":"{}","openid":"player-A","amt":0,"pay_itme":"x"}}"#,
                bill("6")
            ),
        },
        Sample {
            label: "cancel the first pay",
            corr: "c7".into(),
            body: format!(
                r#"{{"op":"cancel_pay","appid":"{v1_app}","bill_no":"{}","openid":"player-A"}}"#,
                bill("1")
            ),
        },
        Sample {
            label: "v2: pay 100 (player D)",
            corr: "d1".into(),
            body: v2_command(r#""op":"pay","amt":100"#, &bill("V1")),
        },
        Sample {
            label: "v2: present 20 (player D)",
            corr: "d2".into(),
            body: v2_command(r#""op":"present","present_counts":20"#, &bill("V2")),
        },
        Sample {
            label: "v2: refund 30 of that pay",
            corr: "d3".into(),
            body: v2_command(
                &format!(
                    r#""op":"cancel_pay","pay_bill_no":"{}","amt":30"#,
                    bill("V1")
                ),
                &bill("V3"),
            ),
        },
        Sample {
            label: "balance of player A",
            corr: "c8".into(),
            body: format!(r#"{{"op":"balance","appid":"{v1_app}","openid":"player-A"}}"#),
        },
        Sample {
            label: "v2: balance of player D",
            corr: "d4".into(),
            body: format!(
                r#"{{"op":"balance","appid":"{DEMO_V2_APPID}","openid":"player-D","session_key":"{DEMO_SESSION_KEY}"}}"#
            ),
        },
    ];
    let (jobs, balance) = samples.split_at(samples.len() - 2);
    for s in jobs {
        client.publish(s.body.as_bytes(), &s.corr).await?;
        // keep the walk-through readable: the re-send after the first reply
        if s.corr == "c3" {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    println!("\nReplies:");
    println!(
        "{:<38} {:<10} {:<18} details",
        "command", "status", "error/errcode"
    );
    let mut got = Vec::new();
    for _ in 0..jobs.len() {
        match client.next_reply(Duration::from_secs(20)).await {
            Ok(r) => got.push(r),
            Err(e) => {
                println!("(stopped waiting: {e})");
                break;
            }
        }
    }
    // balance is answered at once, not queued behind the player's jobs: ask it last
    for s in balance {
        client.publish(s.body.as_bytes(), &s.corr).await?;
        match client.reply_for(&s.corr, Duration::from_secs(20)).await {
            Ok(r) => got.push(r),
            Err(e) => println!("(no balance reply: {e})"),
        }
    }
    for s in &samples {
        for r in got.iter().filter(|r| r.correlation_id == s.corr) {
            let rep = &r.reply;
            let err = rep
                .error
                .clone()
                .or_else(|| rep.errcode.map(|c| c.to_string()))
                .unwrap_or_default();
            let mut details = Vec::new();
            if let Some(b) = rep.balance {
                details.push(format!("balance={b}"));
            }
            // the gift balance, as each API names it
            if let Some(g) = rep.gen_balance {
                details.push(format!("gen_balance={g}"));
            }
            if let Some(g) = rep.present_balance {
                details.push(format!("present_balance={g}"));
            }
            if rep.duplicate == Some(true) {
                details.push("duplicate".into());
            }
            details.push(format!("attempts={}", rep.attempts));
            if rep.status == Some(crate::command::Status::Rejected) {
                if let Some(m) = &rep.errmsg {
                    details.push(shorten(m, 60));
                }
            }
            println!(
                "{:<38} {:<10} {:<18} {}",
                s.label,
                rep.status.map(|x| x.as_str()).unwrap_or("?"),
                err,
                details.join(" ")
            );
        }
    }
    if let Some(addr) = running.push_addr {
        if let Err(e) = show_item_purchase(&settings, addr).await {
            println!("(no item purchase event: {e})");
        }
    }
    println!("\nOutbox (midas-worker outbox list):");
    running.stop().await;
    let mut out = std::io::stdout();
    let list = crate::audit::OutboxCmd::List(crate::audit::ListArgs {
        filters: crate::audit::Filters::default(),
        limit: 50,
        json: false,
        kind: None,
    });
    if let Err(e) = crate::audit::run(&list, &settings, &mut out) {
        println!("(cannot list the outbox: {e})");
    }
    client
        .delete_queues(&[
            &settings.config.broker.command_queue,
            &settings.config.broker.reply_queue,
            &settings.config.broker.dead_letter_queue,
            &settings.config.push.event_queue,
        ])
        .await;
    client.close().await;
    if owns_tmp {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    println!("\nThe invalid and the conflicting command were dead-lettered (a copy without the session_key); the re-sent pay got the stored reply again without a second charge.");
    println!("Try `midas-worker outbox show BILL_NO --config ...` on a real outbox, or `midas-worker run` to start the worker.");
    Ok(())
}

/// An item bought directly in the game (道具直购): the simulator pushes it to the
/// worker as WeChat would (signed, safe mode off), and the event the game
/// consumes arrives on the events queue.
async fn show_item_purchase(settings: &Settings, push: std::net::SocketAddr) -> anyhow::Result<()> {
    use crate::sim::push::{Purchase, PurchaseKind, PushKeys, PushSetup};
    let keys: Vec<PushKeys> = settings
        .apps
        .iter()
        .filter_map(|a| {
            Some(PushKeys {
                appid: a.appid.clone(),
                token: a.push_token.clone()?,
                aes_key: None,
                app_key: a.app_key.clone(),
                sandbox_key: a.sandbox_app_key.clone(),
            })
        })
        .collect();
    let sim = crate::sim::Simulator::new(
        settings.config.simulator.clone(),
        crate::sim::SimApp::from_settings(settings),
    )
    .with_pushes(PushSetup {
        urls: vec![format!("http://{push}/wechat/push")],
        apps: keys,
        safe_mode: false,
        time_factor: 100.0,
        repeat_after_success_rate: 1.0,
        mock_rate: 1.0,
        seed: 1,
    })
    .start()
    .await?;
    let pusher = sim
        .pusher()
        .ok_or_else(|| anyhow::anyhow!("the simulator does not push"))?;
    let no = pusher
        .purchase(Purchase {
            appid: DEMO_V2_APPID.into(),
            openid: "player-D".into(),
            kind: PurchaseKind::Goods,
            out_trade_no: None,
            product_id: Some("golden_sword".into()),
            quantity: Some(1),
            price: Some(600),
            env: None,
            attach: Some("from the demo".into()),
        })
        .map_err(anyhow::Error::msg)?;
    println!("\nItem purchase (道具直购) {no}: WeChat's push, a repeat after success and a mock push go to the worker;");
    println!(
        "the game consumes one event from {}:",
        settings.config.push.event_queue
    );
    let conn = crate::broker::connect(&settings.config.broker.url, "midas-worker demo").await?;
    let ch = conn.create_channel().await?;
    crate::push::relay::declare(&ch, &settings.config.push.event_queue).await?;
    let mut event = None;
    for _ in 0..100 {
        if let Some(m) = ch
            .basic_get(
                settings.config.push.event_queue.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await?
        {
            event = Some(m.delivery.data);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // the repeat and the mock are answered too; give them a moment
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = conn.close(200, "bye".into()).await;
    let stats = pusher.stats();
    sim.shutdown().await;
    let Some(data) = event else {
        anyhow::bail!("no event within 10 s");
    };
    let v: serde_json::Value = serde_json::from_slice(&data)?;
    let keep = [
        "event_id",
        "kind",
        "openid",
        "out_trade_no",
        "goods",
        "wechat_pay",
    ];
    let shown: serde_json::Map<String, serde_json::Value> = keep
        .iter()
        .filter_map(|k| v.get(*k).map(|x| (k.to_string(), x.clone())))
        .collect();
    println!("  {}", serde_json::Value::Object(shown));
    println!(
        "  ({} pushes answered success, {} mock; one event: the game de-duplicates on event_id)",
        stats.success_answers, stats.mock_success_answers
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::shorten;

    #[test]
    fn messages_are_cut_between_words() {
        assert_eq!(shorten("short message", 60), "short message");
        let m = "bill_no already used with different parameters (amt 100, now 999)";
        let s = shorten(m, 40);
        assert_eq!(s, "bill_no already used with different…");
        assert!(s.chars().count() <= 40);
        assert_eq!(shorten("aaaa bbbb", 5), "aaaa…");
        assert_eq!(shorten("abcdefghij", 5), "abcd…");
        assert_eq!(shorten("émoji ünïcode wörds", 10), "émoji…");
    }
}
