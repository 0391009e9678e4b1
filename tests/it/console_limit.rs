//! The operator console's limit on failed sign-ins, over plain HTTP against the
//! real console (served in process over a running worker's outbox, with the
//! broker and the Midas simulator): no browser is needed to send wrong tokens.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::common::*;
use midas_worker::sim::Faults;

const VIEWER: &str = "viewer-token-limit-0123456789";

/// The login form's CSRF token and its cookie, as a browser gets them.
async fn login_form(http: &reqwest::Client, base: &str) -> (String, String) {
    let r = http.get(format!("{base}/login")).send().await.unwrap();
    let cookie = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|c| c.to_str().ok())
        .find_map(|c| c.strip_prefix("midas_console_login="))
        .and_then(|c| c.split(';').next())
        .expect("login cookie")
        .to_string();
    let html = r.text().await.unwrap();
    let csrf = html
        .split(r#"name="csrf" value=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("csrf field")
        .to_string();
    (csrf, cookie)
}

/// Sign in on the form with `token`: the answer.
async fn sign_in_form(http: &reqwest::Client, base: &str, token: &str) -> reqwest::Response {
    let (csrf, cookie) = login_form(http, base).await;
    let mut body = String::new();
    for (k, v) in [
        ("csrf", csrf.as_str()),
        ("name", "t"),
        ("token", token),
        ("next", "/"),
    ] {
        midas_worker::console::form::push_pair(&mut body, k, v);
    }
    http.post(format!("{base}/login"))
        .header("cookie", format!("midas_console_login={cookie}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// The session cookie a sign-in answer sets, if any.
fn session_cookie(r: &reqwest::Response) -> Option<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|c| c.to_str().ok())
        .find_map(|c| c.strip_prefix("midas_console="))
        .and_then(|c| c.split(';').next())
        .filter(|c| !c.is_empty())
        .map(str::to_string)
}

/// After five failed sign-ins within a minute from one address, that address's
/// sign-ins are answered 429 with a message saying for how long — the right token
/// included, on the form and as a bearer token — while a browser signed in before
/// keeps its session. Over HTTP against the real console (no browser needed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sign_ins_are_limited_per_address() {
    let env = TestEnv::new("console-limit");
    let sim = env.simulator(Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await; // creates the outbox
    let settings = env.settings();
    let tokens = midas_worker::console::Tokens::from_env(
        &settings.config.console,
        &BTreeMap::from([("MIDAS_CONSOLE_VIEWER_TOKEN".to_string(), VIEWER.to_string())]),
    )
    .expect("tokens");
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let (addr, server) = midas_worker::console::serve(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(settings),
        tokens,
        stop_rx,
    )
    .await
    .expect("console listens");
    let base = format!("http://{addr}");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let per_address = midas_worker::console::limit::Limits::CONSOLE.per_client;

    // signed in before anything goes wrong
    let r = sign_in_form(&http, &base, VIEWER).await;
    assert_eq!(r.status(), 303, "signed in");
    let session = session_cookie(&r).expect("session cookie");

    // failures, each answered as a wrong token, until the limit
    for i in 0..per_address {
        let r = if i % 2 == 0 {
            sign_in_form(&http, &base, "not-the-token-0123456789").await
        } else {
            http.get(format!("{base}/"))
                .bearer_auth("not-the-token-0123456789")
                .send()
                .await
                .unwrap()
        };
        assert_eq!(r.status(), 401, "failure {i} answered as such");
    }
    // now the right token is refused too, saying why and for how long
    let r = sign_in_form(&http, &base, VIEWER).await;
    assert_eq!(r.status(), 429, "the form, right token, after the limit");
    assert!(session_cookie(&r).is_none(), "no session");
    let wait: u64 = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&wait), "{wait}");
    let html = r.text().await.unwrap();
    assert!(
        html.contains("Too many failed sign-ins from your address")
            && html.contains(&format!("refused for {wait} more second")),
        "{html}"
    );
    assert!(
        html.contains("name=\"token\""),
        "the form, to try again later"
    );
    let r = http
        .get(format!("{base}/"))
        .bearer_auth(VIEWER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429, "a bearer token, right, after the limit");
    assert!(r.headers().get("retry-after").is_some());
    // the session signed in before still reads
    let r = http
        .get(format!("{base}/"))
        .header("cookie", format!("midas_console={session}"))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let html = r.text().await.unwrap();
    assert_eq!(status, 200, "{html}");
    assert!(html.contains("<h1>Overview</h1>"));

    let _ = stop.send(true);
    let _ = server.await;
    worker.stop().await;
    let c = env.client().await;
    env.cleanup(&c).await;
}
