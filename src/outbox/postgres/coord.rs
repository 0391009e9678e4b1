//! Leases on the shared outbox: which worker runs which player's jobs.
//!
//! Each worker, twice a second ([`Coordinator::tick`]), loads the pending jobs of
//! its players it has not loaded yet, in arrival order (`FOR UPDATE SKIP LOCKED`,
//! so two workers never load the same row), and renews the `relay` lease (the
//! reply relay runs on whichever worker holds it). Every `outbox.lease / 3` it
//! also renews its player leases, notices players it lost (its lease ran out and
//! another worker took the player: the engine drops them), gives back players it
//! has no pending job for, and takes players whose pending jobs have no live lease
//! (a worker died or was cut off).
//!
//! Every expiry is judged by the database's clock ([`super::NOW_MS`]).

use tokio_postgres::Client;

use super::writer::{job_from_row, Fence};
use super::NOW_MS;
use crate::engine::job::Job;
use crate::engine::HeldPlayer;
use crate::outbox::query::Gauges;
use crate::outbox::{OutboxError, OutgoingReply};
use crate::secret::SecretUrl;

/// What one look found.
#[derive(Debug, Default)]
pub struct Tick {
    /// Players this worker held (as the caller said) whose lease it lost: gone,
    /// or now at another generation than the one the caller named.
    pub lost: Vec<HeldPlayer>,
    /// Pending jobs of this worker's players, not loaded before, in arrival order.
    pub jobs: Vec<Job>,
    /// Whether this worker runs the reply relay now.
    pub relay: bool,
}

/// The coordination connection of one worker (separate from the writer's, so
/// lease work never waits behind a group commit). It listens on
/// [`super::JOBS_CHANNEL`]: a worker that recorded a job for a player this one
/// holds says so at its commit, and [`Coordinator::wake`] fires, so the job is
/// loaded at once instead of at the next look.
pub struct Coordinator {
    url: SecretUrl,
    client: Option<Client>,
    fence: Fence,
    wake: std::sync::Arc<tokio::sync::Notify>,
}

impl Coordinator {
    pub fn new(url: SecretUrl, fence: Fence) -> Coordinator {
        Coordinator {
            url,
            client: None,
            fence,
            wake: std::sync::Arc::default(),
        }
    }

    /// Fires when another worker recorded a job that may be for a player this
    /// worker holds (a notification on its connection).
    pub fn wake(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.wake.clone()
    }

