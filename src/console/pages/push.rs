//! A WeChat payment push's page — what `outbox show OUT_TRADE_NO` prints of the
//! pushes stored under an OutTradeNo or RefundId: the event, its kind, the buyer,
//! the amounts or goods, when it arrived and whether the broker confirmed its event,
//! and the events-queue message (verified WeChat data, shown escaped). A push row
//! holds no secret (the Token and AES key are configuration, never stored).

use axum::response::Html;
use maud::{html, Markup};
use serde_json::Value as Json;

use super::{layout, search_href, show_href};
use crate::cli::outbox::fmt::{clean, dash};
use crate::cli::outbox::pushes::PushView;
use crate::console::auth::Who;
use crate::console::form::encode;

fn kv(k: &str, v: Markup) -> Markup {
    html! { dt { (k) } dd { (v) } }
}

/// A JSON value as one line of text (strings without their quotes).
fn text(v: &Json) -> String {
    match v {
        Json::String(s) => clean(s),
        other => clean(&other.to_string()),
    }
}

/// The message's `goods`, `coins`, `refund` and `wechat_pay` objects, field by field.
fn details(message: &Json) -> Markup {
    html! {
        @for part in ["goods", "coins", "refund", "wechat_pay"] {
            @if let Some(Json::Object(m)) = message.get(part) {
                h3 { (part) }
                dl.kv {
                    @for (k, v) in m { (kv(k, html! { (text(v)) })) }
                }
            }
        }
    }
}

fn push(p: &PushView) -> Markup {
    let message = serde_json::to_string_pretty(&p.message).unwrap_or_default();
    html! {
        section.card.push {
            h2 { (clean(&p.kind)) " " small { "push " (p.id) } }
            p.meaning {
                strong { "What it means: " }
                @match p.kind.as_str() {
                    "goods_delivered" => "WeChat says the buyer paid for this item: the game delivers it once per event_id.",
                    "coins_delivered" => "WeChat credited game coins to the buyer: spend them with pay.",
                    "refunded" => "WeChat refunded this order: the game takes back what it granted.",
                    _ => "A WeChat payment push.",
                }
                " "
                @match &p.published_at {
                    Some(_) => "Its event was confirmed by the broker.",
                    None => "Its event is NOT confirmed by the broker yet: the worker publishes it until it is.",
                }
            }
            dl.kv {
                (kv("event", html! { (clean(&p.event)) }))
                (kv("kind", html! { (clean(&p.kind)) }))
                (kv("appid", html! { (clean(&p.appid)) }))
                (kv("openid", html! { (p.openid.as_deref().map_or("-".into(), clean)) }))
                (kv("out_trade_no", html! { (p.out_trade_no.as_deref().map_or("-".into(), clean)) }))
                @if p.kind == "refunded" {
                    (kv("refund_id", html! { (clean(&p.dedup_key)) }))
                }
                (kv("env", html! { @if p.env == 1 { "1 (sandbox)" } @else { "0 (production)" } }))
                (kv("received", html! { (p.received_at) }))
                (kv("repeats", html! { (p.repeats) " (last " (p.last_received_at) ")" }))
                (kv("event_id", html! { code { (clean(&p.event_id)) } }))
                (kv("event confirmed", html! { (dash(p.published_at.as_ref())) }))
            }
            (details(&p.message))
            details {
                summary { "The events-queue message " small { "(the verified payload included)" } }
                pre { (message) }
            }
        }
    }
}

/// The pushes stored under `key`; `jobs`: how many jobs use `key` as their bill_no.
pub(in crate::console) fn show(
    who: &Who,
    key: &str,
    pushes: &[PushView],
    jobs: usize,
) -> Html<String> {
    let body = html! {
        p.crumbs { a href=(search_href(&format!("kind=pushes&out_trade_no={}", encode(key)))) { "← all pushes of this number" } }
        h1 {
            @if pushes.iter().all(|p| p.kind == "refunded") { "RefundId " } @else { "OutTradeNo " }
            code { (clean(key)) }
        }
        p.summary {
            (pushes.len()) " WeChat payment push" @if pushes.len() != 1 { "es" }
            @if jobs > 0 {
                " · " a href=(show_href(key, None)) { (jobs) " job" @if jobs != 1 { "s" } " with this bill_no" }
            }
        }
        @for p in pushes { (push(p)) }
    };
    layout(&format!("push {}", clean(key)), Some(who), None, body)
}
