//! The Midas HTTP client against hostile or broken servers: a redirect never carries
//! a signed body or the app secret anywhere else, an oversized answer is refused
//! after at most 64 KiB, a clear-text non-loopback `midas.base_url` is refused at
//! start, and an absurd token `expires_in` neither panics nor pins a token forever.
//!
//! The Midas stand-ins are small raw HTTP/1.1 servers written here, so each can
//! answer exactly what a misbehaving server would (307/308, a body that never ends).

use std::sync::{Arc, Mutex};

use midas_worker::command::{Op, Params};
use midas_worker::midas::errcode::OutcomeClass;
use midas_worker::midas::{Api, MidasClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const APPID: &str = "wx1234567";

/// What a stand-in answers to one request.
#[derive(Clone)]
enum Answer {
    /// 200 with this JSON body.
    Json(String),
    /// This status (307/308) with a Location header.
    Redirect(u16, String),
    /// 200 announcing a `declared`-byte body (chunked when `None`), sending only
    /// `send` bytes of it and then never finishing.
    Endless {
        declared: Option<usize>,
        send: usize,
    },
}

/// A raw HTTP/1.1 server answering by path; it records every request path it sees.
struct StandIn {
    url: String,
    seen: Arc<Mutex<Vec<String>>>,
}

impl StandIn {
    async fn start(answer: impl Fn(&str) -> Answer + Send + Sync + 'static) -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(answer);
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, s.clone(), answer.clone()));
            }
        });
        StandIn { url, seen }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve(
    mut sock: TcpStream,
    seen: Arc<Mutex<Vec<String>>>,
    answer: Arc<dyn Fn(&str) -> Answer + Send + Sync>,
) {
    let mut buf = Vec::new();
    loop {
        // one request: head, then Content-Length bytes of body
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let path = head
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .split('?')
            .next()
            .unwrap_or("")
            .to_string();
        let body_len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + body_len {
            let mut chunk = [0u8; 4096];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + body_len);
        seen.lock().unwrap().push(path.clone());
        match answer(&path) {
            Answer::Json(body) => {
                let r = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if sock.write_all(r.as_bytes()).await.is_err() {
                    return;
                }
            }
            Answer::Redirect(code, location) => {
                let r = format!(
                    "HTTP/1.1 {code} Redirect\r\nlocation: {location}\r\ncontent-length: 0\r\n\r\n"
                );
                if sock.write_all(r.as_bytes()).await.is_err() {
                    return;
                }
            }
            Answer::Endless { declared, send } => {
                let head = match declared {
                    Some(n) => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {n}\r\n\r\n"
                    ),
                    None => "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                        .to_string(),
                };
                let _ = sock.write_all(head.as_bytes()).await;
                let piece = vec![b' '; 16 * 1024];
                let mut sent = 0;
                while sent < send {
                    let ok = if declared.is_some() {
                        sock.write_all(&piece).await
                    } else {
                        let mut c = format!("{:x}\r\n", piece.len()).into_bytes();
                        c.extend_from_slice(&piece);
                        c.extend_from_slice(b"\r\n");
                        sock.write_all(&c).await
                    };
                    if ok.is_err() {
                        return;
                    }
                    sent += piece.len();
                }
                // never finish: hold the connection until the client gives up on it
                let mut sink = [0u8; 1024];
                while matches!(sock.read(&mut sink).await, Ok(n) if n > 0) {}
                return;
            }
        }
    }
}

