//! `outbox republish BILL_NO`: re-send the stored final replies of one bill_no (the
//! running worker publishes them again within seconds). The set form lives in
//! [`super::bulk`].

use std::io::Write;

use serde_json::json;

use super::{
    actor_name, check_op, open_write, record_action, refused, select, AuditError, Filters, Operator,
};
use crate::command::now_ms;
use crate::config::Settings;
use crate::outbox::operator::JobRow;

pub(super) fn republish(
    bill_no: &str,
    f: &Filters,
    who: &Operator,
    settings: &Settings,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    let (op, appid) = (f.op.as_deref(), f.appid.as_deref());
    if let Some(op) = op {
        check_op(op)?;
    }
    let mut store = open_write(settings)?;
    let tx = store.write()?;
    let now = now_ms();
    let all = tx.jobs_by_bill_no(bill_no, appid)?;
    let matching = select(&all, bill_no, op, appid)?;
    let finals: Vec<&JobRow> = matching.iter().copied().filter(|j| j.is_final()).collect();
    if finals.is_empty() {
        return Err(refused(
            "job is not final; its reply will be published when it is",
        ));
    }
    let skipped_pending = matching.len() - finals.len();
    let actor = actor_name(who);
    let mut queued = 0usize;
    {
        for j in &finals {
            let n = tx.requeue_replies(j.id, true)?;
            queued += n;
            let detail = json!({
                "job_id": j.id,
                "op": j.op,
                "appid": j.appid,
                "targets": n,
                "reason": who.reason,
            });
            record_action(&tx, now, &actor, "republish", bill_no, &detail)?;
        }
    }
    tx.commit()?;
    writeln!(
        out,
        "queued {queued} reply target{} of {} final job{} for re-publishing; the running worker publishes them within a few seconds",
        if queued == 1 { "" } else { "s" },
        finals.len(),
        if finals.len() == 1 { "" } else { "s" },
    )?;
    if skipped_pending > 0 {
        writeln!(
            out,
            "skipped {skipped_pending} pending job{}: not final; its reply will be published when it is",
            if skipped_pending == 1 { "" } else { "s" }
        )?;
    }
    Ok(())
}
