//! The simulator's request handlers: the Midas 1.0 and 2.0 endpoints (token
//! check, body and signature checks, faults, then the ledger) and the `/sim/*`
//! control endpoints for tests and operators. Kept apart from `mod.rs`, which
//! holds the simulator's state, its start and stop, and the route table.

use super::*;

pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(super) fn err_json(errcode: i64, errmsg: &str) -> Value {
    json!({"errcode": errcode, "errmsg": errmsg})
}

// ---------------------------------------------------------------- midas endpoints

/// What the handler does after the synchronous part.
pub(super) enum Outcome {
    Answer(Value),
    Http502,
    /// Applied; answer after the stall (the client has given up by then).
    StallThenAnswer(Value, Duration),
    /// Not applied; stall, then a non-JSON 504.
    StallThenDrop(Duration),
}

/// Which family of paths a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Route {
    /// `/cgi-bin/midas/*` (or `/cgi-bin/midas/sandbox/*`).
    V1 { sandbox: bool },
    /// `/wxa/game/*`.
    V2,
}

pub(super) type QueryMap = Result<Query<HashMap<String, String>>, QueryRejection>;

pub(super) async fn midas_official(
    State(shared): State<Arc<Shared>>,
    Path(op): Path<String>,
    uri: Uri,
    query: QueryMap,
    body: Bytes,
) -> Response {
    midas(shared, &op, Route::V1 { sandbox: false }, uri, query, body).await
}

pub(super) async fn midas_sandbox(
    State(shared): State<Arc<Shared>>,
    Path(op): Path<String>,
    uri: Uri,
    query: QueryMap,
    body: Bytes,
) -> Response {
    midas(shared, &op, Route::V1 { sandbox: true }, uri, query, body).await
}

pub(super) async fn midas_v2(
    State(shared): State<Arc<Shared>>,
    Path(op): Path<String>,
    uri: Uri,
    query: QueryMap,
    body: Bytes,
) -> Response {
    midas(shared, &op, Route::V2, uri, query, body).await
}

pub(super) async fn midas(
    shared: Arc<Shared>,
    op: &str,
    route: Route,
    uri: Uri,
    query: QueryMap,
    body: Bytes,
) -> Response {
    let Some(op) = Op::from_path(op) else {
        return (StatusCode::NOT_FOUND, Json(err_json(404, "no such api"))).into_response();
    };
    let mut query = query.map(|Query(q)| q).unwrap_or_default();
    let token = query.remove("access_token");
    let kind = match route {
        Route::V1 { .. } => op.kind().to_string(),
        Route::V2 => format!("v2_{}", op.kind()),
    };
    let openid = openid_of(&body);
    let latency = {
        let mut st = shared.lock();
        *st.calls.entry(kind).or_insert(0) += 1;
        st.calls_now += 1;
        st.peak_in_flight = st.peak_in_flight.max(st.calls_now);
        if let Some(o) = &openid {
            let n = st.in_flight.entry(o.clone()).or_insert(0);
            *n += 1;
            if *n > 1 {
                st.overlapping_calls += 1;
            }
        }
        st.faults.latency_ms
    };
    let _in_flight = InFlight {
        shared: &shared,
        openid,
    };
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let outcome = match route {
        Route::V1 { sandbox } => process(&shared, op, sandbox, uri.path(), token.as_deref(), &body),
        Route::V2 => v2::process(&shared, op, uri.path(), token.as_deref(), &query, &body),
    };
    respond(outcome).await
}

/// The HTTP answer of a call's outcome (stalls included).
pub(super) async fn respond(outcome: Outcome) -> Response {
    match outcome {
        Outcome::Answer(v) => Json(v).into_response(),
        Outcome::Http502 => (
            StatusCode::BAD_GATEWAY,
            Html("<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center></body></html>"),
        )
            .into_response(),
        Outcome::StallThenAnswer(v, stall) => {
            tokio::time::sleep(stall).await;
            Json(v).into_response()
        }
        Outcome::StallThenDrop(stall) => {
            tokio::time::sleep(stall).await;
            (StatusCode::GATEWAY_TIMEOUT, "upstream timed out\u{0}\u{7f}garbage").into_response()
        }
    }
}

