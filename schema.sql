-- The outbox schema: the single truth. Applied by the worker at every start
-- (idempotent). Times are unix milliseconds (UTC).
--
-- A job is one (appid, op, bill_no): a pay and the cancel of that pay are two jobs,
-- and two apps may use the same bill_no for different orders.
-- Its state is one of the names of docs/contract.md:
--   pending   accepted, waiting for its (next) call to Midas
--   succeeded Midas answered 0 (or 90012: already processed)
--   failed    Midas gave a definitive error
--   unknown   retries ran out before a definitive answer: a person must reconcile
PRAGMA foreign_keys = ON;

CREATE TABLE IF NOT EXISTS jobs (
    id               INTEGER PRIMARY KEY,        -- arrival order
    op               TEXT    NOT NULL CHECK (op IN ('pay', 'present', 'cancel_pay')),
    bill_no          TEXT    NOT NULL,
    appid            TEXT    NOT NULL,
    openid           TEXT    NOT NULL,
    request          TEXT    NOT NULL,           -- canonical parameters, JSON, no secrets
    session_key      TEXT,                       -- erased when the job is final
    state            TEXT    NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'succeeded', 'failed', 'unknown')),
    attempts         INTEGER NOT NULL DEFAULT 0, -- calls to Midas for this bill_no
    calls            INTEGER NOT NULL DEFAULT 0, -- calls that may have gone out: counted
                                                 -- durably BEFORE each call
    uncertain        INTEGER NOT NULL DEFAULT 0, -- 1 once a call of this job went unanswered
    next_attempt_at  INTEGER NOT NULL,
    first_attempt_at INTEGER,                    -- start of the 48 h bill_no window
    reopened_at      INTEGER,                    -- last re-open (90010 + new session_key, outbox retry)
    last_errcode     INTEGER,
    last_error       TEXT,
    result           TEXT,                       -- the final reply, JSON, verbatim
    received_at      INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    finished_at      INTEGER,
    UNIQUE (appid, op, bill_no)
);
CREATE INDEX IF NOT EXISTS jobs_state_id ON jobs (state, id);
CREATE INDEX IF NOT EXISTS jobs_openid_id ON jobs (openid, id);
CREATE INDEX IF NOT EXISTS jobs_bill_no ON jobs (bill_no);
CREATE INDEX IF NOT EXISTS jobs_received_at ON jobs (received_at);

-- Every command that asked for a job's bill_no, and whether its reply was confirmed.
CREATE TABLE IF NOT EXISTS reply_targets (
    id             INTEGER PRIMARY KEY,
    job_id         INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    reply_to       TEXT    NOT NULL,
    correlation_id TEXT    NOT NULL,
    added_at       INTEGER NOT NULL,
    published_at   INTEGER,                      -- set on the broker's confirm only
    returned       INTEGER NOT NULL DEFAULT 0,   -- 1: confirmed but unroutable (no such queue)
    UNIQUE (job_id, reply_to, correlation_id)
);
CREATE INDEX IF NOT EXISTS reply_targets_unpublished
    ON reply_targets (job_id) WHERE published_at IS NULL;

-- One row per call to Midas.
CREATE TABLE IF NOT EXISTS attempts (
    id          INTEGER PRIMARY KEY,
    job_id      INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    n           INTEGER NOT NULL,                -- the job's attempt number (1-based)
    api         TEXT    NOT NULL,                -- pay, present, cancelpay, getbalance
    started_at  INTEGER NOT NULL,
    latency_ms  INTEGER NOT NULL,
    http_status INTEGER,
    errcode     INTEGER,
    errmsg      TEXT,
    outcome     TEXT    NOT NULL                 -- success, duplicate, definitive, transient, token_invalid
);
CREATE INDEX IF NOT EXISTS attempts_job ON attempts (job_id, id);

-- Every operator action (outbox retry/republish/prune): who, when, what.
CREATE TABLE IF NOT EXISTS operator_actions (
    id      INTEGER PRIMARY KEY,
    at      INTEGER NOT NULL,
    actor   TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    target  TEXT    NOT NULL,
    detail  TEXT    NOT NULL
);

-- Verified WeChat payment pushes (src/push/): one row per (appid, kind, dedup key),
-- however often WeChat repeats the push. The dedup key is the OutTradeNo (coins,
-- items) or the RefundId (refunds). `message` is the events-queue message, JSON,
-- verbatim: published until the broker confirms it (`published_at`). Added after
-- version 2 without a version change: CREATE IF NOT EXISTS adds it to older files
-- at their next writable open.
CREATE TABLE IF NOT EXISTS pushes (
    id               INTEGER PRIMARY KEY,        -- arrival order
    appid            TEXT    NOT NULL,
    kind             TEXT    NOT NULL
                     CHECK (kind IN ('coins_delivered', 'goods_delivered', 'refunded')),
    dedup_key        TEXT    NOT NULL,
    event            TEXT    NOT NULL,           -- WeChat's Event name
    event_id         TEXT    NOT NULL,           -- stable id of the event message
    openid           TEXT,                       -- none on refunds
    out_trade_no     TEXT,
    env              INTEGER NOT NULL,           -- 0 production, 1 sandbox
    message          TEXT    NOT NULL,
    received_at      INTEGER NOT NULL,
    last_received_at INTEGER NOT NULL,
    repeats          INTEGER NOT NULL DEFAULT 0, -- later receipts, answered without a new event
    published_at     INTEGER,                    -- set on the broker's confirm only
    UNIQUE (appid, kind, dedup_key)
);
CREATE INDEX IF NOT EXISTS pushes_unpublished ON pushes (id) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS pushes_out_trade_no ON pushes (out_trade_no);
CREATE INDEX IF NOT EXISTS pushes_received_at ON pushes (received_at);

CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- Version 2: jobs keyed by (appid, op, bill_no), columns calls and uncertain.
-- A version-1 file is rebuilt to this schema at start-up (src/outbox/schema.rs).
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '2');
