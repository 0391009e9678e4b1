//! The operator console in a real browser: headless Chromium over WebDriver
//! (`common::webdriver`), the console served in process over a running worker's
//! outbox — SQLite and PostgreSQL — with the real broker and the Midas simulator.
//!
//! One story per outbox: a viewer signs in, finds a job by its bill_no and reads its
//! calls; the viewer's forged POSTs (cross-origin from another page, and from a
//! script holding the viewer's cookie, each with and without the CSRF token) are
//! refused by the server and change nothing; an operator finds `unknown` jobs by a
//! filter, sees a confirm count go stale (refused), confirms the fresh count, and
//! the running worker calls Midas again and replies; export needs the operator role;
//! no page's HTML holds a secret.
//!
//! WeChat payment pushes, signed as WeChat signs them, are POSTed at the worker's
//! push receiver first: the viewer sees their counts on the overview, finds one by
//! its OutTradeNo and reads its fields, and goes from a job's page to the push
//! stored under the same number and back.
//!
//! With `MIDAS_CONSOLE_SCREENSHOTS=DIR` the SQLite run saves PNGs of the main pages
//! there (docs/console/ holds the ones the README shows).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::common::pg::TestDb;
use crate::common::push::{
    goods_payload, post, push_env, signed, AES_KEY, APPID, GOODS_EVENT, SANDBOX_KEY, TOKEN, V2_KEY,
};
use crate::common::webdriver::Browser;
use crate::common::*;
use midas_worker::command::Status;
use midas_worker::config::Settings;
use midas_worker::outbox::store::Store;
use midas_worker::outbox::Location;
use midas_worker::push::event::{event_id, Kind};
use midas_worker::sim::Faults;

const T: Duration = Duration::from_secs(30);
const VIEWER: &str = "viewer-token-console-0123456789";
const OPERATOR: &str = "operator-token-console-0123456789";
const SESSION_KEY: &str = "SK-SECRET-console-do-not-show";

/// The state of `bill`'s pay job and the operator actions on it, read through the
/// operator store (either outbox).
fn job(settings: &Settings, bill: &str) -> (String, Vec<String>) {
    let mut store = Store::open_ro(&Location::of(&settings.config.outbox)).expect("outbox");
    let tx = store.read().expect("snapshot");
    let jobs = tx.jobs_by_bill_no(bill, None).expect("jobs");
    let state = jobs.first().map(|j| j.state.clone()).unwrap_or_default();
    let actions = tx
        .actions_on(bill, None)
        .expect("actions")
        .into_iter()
        .map(|a| format!("{} {}", a.actor, a.action))
        .collect();
    (state, actions)
}

