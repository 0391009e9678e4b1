//! `outbox migrate --to postgres://…`: move a single worker's SQLite outbox
//! (`outbox.path`) into a new, empty PostgreSQL outbox, so that several workers can
//! share it. The copy itself (every row and id, one transaction, sequences set past
//! the copied ids, the `migrate` action recorded) is [`crate::outbox::migrate`];
//! this verb checks the arguments and reports the counts. The URL is only ever
//! printed with its password masked.

use std::io::Write;

use super::fmt::one_line;
use super::{actor_name, AuditError, Operator};
use crate::command::now_ms;
use crate::config::Settings;
use crate::outbox::migrate::{self, Actor, MigrateError};
use crate::outbox::postgres::is_postgres_url;
use crate::secret::SecretUrl;

pub(super) fn migrate(
    to: &SecretUrl,
    who: &Operator,
    settings: &Settings,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    if !is_postgres_url(to.expose()) {
        return Err(AuditError::Usage(format!(
            "--to must be a postgres:// or postgresql:// URL (got {})",
            one_line(&to.masked())
        )));
    }
    let from = &settings.config.outbox.path;
    let name = actor_name(who);
    let actor = Actor {
        at: now_ms(),
        name: &name,
        reason: who.reason.as_deref(),
    };
    let done = match migrate::sqlite_to_postgres(from, to, &actor) {
        Ok(done) => done,
        Err(MigrateError::NotEmpty(c)) => {
            return Err(AuditError::Refused(format!(
                "refusing to migrate: the PostgreSQL outbox {} is not empty ({} jobs, {} reply targets, {} attempts, {} operator actions); migrate only into a new, empty outbox",
                one_line(&to.masked()),
                c.jobs,
                c.reply_targets,
                c.attempts,
                c.operator_actions
            )))
        }
        Err(MigrateError::Outbox(e)) => return Err(e.into()),
    };
    let c = done.copied;
    writeln!(
        out,
        "migrated {} to {}: {} jobs ({} pending), {} reply targets, {} attempts, {} operator actions, {} pushes; ids kept",
        from.display(),
        one_line(&to.masked()),
        c.jobs,
        done.pending,
        c.reply_targets,
        c.attempts,
        c.operator_actions,
        done.pushes
    )?;
    writeln!(
        out,
        "recorded in operator_actions (migrate); start the workers with outbox.url set to the new outbox; {} is marked migrated (no worker starts on it; its session_keys are erased; the audit verbs still read it)",
        from.display()
    )?;
    Ok(())
}