pub(super) fn log_refused(route: Route, op: Op, r: &Reject, appid: &str) {
    tracing::debug!(
        kind = op.kind(),
        route = ?route,
        appid,
        errcode = r.errcode,
        errmsg = %r.errmsg,
        "sim call refused"
    );
}

/// The access token's appid, or the refusal to answer.
pub(super) fn check_token(
    st: &Inner,
    route: Route,
    op: Op,
    token: Option<&str>,
) -> Result<String, Outcome> {
    st.tokens
        .check(token, Instant::now())
        .map(str::to_string)
        .map_err(|(code, msg)| {
            let r = Reject::new(code, msg);
            log_refused(route, op, &r, "");
            Outcome::Answer(err_json(r.errcode, &r.errmsg))
        })
}

/// A 1.0 call: everything between the request and the answer that needs the lock.
pub(super) fn process(
    shared: &Shared,
    op: Op,
    sandbox: bool,
    uri: &str,
    token: Option<&str>,
    body: &[u8],
) -> Outcome {
    let route = Route::V1 { sandbox };
    let mut st = shared.lock();
    let token_appid = match check_token(&st, route, op, token) {
        Ok(a) => a,
        Err(o) => return o,
    };
    let token = token.unwrap_or_default();
    let (req, session_key) = match authenticate(
        shared,
        &st.sessions,
        op,
        sandbox,
        uri,
        token,
        &token_appid,
        body,
    ) {
        Ok(r) => r,
        Err(r) => {
            log_refused(route, op, &r, &token_appid);
            return Outcome::Answer(err_json(r.errcode, &r.errmsg));
        }
    };
    let call = Call {
        route,
        op,
        token,
        appid: &req.appid,
        openid: &req.openid,
        bill_no: req.bill_no.as_deref(),
        session_key,
    };
    run(&mut st, call, |ledger| apply(ledger, &req))
}

/// Body checks, app lookup, `sig`, then `mp_sig` against registered session keys.
/// Also the session_key `mp_sig` verified with, when it is the registered one.
#[allow(clippy::too_many_arguments)]
pub(super) fn authenticate(
    shared: &Shared,
    sessions: &Sessions,
    op: Op,
    sandbox: bool,
    uri: &str,
    token: &str,
    token_appid: &str,
    body: &[u8],
) -> Result<(Request, Option<String>), Reject> {
    let req = verify::parse(op, body)?;
    let Some(app) = shared.apps.get(&req.appid) else {
        return Err(Reject::new(
            errcode::PARAM_ERROR,
            "param error: unknown appid",
        ));
    };
    if req.appid != token_appid {
        return Err(Reject::new(
            errcode::NO_PERMISSION,
            "no permission: access_token belongs to another appid",
        ));
    }
    let key = if sandbox {
        &app.sandbox_key
    } else {
        &app.app_key
    };
    if !verify::sig_ok(&req, uri, key.expose()) {
        return Err(Reject::new(errcode::SIG_WRONG, "sig wrong"));
    }
    let mut session_key = None;
    if req.mp_sig.is_some() {
        match sessions.check(&req.openid, |k| verify::mp_sig_ok(&req, uri, token, k)) {
            SessionCheck::Unknown => {}
            SessionCheck::Current => {
                session_key = sessions.current(&req.openid).map(str::to_string)
            }
            SessionCheck::Expired => {
                return Err(Reject::new(errcode::SESSION_EXPIRED, "session expired"))
            }
            SessionCheck::Wrong => return Err(Reject::new(errcode::MP_SIG_WRONG, "mp_sig wrong")),
        }
    }
    Ok((req, session_key))
}