    async fn client(&mut self) -> Result<&mut Client, OutboxError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(super::reconnect_listening(&self.url, self.wake.clone()).await?);
            // notifications sent while it was away are lost: look once anyway
            self.wake.notify_one();
        }
        self.client
            .as_mut()
            .ok_or_else(|| OutboxError::Corrupt("no PostgreSQL connection".into()))
    }

    /// One look. `held`: the players the engine holds jobs of; `room`: how many
    /// more jobs the engine may take; `renew`: renew the leases this time;
    /// `relay`: this worker can publish (its broker connection is up) — a worker
    /// that cannot gives the relay lease up, so another worker relays.
    pub async fn tick(
        &mut self,
        held: &[HeldPlayer],
        room: usize,
        renew: bool,
        relay: bool,
    ) -> Result<Tick, OutboxError> {
        let me = self.fence.me.clone();
        let lease = self.fence.lease_ms;
        let c = self.client().await?;
        // The relay lease first: every statement after a claim must not be able to
        // fail, or the claimed jobs would be dropped with the error.
        let relay = if relay {
            super::trip();
            c.query_opt(
                &format!(
                    "INSERT INTO leases (name, owner, expires_at) VALUES ('relay', $1, {NOW_MS} + $2) \
                     ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at \
                     WHERE leases.owner = EXCLUDED.owner OR leases.expires_at <= {NOW_MS} \
                     RETURNING owner"
                ),
                &[&&*me, &lease],
            )
            .await?
            .is_some()
        } else {
            super::trip();
            c.execute(
                "DELETE FROM leases WHERE name = 'relay' AND owner = $1",
                &[&&*me],
            )
            .await?;
            false
        };
        let mut out = Tick {
            relay,
            ..Tick::default()
        };
        if renew {
            super::trip();
            let rows = c
                .query(
                    &format!(
                        "UPDATE player_leases l SET expires_at = {NOW_MS} + $2 FROM ( \
                           SELECT appid, openid FROM player_leases WHERE owner = $1 \
                           ORDER BY appid, openid FOR UPDATE) mine \
                         WHERE l.appid = mine.appid AND l.openid = mine.openid AND l.owner = $1 \
                         RETURNING l.appid, l.openid, l.generation, l.expires_at"
                    ),
                    &[&&*me, &lease],
                )
                .await?;
            let mut owned = std::collections::HashMap::with_capacity(rows.len());
            // the latest expiry this renewal set: a lease with a later one was taken
            // or refreshed by an intake since, perhaps for a job not committed yet
            let mut renewed_until = i64::MIN;
            for r in rows {
                owned.insert(
                    (r.try_get::<_, String>(0)?, r.try_get::<_, String>(1)?),
                    r.try_get::<_, i64>(2)?,
                );
                renewed_until = renewed_until.max(r.try_get::<_, i64>(3)?);
            }
            // by generation: a lease this worker holds again at a newer one (taken
            // back meanwhile) still means the older tenure's jobs are gone
            out.lost = held
                .iter()
                .filter(|p| owned.get(&(p.appid.clone(), p.openid.clone())) != Some(&p.gen))
                .cloned()
                .collect();
            super::trip();
            // players with no pending job: give them back — only leases this
            // renewal set. An intake that takes or refreshes a lease (for a job it
            // is committing: invisible to this statement's NOT EXISTS) sets a later
            // expiry and holds the row until it commits; the delete then re-checks
            // that row's expiry and keeps it. Without this, the new job's pre-call
            // mark found no lease (one fenced mark in ~2,000 at steady traffic).
            // A lease row locked right now (an intake taking or refreshing it in
            // this worker's open writer transaction) is skipped, not waited for:
            // waiting made a cycle with that transaction's next statements, which
            // PostgreSQL broke after its 1 s deadlock timeout by failing one side
            // (several times a run at full load); the row is kept, as it should be.
            c.execute(
                "DELETE FROM player_leases l USING ( \
                   SELECT appid, openid FROM player_leases i WHERE i.owner = $1 AND i.expires_at <= $2 \
                   AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.appid = i.appid \
                   AND j.openid = i.openid AND j.state = 'pending') \
                   FOR UPDATE SKIP LOCKED) idle \
                 WHERE l.appid = idle.appid AND l.openid = idle.openid AND l.owner = $1 \
                 AND l.expires_at <= $2",
                &[&&*me, &renewed_until],
            )
            .await?;
            // Jobs this worker claimed whose player its engine does not hold (a
            // give-back that failed, a claim whose answer was lost): unclaimed, so
            // the lease holder loads them again. A job claimed an instant ago by
            // intake comes back too; the engine already holding it just joins it.
            // A job row locked right now (this worker's writer is marking or
            // finishing it) is skipped until the next renewal: waiting for it
            // deadlocked with the writer's transaction (see the give-back above).
            let (apps, openids): (Vec<String>, Vec<String>) = held
                .iter()
                .map(|p| (p.appid.clone(), p.openid.clone()))
                .unzip();
            super::trip();
            // the rows picked are found again by id: on the primary key (see
            // `still_pending!`)
            c.execute(
                concat!(
                    "UPDATE jobs j SET claimed_by = NULL WHERE j.id IN ( \
                       SELECT s.id FROM jobs s WHERE s.claimed_by = $1 AND s.state = 'pending' \
                       AND NOT EXISTS (SELECT 1 FROM unnest($2::text[], $3::text[]) AS h(appid, openid) \
                         WHERE h.appid = s.appid AND h.openid = s.openid) \
                       FOR UPDATE SKIP LOCKED) \
                     AND j.claimed_by = $1 AND ",
                    super::still_pending!("j.")
                ),
                &[&&*me, &apps, &openids],
            )
            .await?;
        }
        if !out.lost.is_empty() {
            release_claims(c, &me, &out.lost).await?;
        }
        let room = i64::try_from(room).unwrap_or(i64::MAX);
        // Taking over players (a scan of the pending jobs) runs with the renewals;
        // loading the jobs of players already held (an index on the unclaimed
        // ones) runs at every look.
        if room > 0 && renew {
            super::trip();
            // players with pending jobs and no live lease, oldest first; their jobs
            // were loaded by the previous holder: unclaimed in the same statement,
            // so the taken players are always loaded here
            let taken = c
                .query(
                    &format!(
                        "WITH cand AS ( \
                           SELECT j.appid, j.openid FROM jobs j \
                           WHERE j.state = 'pending' AND NOT EXISTS ( \
                             SELECT 1 FROM player_leases l WHERE l.appid = j.appid \
                             AND l.openid = j.openid AND l.expires_at > {NOW_MS}) \
                           GROUP BY j.appid, j.openid ORDER BY min(j.id) LIMIT $2), \
                         taken AS ( \
                           INSERT INTO player_leases (appid, openid, owner, expires_at) \
                           SELECT appid, openid, $1, {NOW_MS} + $3 FROM cand \
                           ON CONFLICT (appid, openid) DO UPDATE \
                             SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at, \
                             generation = CASE WHEN player_leases.owner = EXCLUDED.owner \
                               THEN player_leases.generation ELSE EXCLUDED.generation END \
                             WHERE player_leases.expires_at <= {NOW_MS} \
                           RETURNING appid, openid), \
                         unclaimed AS ( \
                           UPDATE jobs j SET claimed_by = NULL FROM taken t \
                           WHERE j.appid = t.appid AND j.openid = t.openid AND j.state = 'pending' \
                           RETURNING j.id) \
                         SELECT count(*) FROM taken"
                    ),
                    &[&&*me, &room, &lease],
                )
                .await?;
            let n: i64 = taken
                .first()
                .map(|r| r.try_get(0))
                .transpose()?
                .unwrap_or(0);
            if n > 0 {
                tracing::info!(players = n, "took over players whose lease had run out");
            }
        }
        if room > 0 {
            super::trip();
            // a claim names the lease generation it was made under: the engine
            // runs the jobs under it, and a newer one means a take (see
            // `engine::lease`). Only under a lease that has not run out: an
            // expired one may be taken by another worker while this claim runs.
            let rows = c
                .query(
                    &format!(
                        "UPDATE jobs SET claimed_by = $1 FROM player_leases l WHERE jobs.id IN ( \
                           SELECT j.id FROM jobs j JOIN player_leases l \
                             ON l.appid = j.appid AND l.openid = j.openid \
                           WHERE j.state = 'pending' AND j.claimed_by IS NULL AND l.owner = $1 \
                             AND l.expires_at > {NOW_MS} \
                           ORDER BY j.id LIMIT $2 FOR UPDATE OF j SKIP LOCKED) \
                         AND l.appid = jobs.appid AND l.openid = jobs.openid AND l.owner = $1 \
                         AND l.expires_at > {NOW_MS} \
                         RETURNING {}, l.generation",
                        super::writer::JOB_COLS
                    ),
                    &[&&*me, &room],
                )
                .await?;
            for r in &rows {
                let mut job = job_from_row(r)?;
                job.lease_gen = r.try_get(12)?;
                out.jobs.push(job);
            }
            out.jobs.sort_by_key(|j| j.id);
        }
        Ok(out)
    }

    /// Give players back (a write of the given lease generation was fenced out):
    /// their jobs are loaded again by whoever takes them. Fenced by generation:
    /// a player this worker holds at another (newer) generation is kept, with its
    /// claims.
    pub async fn release(
        &mut self,
        players: &[crate::outbox::GiveBack],
    ) -> Result<(), OutboxError> {
        let me = self.fence.me.clone();
        let c = self.client().await?;
        let apps: Vec<&str> = players.iter().map(|p| p.appid.as_str()).collect();
        let openids: Vec<&str> = players.iter().map(|p| p.openid.as_str()).collect();
        let gens: Vec<i64> = players.iter().map(|p| p.gen).collect();
        // One statement, so one transaction: the claims and the lease go together
        // (a give-back cut between two autocommit statements left the lease held
        // with its jobs unclaimed, or the jobs claimed with no lease). Both parts
        // see the snapshot from before the statement.
        super::trip();
        c.execute(
            "WITH p AS (SELECT * FROM unnest($2::text[], $3::text[], $4::bigint[]) AS p(appid, openid, gen)), \
             unclaimed AS ( \
               UPDATE jobs j SET claimed_by = NULL FROM p \
               WHERE j.appid = p.appid AND j.openid = p.openid AND j.state = 'pending' \
               AND j.claimed_by = $1 AND NOT EXISTS (SELECT 1 FROM player_leases l \
                 WHERE l.appid = p.appid AND l.openid = p.openid AND l.owner = $1 \
                 AND l.generation <> p.gen) \
               RETURNING j.id) \
             DELETE FROM player_leases l USING p \
             WHERE l.owner = $1 AND l.appid = p.appid AND l.openid = p.openid \
             AND l.generation = p.gen",
            &[&&*me, &apps, &openids, &gens],
        )
        .await?;
        Ok(())
    }

    /// At a clean stop: give back every lease so other workers take the players
    /// at once instead of after `outbox.lease`.
    pub async fn release_all(&mut self) -> Result<(), OutboxError> {
        let me = self.fence.me.clone();
        let c = self.client().await?;
        super::trip();
        c.execute(
            "UPDATE jobs SET claimed_by = NULL WHERE claimed_by = $1 AND state = 'pending'",
            &[&&*me],
        )
        .await?;
        super::trip();
        c.execute("DELETE FROM player_leases WHERE owner = $1", &[&&*me])
            .await?;
        super::trip();
        c.execute("DELETE FROM leases WHERE owner = $1", &[&&*me])
            .await?;
        Ok(())
    }

    /// Reply targets of final jobs whose reply is not confirmed yet, finished and
    /// asked for before `before` (unix ms): a reply another worker is publishing
    /// right now is left to it, not published a second time by the relay.
    /// Read from reply target `after` on (see [`crate::outbox::query::RelayCursor`]).
    pub async fn unpublished_replies(
        &mut self,
        after: i64,
        limit: usize,
        before: i64,
    ) -> Result<Vec<OutgoingReply>, OutboxError> {
        let c = self.client().await?;
        super::trip();
        let rows = c
            .query(
                "SELECT t.id, t.reply_to, t.correlation_id, j.result FROM reply_targets t \
                 JOIN jobs j ON j.id = t.job_id \
                 WHERE t.published_at IS NULL AND j.result IS NOT NULL \
                 AND t.added_at < $2 AND COALESCE(j.finished_at, 0) < $2 AND t.id > $3 \
                 ORDER BY t.id LIMIT $1",
                &[&i64::try_from(limit).unwrap_or(i64::MAX), &before, &after],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(OutgoingReply {
                target_id: Some(r.try_get(0)?),
                reply_to: r.try_get(1)?,
                correlation_id: r.try_get(2)?,
                payload: std::sync::Arc::from(r.try_get::<_, String>(3)?.into_bytes()),
            });
        }
        Ok(out)
    }

    /// Gauges for `/metrics`.
    pub async fn gauges(&mut self) -> Result<Gauges, OutboxError> {
        let c = self.client().await?;
        let mut by_state = Vec::new();
        super::trip();
        for r in c
            .query("SELECT state, COUNT(*) FROM jobs GROUP BY state", &[])
            .await?
        {
            by_state.push((r.try_get(0)?, r.try_get(1)?));
        }
        super::trip();
        let oldest_pending_ms = c
            .query_one(
                "SELECT MIN(received_at) FROM jobs WHERE state = 'pending'",
                &[],
            )
            .await?
            .try_get(0)?;
        super::trip();
        let replies_pending = c
            .query_one(
                "SELECT COUNT(*) FROM reply_targets WHERE published_at IS NULL",
                &[],
            )
            .await?
            .try_get(0)?;
        Ok(Gauges {
            by_state,
            oldest_pending_ms,
            replies_pending,
        })
    }
}

/// Jobs of these players claimed by this worker are unclaimed (loaded again by
/// whoever holds the player next).
async fn release_claims(c: &Client, me: &str, players: &[HeldPlayer]) -> Result<(), OutboxError> {
    let (apps, openids): (Vec<String>, Vec<String>) = players
        .iter()
        .map(|p| (p.appid.clone(), p.openid.clone()))
        .unzip();
    super::trip();
    c.execute(
        "UPDATE jobs j SET claimed_by = NULL FROM unnest($2::text[], $3::text[]) AS p(appid, openid) \
         WHERE j.appid = p.appid AND j.openid = p.openid AND j.state = 'pending' AND j.claimed_by = $1",
        &[&me, &apps, &openids],
    )
    .await?;
    Ok(())
}

/// Gauges for `/metrics` over a short-lived connection.
pub async fn gauges_at(url: &SecretUrl) -> Result<Gauges, OutboxError> {
    let client = super::reconnect(url).await?;
    let mut c = Coordinator {
        url: url.clone(),
        client: Some(client),
        wake: std::sync::Arc::default(),
        fence: Fence {
            me: std::sync::Arc::from(""),
            lease_ms: 0,
            call_ms: 0,
        },
    };
    c.gauges().await
}