fn token_json(expires_in: &str) -> String {
    format!(r#"{{"access_token":"TOKEN-1","expires_in":{expires_in}}}"#)
}

fn pay_params() -> Params {
    Params {
        op: Op::Pay,
        bill_no: Some(crate::common::unique("HARDEN")),
        openid: "player-A".into(),
        appid: APPID.into(),
        zone_id: "1".into(),
        pf: "android".into(),
        user_ip: None,
        amt: Some(10),
        present_counts: None,
        pay_item: None,
        app_remark: None,
        query: None,
        pay_bill_no: None,
    }
}

fn client_for(url: &str) -> MidasClient {
    let env = crate::common::TestEnv::new("harden");
    MidasClient::new(&env.settings(), url).expect("client for a loopback stand-in")
}

#[tokio::test]
async fn a_307_on_pay_is_not_followed() {
    let elsewhere = StandIn::start(|_| Answer::Json(r#"{"errcode":0,"balance":1}"#.into())).await;
    let target = format!("{}/cgi-bin/midas/pay", elsewhere.url);
    let midas = StandIn::start(move |path| {
        if path == "/cgi-bin/stable_token" {
            Answer::Json(token_json("7200"))
        } else {
            Answer::Redirect(307, target.clone())
        }
    })
    .await;
    let client = client_for(&midas.url);
    let a = client.call(Api::Pay, &pay_params(), None).await;
    assert_eq!(a.http_status, Some(307), "{a:?}");
    assert_eq!(a.class, OutcomeClass::Transient, "{a:?}");
    assert!(
        midas.seen().contains(&"/cgi-bin/midas/pay".to_string()),
        "{:?}",
        midas.seen()
    );
    assert!(
        elsewhere.seen().is_empty(),
        "the signed pay was re-posted to the redirect target: {:?}",
        elsewhere.seen()
    );
}

#[tokio::test]
async fn a_308_on_the_token_fetch_is_not_followed() {
    let elsewhere = StandIn::start(|_| Answer::Json(token_json("7200"))).await;
    let target = format!("{}/cgi-bin/stable_token", elsewhere.url);
    let midas = StandIn::start(move |_| Answer::Redirect(308, target.clone())).await;
    let client = client_for(&midas.url);
    let err = client
        .tokens()
        .get(APPID)
        .await
        .expect_err("a redirect is no token");
    assert!(err.to_string().contains("308"), "{err}");
    let a = client.call(Api::Pay, &pay_params(), None).await;
    assert_eq!(a.class, OutcomeClass::Transient, "{a:?}");
    assert!(
        elsewhere.seen().is_empty(),
        "the app secret was re-posted to the redirect target: {:?}",
        elsewhere.seen()
    );
    assert_eq!(midas.seen().len(), 2, "{:?}", midas.seen());
}

const TEN_MB: usize = 10 * 1024 * 1024;

#[tokio::test]
async fn a_10_mb_answer_is_refused_not_buffered() {
    // Each stand-in announces 10 MB but sends 128 KiB and then stalls: a client that
    // tried to read it whole would wait for the rest and end in a timeout instead.
    for declared in [Some(TEN_MB), None] {
        let midas = StandIn::start(move |path| {
            if path == "/cgi-bin/stable_token" {
                Answer::Json(token_json("7200"))
            } else {
                Answer::Endless {
                    declared,
                    send: 128 * 1024,
                }
            }
        })
        .await;
        let client = client_for(&midas.url);
        let a = client.call(Api::Pay, &pay_params(), None).await;
        assert_eq!(a.class, OutcomeClass::Transient, "{a:?}");
        let why = a.errmsg.clone().unwrap_or_default();
        assert!(
            why.contains("larger than 64 KiB"),
            "declared {declared:?}: {why}"
        );
    }
}

#[tokio::test]
async fn a_10_mb_token_answer_is_refused() {
    let midas = StandIn::start(|_| Answer::Endless {
        declared: None,
        send: 128 * 1024,
    })
    .await;
    let client = client_for(&midas.url);
    let err = client.tokens().get(APPID).await.expect_err("no token");
    assert!(err.to_string().contains("larger than 64 KiB"), "{err}");
}

#[tokio::test]
async fn absurd_expires_in_neither_panics_nor_refetches_early() {
    for (expires_in, cached) in [
        (i64::MAX.to_string(), true),
        (u64::MAX.to_string(), true),
        ("1e300".to_string(), true),
        ("-1".to_string(), false),
        (i64::MIN.to_string(), false),
    ] {
        let json = token_json(&expires_in);
        let midas = StandIn::start(move |_| Answer::Json(json.clone())).await;
        let client = client_for(&midas.url);
        let t = client.tokens().get(APPID).await;
        assert!(t.is_ok(), "expires_in {expires_in}: {t:?}");
        let again = client.tokens().get(APPID).await;
        assert!(again.is_ok(), "expires_in {expires_in}: {again:?}");
        if cached {
            // clamped to 2 h: the second call uses the cached token
            assert_eq!(client.tokens().fetches(APPID).await, 1, "{expires_in}");
        }
    }
}

#[test]
fn clear_text_base_url_is_refused_outside_the_simulator() {
    for environment in ["production", "sandbox"] {
        let mut env = crate::common::TestEnv::new("baseurl");
        env.set("MIDAS__ENVIRONMENT", environment);
        let settings = env.settings();
        for bad in [
            "http://api.weixin.qq.com",
            "http://10.0.0.8:8080",
            "ftp://x",
        ] {
            let err = MidasClient::new(&settings, bad)
                .err()
                .unwrap_or_else(|| panic!("{environment}: {bad} accepted"));
            assert!(err.to_string().contains("midas.base_url"), "{err}");
        }
        for good in [
            "https://api.weixin.qq.com",
            "http://127.0.0.1:9",
            "http://localhost:9",
            "http://[::1]:9",
        ] {
            if let Err(e) = MidasClient::new(&settings, good) {
                panic!("{environment}: {good} refused: {e}");
            }
        }
    }
}