/// Apply a checked request to the ledger; the JSON answer.
pub(super) fn apply(ledger: &mut Ledger, req: &Request) -> Value {
    let bill_no = req.bill_no.clone().unwrap_or_default();
    let amount = req.amount.unwrap_or(0);
    let result = match req.op {
        Op::GetBalance => {
            let a = ledger.balance(&req.appid, &req.openid);
            Ok(json!({
                "errcode": 0, "errmsg": "ok",
                "balance": a.balance, "gen_balance": a.gen_balance,
                "first_save": i32::from(a.first_save),
                "save_amt": a.save_amt, "save_sum": a.save_sum,
                "cost_sum": a.cost_sum, "present_sum": a.present_sum,
            }))
        }
        Op::Pay => ledger
            .pay(&req.appid, &req.openid, &bill_no, amount, now_ms())
            .map(|p| {
                json!({"errcode": 0, "errmsg": "ok", "bill_no": bill_no,
                       "balance": p.balance, "used_gen_amt": p.used_gen_amt})
            }),
        Op::Present => ledger
            .present(&req.appid, &req.openid, &bill_no, amount, now_ms())
            .map(|b| json!({"errcode": 0, "errmsg": "ok", "bill_no": bill_no, "balance": b})),
        Op::CancelPay => ledger
            .cancel_pay(&req.appid, &req.openid, &bill_no)
            .map(|()| json!({"errcode": 0, "errmsg": "ok", "bill_no": bill_no})),
    };
    result.unwrap_or_else(|e| err_json(e.errcode(), e.errmsg()))
}

// ---------------------------------------------------------------- admin

/// `POST /sim/purchase`: a paid order, pushed to the worker like WeChat pushes it.
pub(super) async fn sim_purchase(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let Some(p) = shared.pusher() else {
        return (StatusCode::NOT_FOUND, "pushes are not set up\n").into_response();
    };
    let purchase: push::Purchase = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    match p.purchase(purchase) {
        Ok(no) => Json(json!({ "out_trade_no": no })).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

/// `GET /sim/pushes`: the push ledger and its totals.
pub(super) async fn sim_pushes(State(shared): State<Arc<Shared>>) -> Response {
    match shared.pusher() {
        Some(p) => Json(json!({ "stats": p.stats(), "orders": p.orders() })).into_response(),
        None => (StatusCode::NOT_FOUND, "pushes are not set up\n").into_response(),
    }
}

pub(super) async fn sim_ledger(State(shared): State<Arc<Shared>>) -> Json<LedgerDump> {
    Json(shared.dump())
}

pub(super) async fn sim_faults(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match serde_json::from_slice::<Faults>(&body) {
        Ok(f) => {
            tracing::debug!(faults = ?f, "sim faults replaced");
            shared.lock().faults = f;
            Json(json!({"ok": true})).into_response()
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"ok": false, "error": e.to_string()})),
        )
            .into_response(),
    }
}

pub(super) async fn sim_revoke(State(shared): State<Arc<Shared>>) -> Json<Value> {
    shared.lock().tokens.revoke_all();
    tracing::debug!("sim tokens revoked");
    Json(json!({"ok": true}))
}

#[derive(Deserialize)]
pub(super) struct SessionBody {
    openid: String,
    session_key: String,
}

pub(super) async fn sim_sessions(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match serde_json::from_slice::<SessionBody>(&body) {
        Ok(s) if !s.openid.is_empty() && !s.session_key.is_empty() => {
            shared.lock().sessions.register(&s.openid, &s.session_key);
            tracing::debug!(openid = %s.openid, "sim session key registered");
            Json(json!({"ok": true})).into_response()
        }
        _ => (
            StatusCode::BAD_REQUEST,
            Json(json!({"ok": false, "error": "expected {\"openid\":..,\"session_key\":..}"})),
        )
            .into_response(),
    }
}