/// A pay command for the first app (the env has a second one, taking pushes).
fn pay1(bill: &str, openid: &str, amt: i64) -> String {
    pay(bill, openid, amt).replacen('{', r#"{"appid":"wx1234567","#, 1)
}

/// Pages read so far (their HTML is checked for secrets at the end).
struct Seen(Vec<(String, String)>);

impl Seen {
    async fn page(&mut self, b: &Browser) -> String {
        let (url, html) = (b.url().await, b.source().await);
        self.0.push((url, html.clone()));
        html
    }
}

/// A page on another origin whose form POSTs to the console's `/act`.
async fn forger(
    console: std::net::SocketAddr,
    bill: &str,
    csrf: Option<&str>,
) -> std::net::SocketAddr {
    let token = csrf
        .map(|t| format!(r#"<input type="hidden" name="csrf" value="{t}">"#))
        .unwrap_or_default();
    let page = format!(
        r#"<!DOCTYPE html><html><body><form method="post" action="http://{console}/act">
        <input name="action" value="retry"><input name="bill_no" value="{bill}">
        <input name="count" value="1"><input name="digest" value="x">{token}
        <button id="go" type="submit">win a prize</button></form></body></html>"#
    );
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let p = page.clone();
            async move { axum::response::Html(p) }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    addr
}

async fn sign_in(b: &Browser, base: &str, name: &str, token: &str) {
    b.goto(&format!("{base}/")).await;
    assert!(
        b.url().await.contains("/login"),
        "signed out: the login form"
    );
    b.type_into("#name", name).await;
    b.type_into("#token", token).await;
    b.click_to("form.login button", "<h1>Overview</h1>").await;
}

async fn shoot(b: &Browser, name: &str) {
    if let Ok(dir) = std::env::var("MIDAS_CONSOLE_SCREENSHOTS") {
        let png = b.screenshot().await;
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(std::path::Path::new(&dir).join(name), png).expect("write screenshot");
    }
}

async fn story(mut env: TestEnv, screenshots: bool) {
    // long enough for the worker to notice an operator's retry (it looks every 2 s;
    // a job re-opened longer ago than this would end `unknown` again uncalled)
    env.set("RETRY__GIVE_UP_AFTER", "5s");
    let sim = env.simulator(Faults::default()).await;
    let worker = env.worker(&sim.base_url()).await;
    let mut c = env.client().await;
    let base_bill = unique("CON");
    // A few jobs for the overview, answered while Midas is healthy: they are final
    // before the busy spell below, so none of them can run out the 5 s (a loaded
    // machine once let one end `unknown` beside A, B and S)
    for (i, amt) in [5, 6, 7, 2_000_000].iter().enumerate() {
        let bill = format!("{base_bill}-X{i}");
        c.publish(pay1(&bill, "con-x", *amt).as_bytes(), &format!("x{i}"))
            .await
            .unwrap();
    }
    for i in 0..4 {
        c.reply_for(&format!("x{i}"), T).await.unwrap();
    }
    // Midas answers "system busy" to everything: A, B and S end `unknown`
    sim.set_faults(Faults {
        busy_rate: 1.0,
        ..Faults::default()
    });
    let (a, b, s) = (
        format!("{base_bill}-A"),
        format!("{base_bill}-B"),
        format!("{base_bill}-S"),
    );
    c.publish(pay1(&a, "con-a", 11).as_bytes(), "a")
        .await
        .unwrap();
    c.publish(pay1(&b, "con-b", 12).as_bytes(), "b")
        .await
        .unwrap();
    c.publish(
        format!(r#"{{"appid":"wx1234567","op":"pay","bill_no":"{s}","openid":"con-s","amt":13,"session_key":"{SESSION_KEY}"}}"#)
            .as_bytes(),
        "s",
    )
    .await
    .unwrap();
    for corr in ["a", "b", "s"] {
        let r = c.reply_for(corr, T).await.unwrap().reply;
        assert_eq!(r.status, Some(Status::Unknown), "{corr}: {r:?}");
    }
    // Midas is healthy again (for the operator's retry below)
    sim.set_faults(Faults::default());
    // WeChat pushes two paid items at the worker's receiver: one under A's number
    // (a job and a push share it), one under a number of its own
    let push_base = format!("http://{}", worker.push_addr.expect("push listener"));
    let p = format!("{base_bill}-P");
    for (no, openid) in [(&a, "o-buyer-a"), (&p, "o-buyer-p")] {
        let sp = signed(GOODS_EVENT, &goods_payload(no, openid), false, true);
        assert_eq!(post(&push_base, APPID, &sp.query, sp.body).await, (200, 0));
    }

    let settings: Settings = env.settings();
    let tokens = midas_worker::console::Tokens::from_env(
        &settings.config.console,
        &BTreeMap::from([
            ("MIDAS_CONSOLE_VIEWER_TOKEN".to_string(), VIEWER.to_string()),
            (
                "MIDAS_CONSOLE_OPERATOR_TOKEN".to_string(),
                OPERATOR.to_string(),
            ),
        ]),
    )
    .expect("tokens");
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let (addr, server) = midas_worker::console::serve(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(settings.clone()),
        tokens,
        stop_rx,
    )
    .await
    .expect("console listens");
    let base = format!("http://{addr}");
    let browser = Browser::start(1100, 900).await;
    let mut seen = Seen(Vec::new());

    // --- a viewer finds a job by its bill_no and reads its calls
    sign_in(&browser, &base, "vera", VIEWER).await;
    seen.page(&browser).await;
    browser.type_into("#find", &a).await;
    browser.click_to("form.find button", "job matches").await;
    let html = seen.page(&browser).await;
    assert!(
        html.contains("1</strong> job matches"),
        "one job found by its bill_no"
    );
    assert!(
        !html.contains("Retry these"),
        "a viewer is offered no action"
    );
    browser.click_to("table.jobs td a", "What it means").await;
    let html = seen.page(&browser).await;
    assert!(
        browser.url().await.contains("/show?bill_no="),
        "the job's page"
    );
    assert!(html.contains("What it means: </strong>Midas never answered definitively"));
    let calls = browser.count("section.job table tbody tr").await;
    assert!(
        calls >= 3,
        "every call is listed ({calls} rows with the reply target)"
    );
    assert!(html.contains(">-1<"), "the calls' errcode -1");
    assert!(html.contains("transient"), "the calls' outcome");
    assert!(!html.contains("Retry…"), "a viewer is offered no retry");

    // --- the push under A's number, from A's job page, and back
    browser
        .click_to("a[href^='/push?']", "<h1>OutTradeNo")
        .await;
    let html = seen.page(&browser).await;
    assert!(html.contains("o-buyer-a"), "the push's buyer");
    assert!(html.contains(&event_id(APPID, Kind::GoodsDelivered, &a)));
    browser.click_to("a[href^='/show?']", "<h1>bill_no").await;
    assert!(
        browser.url().await.contains("/show?bill_no="),
        "back to the job"
    );

    // --- the overview counts the pushes; a viewer finds one by its OutTradeNo
    browser.goto(&format!("{base}/")).await;
    let html = seen.page(&browser).await;
    assert!(
        html.contains(r#"goods_delivered</a></dt><dd>2</dd>"#),
        "two goods pushes on the overview"
    );
    assert!(html.contains("events not confirmed by the broker"));
    browser.type_into("#find", &p).await;
    browser.click_to("form.find button", "jobs match").await;
    let html = seen.page(&browser).await;
    assert!(
        html.contains("0</strong> jobs match"),
        "no job has P's number"
    );
    assert_eq!(browser.count("table.pushes tbody tr").await, 1, "one push");
    browser
        .click_to("table.pushes td a", "<h1>OutTradeNo")
        .await;
    let html = seen.page(&browser).await;
    assert!(
        browser.url().await.contains("/push?key="),
        "the push's page"
    );
    let eid = event_id(APPID, Kind::GoodsDelivered, &p);
    for (name, value) in [
        ("event", GOODS_EVENT),
        ("kind", "goods_delivered"),
        ("openid", "o-buyer-p"),
        ("out_trade_no", p.as_str()),
        ("env", "0 (production)"),
        ("product_id", "sword"),
        ("actual_price", "600"),
        ("event_id", &format!("<code>{eid}</code>")),
    ] {
        let row = format!("<dt>{name}</dt><dd>{value}</dd>");
        assert!(html.contains(&row), "{row} on the push's page");
    }
    assert!(!html.contains("with this bill_no"), "no job to link to");
    if screenshots {
        browser.resize(1100, 880).await;
        shoot(&browser, "push.png").await;
        browser.resize(1100, 900).await;
    }
    // a kind's list, in the URL
    browser
        .goto(&format!(
            "{base}/search?kind=goods_delivered&openid=o-buyer-a"
        ))
        .await;
    seen.page(&browser).await;
    assert_eq!(browser.count("table.pushes tbody tr").await, 1, "A's push");
    assert_eq!(browser.count("table.jobs").await, 0, "pushes only");
    browser.goto(&format!("{base}/show?bill_no={p}")).await;
    assert!(
        browser.url().await.contains("/push?key="),
        "a number with pushes and no job: its pushes' page"
    );

    // --- the viewer's forged POSTs are refused by the server
    let viewer_cookie = browser
        .cookie("midas_console")
        .await
        .expect("session cookie");
    let csrf = html
        .split(r#"name="csrf" value=""#)
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("the sign-out form's CSRF token")
        .to_string();
    for token in [None, Some(csrf.as_str())] {
        let page = forger(addr, &a, token).await;
        browser.goto(&format!("http://{page}/")).await;
        let html = browser.click_to("#go", "403 Forbidden").await;
        assert!(
            html.contains("cross-origin request refused"),
            "({token:?}): {html}"
        );
    }
    // no kept-alive connections: the console drops one idle for 5 s (the ops port's
    // limit), and a request racing that close would fail for the wrong reason
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for token in [None, Some(csrf.as_str())] {
        let mut form = vec![
            ("action", "retry"),
            ("bill_no", a.as_str()),
            ("count", "1"),
            ("digest", "x"),
        ];
        if let Some(t) = token {
            form.push(("csrf", t));
        }
        let r = http
            .post(format!("{base}/act"))
            .header("cookie", format!("midas_console={viewer_cookie}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.iter().fold(String::new(), |mut q, (k, v)| {
                midas_worker::console::form::push_pair(&mut q, k, v);
                q
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "viewer POST refused (csrf {token:?})");
    }
    let r = http
        .get(format!("{base}/confirm?action=retry&status=unknown"))
        .header("cookie", format!("midas_console={viewer_cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a viewer gets no confirm step");
    let r = http
        .get(format!(
            "{base}/export?format=csv&bill_no_prefix={base_bill}"
        ))
        .bearer_auth(VIEWER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a viewer gets no export");
    assert_eq!(
        job(&settings, &a),
        ("unknown".to_string(), vec![]),
        "nothing changed"
    );

    // --- sign out; an operator retries the unknown jobs a filter finds
    browser.goto(&format!("{base}/")).await;
    browser
        .click_to("header form button", "<h1>Sign in</h1>")
        .await;
    let r = http
        .get(format!("{base}/"))
        .header("cookie", format!("midas_console={viewer_cookie}"))
        .send()
        .await
        .unwrap();
    assert!(
        r.url().path().starts_with("/login"),
        "the signed-out session is gone on the server too"
    );
    sign_in(&browser, &base, "olga", OPERATOR).await;
    let html = seen.page(&browser).await;
    assert!(html.contains("Retry all unknown"));
    if screenshots {
        browser.resize(1100, 1900).await;
        shoot(&browser, "overview.png").await;
    }
    browser.goto(&format!("{base}/search")).await;
    browser.type_into("#bill_no_prefix", &base_bill).await;
    browser.type_into("#since", "1h").await;
    browser.click_to("form.filters button", "jobs match").await;
    let html = seen.page(&browser).await;
    assert!(html.contains("7</strong> jobs match"), "the filter's jobs");
    if screenshots {
        shoot(&browser, "search.png").await;
        browser.resize(1100, 900).await;
    }
    // an empty field is "any"
    browser
        .goto(&format!(
            "{base}/search?status=unknown&bill_no_prefix={base_bill}-&openid="
        ))
        .await;
    let html = seen.page(&browser).await;
    if !html.contains("3</strong> jobs match") {
        // say which jobs the filter found, and the state of each of the seven
        let states: Vec<String> = [&a, &b, &s]
            .into_iter()
            .cloned()
            .chain((0..4).map(|i| format!("{base_bill}-X{i}")))
            .map(|bill| format!("{bill}: {:?}", job(&settings, &bill)))
            .collect();
        panic!("A, B and S are unknown, and only they: {states:?}\n{html}");
    }
    // B alone: confirm shows 1, then the set changes (the CLI retries B) → refused
    browser
        .goto(&format!("{base}/search?status=unknown&bill_no_prefix={b}"))
        .await;
    browser
        .click_to("a[href^='/confirm?action=retry']", "Retry: confirm")
        .await;
    let html = seen.page(&browser).await;
    assert_eq!(browser.text("strong.count").await, "1", "the exact count");
    if screenshots {
        shoot(&browser, "confirm.png").await;
    }
    env.operator_retry(&b);
    browser.type_into("#reason", "midas recovered").await;
    browser.click_to("form.confirm button", "409").await;
    let refused = seen.page(&browser).await;
    assert!(
        refused.contains("409"),
        "a stale count is refused: {refused}"
    );
    assert!(refused.contains("the set changed since you confirmed it"));
    assert!(
        refused.contains("Look again"),
        "a link to a fresh confirm step"
    );
    assert!(html.contains(&b));
    // A: found by the filter, confirmed with its fresh count, retried
    browser
        .goto(&format!("{base}/search?status=unknown&bill_no_prefix={a}"))
        .await;
    browser
        .click_to("a[href^='/confirm?action=retry']", "Retry: confirm")
        .await;
    seen.page(&browser).await;
    assert_eq!(browser.text("strong.count").await, "1");
    browser.type_into("#reason", "midas recovered").await;
    browser.click_to("form.confirm button", "Retry: done").await;
    let done = seen.page(&browser).await;
    assert!(done.contains("re-opened"), "{done}");
    assert!(done.contains("olga@console"));
    // the running worker calls Midas again with the same bill_no and replies
    // (replies are at least once: a second copy of the earlier `unknown` may come first)
    let mut r = c.reply_for("a", T).await.unwrap().reply;
    while r.status == Some(Status::Unknown) {
        r = match c.reply_for("a", T).await {
            Ok(r) => r.reply,
            Err(e) => panic!(
                "no reply after the retry ({e}); the job: {:?}",
                job(&settings, &a)
            ),
        };
    }
    assert_eq!(r.status, Some(Status::Succeeded), "{r:?}");
    assert_eq!(orders_for(&sim.ledger(), &a).len(), 1, "charged once");
    let (state, actions) = job(&settings, &a);
    assert_eq!(state, "succeeded");
    assert_eq!(
        actions,
        vec!["olga@console retry".to_string()],
        "recorded with the name"
    );
    browser.goto(&format!("{base}/show?bill_no={a}")).await;
    let html = seen.page(&browser).await;
    assert!(
        html.contains("olga@console"),
        "the action is on the job's page"
    );
    if screenshots {
        // the worker marks the new reply confirmed right after publishing it
        for _ in 0..25 {
            browser.goto(&format!("{base}/show?bill_no={a}")).await;
            if browser.source().await.contains("Its reply was confirmed") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        browser.resize(1100, 1700).await;
        shoot(&browser, "job.png").await;
        browser.resize(390, 844).await;
        shoot(&browser, "job-phone.png").await;
        browser.resize(1100, 900).await;
    }
    browser.goto(&format!("{base}/show?bill_no={s}")).await;
    let html = seen.page(&browser).await;
    assert!(
        html.contains("Retry…"),
        "an operator is offered a retry of an unknown job"
    );

    // --- export of the filter, for the operator (bearer token, as a script would)
    let r = http
        .get(format!(
            "{base}/export?format=csv&bill_no_prefix={base_bill}"
        ))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let csv = r.text().await.unwrap();
    assert_eq!(csv.lines().count(), 1 + 7, "header and the filter's 7 jobs");
    seen.0.push(("export".into(), csv));

    // --- no secret in any page
    let app_secret_like = [
        APP_KEY,
        APP_SECRET,
        SESSION_KEY,
        VIEWER,
        OPERATOR,
        "test-sandbox-key",
        TOKEN,
        AES_KEY,
        V2_KEY,
        SANDBOX_KEY,
    ];
    for (url, html) in &seen.0 {
        for secret in app_secret_like {
            assert!(!html.contains(secret), "{secret} in {url}");
        }
        // nothing the Content-Security-Policy would have to allow
        assert!(!html.contains("<script"), "a script in {url}");
        assert!(!html.contains(" style="), "an inline style in {url}");
    }
    assert!(seen.0.len() >= 17, "pages checked: {}", seen.0.len());

    drop(browser);
    let _ = stop.send(true);
    let _ = server.await;
    worker.stop().await;
    env.cleanup(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_browser_on_sqlite() {
    story(push_env("console"), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_browser_on_postgres() {
    let db = TestDb::new("console").await;
    let mut env = push_env("console-pg");
    env.share_outbox(&db);
    story(env, false).await;
}

/// `run` serves the console beside the worker when `[console] listen` is set (here
/// with the viewer token only), and stops it with the worker on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_the_console_when_listen_is_set() {
    let mut env = TestEnv::new("console-run");
    let port = free_port();
    env.set("CONSOLE__LISTEN", &format!("127.0.0.1:{port}"));
    env.env
        .insert("MIDAS_CONSOLE_VIEWER_TOKEN".into(), VIEWER.into());
    let sim = env.simulator(Faults::default()).await;
    let mut child = env.spawn_child(&sim.base_url());
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + T;
    let page = loop {
        if let Ok(r) = http
            .get(format!("{base}/"))
            .bearer_auth(VIEWER)
            .send()
            .await
        {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the console never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let status = page.status();
    let csp = page
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    let html = page.text().await.unwrap();
    assert_eq!(status, 200, "{html}");
    assert!(html.contains("<h1>Overview</h1>"));
    let r = http.get(format!("{base}/search")).send().await.unwrap();
    assert_eq!(r.status(), 303, "no token: to the login form");
    let r = http
        .get(format!("{base}/"))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "no operator token is configured");
    // a sign-in POST without the login form's cookie-bound token: no session
    let r = http
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={VIEWER}&csrf=forged&next=%2F"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "login CSRF refused");
    assert!(
        r.headers()
            .get_all("set-cookie")
            .iter()
            .all(|c| !c.to_str().unwrap_or_default().starts_with("midas_console=")),
        "no session cookie"
    );
    assert!(
        terminate(&mut child, Duration::from_secs(20)),
        "exit 0 on SIGTERM"
    );
    assert!(
        http.get(format!("{base}/")).send().await.is_err(),
        "the console stopped with the worker"
    );
    let c = env.client().await;
    env.cleanup(&c).await;
}
