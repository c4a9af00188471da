//! The invariants, and the simulated operator who answers what rekey asks of one.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rekey::clock::{Clock, VirtualClock};
use rekey::rotation::Phase;
use rekey::scheduler::Control;
use rekey::secret::Fingerprint;
use rekey::state::{Record, StateDb};
use tokio::sync::mpsc;

use super::world::World;
use super::{PROGRESS, Run};

fn fp(s: &str) -> Fingerprint {
    Fingerprint::of(&rekey::secret::secret(s.to_string()))
}

impl World {
    /// rekey (re)starts: it cannot know what its previous life sent, so the
    /// provider-side rate check starts afresh, as the provider's own window would
    /// after a pause.
    pub fn restart(&self, clock: Arc<VirtualClock>) {
        let now = clock.true_now();
        let mut w = self.lock();
        w.clock = Some(clock);
        for a in w.accounts.values_mut() {
            a.reset_bucket(now);
        }
    }
}

impl Run {
    /// Checks every invariant against rekey's database and the world; at `last`, also
    /// progress. Also plays the operator: repairs drift, resumes long-held rotations.
    pub(super) async fn check(
        &mut self,
        db: &Arc<StateDb>,
        clock: &VirtualClock,
        tx: &mpsc::Sender<Control>,
        last: bool,
    ) {
        let now = clock.true_now();
        let records = db.load_all().expect("state readable");
        self.check_retires(db);
        self.check_secrets(&records, last);
        if last {
            self.check_progress(&records, now);
        } else {
            self.operate(&records, db, clock, tx).await;
        }
    }

    /// Every retire write the store saw, against the reason rekey recorded for it.
    fn check_retires(&mut self, db: &StateDb) {
        loop {
            let page = db
                .history_after(self.seen_seq, rekey::state::HISTORY_PAGE)
                .expect("history readable");
            let more = page.len() == rekey::state::HISTORY_PAGE;
            for row in page {
                self.seen_seq = row.seq;
                if row.to == "held" && row.from != "held" {
                    self.report
                        .holds
                        .push((row.at, row.subscription.clone(), row.detail.clone()));
                }
                if row.to == "retiring"
                    && let Some(id) = &row.rotation_id
                {
                    self.retire_reasons
                        .insert(id.clone(), (row.event.clone(), row.detail.clone()));
                }
            }
            if !more {
                break;
            }
        }
        let retires = std::mem::take(&mut self.world.lock().retires);
        for (path, rotation, evidence) in retires {
            if evidence {
                continue;
            }
            match self.retire_reasons.get(&rotation) {
                Some((event, detail))
                    if event == "operator-retire" || detail.contains("on_timeout = retire") => {}
                Some((event, detail)) => self.world.violation(format!(
                    "retired `{path}` (rotation {rotation}) on `{event}: {detail}`, but no delivery \
                     signed with the new secret had succeeded"
                )),
                None => self.world.violation(format!(
                    "retired `{path}` (rotation {rotation}) with no retiring transition in the history"
                )),
            }
        }
    }

    /// No secret lost: each live secret is published, or held by rekey for a
    /// rotation in flight.
    fn check_secrets(&self, records: &[Record], last: bool) {
        let w = self.world.lock();
        let mut problems = Vec::new();
        for acct in w.accounts.values() {
            for sub in acct.subs.values() {
                if sub.drifted_since.is_some() {
                    continue;
                }
                let live = sub.live_now();
                let published = w
                    .store
                    .paths
                    .get(&sub.receiver_path)
                    .and_then(|v| v.last())
                    .and_then(|v| v.current.as_deref())
                    == Some(live);
                if published {
                    continue;
                }
                let mine: Vec<&Record> = records
                    .iter()
                    .filter(|r| r.name.rsplit_once('/').is_some_and(|(_, id)| id == sub.id))
                    .collect();
                let held = mine.iter().any(|r| match r.state.phase {
                    Phase::Rotating => !last,
                    Phase::Minted => r.state.new_fingerprint.as_ref() == Some(&fp(live)),
                    _ => false,
                });
                if !held {
                    problems.push(format!(
                        "secret lost: {}/{} is live with {} but the store's current at `{}` is {:?} and \
                         rekey holds it nowhere (records: {:?})",
                        acct.name,
                        sub.id,
                        fp(live),
                        sub.receiver_path,
                        w.store
                            .paths
                            .get(&sub.receiver_path)
                            .and_then(|v| v.last())
                            .and_then(|v| v.current.as_deref())
                            .map(fp),
                        mine.iter()
                            .map(|r| format!("{} {}", r.name, r.state.phase))
                            .collect::<Vec<_>>()
                    ));
                }
            }
        }
        drop(w);
        for p in problems {
            self.world.violation(p);
        }
    }

    /// Progress: after the quiet period nothing is left in flight for long.
    fn check_progress(&self, records: &[Record], now: DateTime<Utc>) {
        let bound = chrono::Duration::from_std(PROGRESS).unwrap_or_default();
        for r in records {
            if r.state.phase.in_flight() && now - r.phase_since > bound {
                self.world.violation(format!(
                    "stranded: {} has been {} since {} ({})",
                    r.name,
                    r.state.phase,
                    r.phase_since.to_rfc3339(),
                    r.state.last_error.as_deref().unwrap_or("no error recorded")
                ));
            }
            if r.state.phase == Phase::Idle
                && r.state.rotation_id.is_some()
                && now - r.phase_since > bound
            {
                self.world.violation(format!(
                    "stranded: {} is idle with rotation {:?} started",
                    r.name, r.state.rotation_id
                ));
            }
        }
    }

    /// The operator: repairs a drift a few hours after rekey reports it, and resumes
    /// a held rotation after half a day (receivers may have caught up by then).
    async fn operate(
        &mut self,
        records: &[Record],
        db: &StateDb,
        clock: &VirtualClock,
        tx: &mpsc::Sender<Control>,
    ) {
        let now = clock.true_now();
        let mut wake = false;
        for r in records {
            match r.state.phase {
                Phase::Drifted => {
                    let since = *self.drift_noticed.entry(r.name.clone()).or_insert(now);
                    if now - since >= chrono::Duration::hours(3) {
                        let id = r.name.rsplit_once('/').map(|(_, id)| id).unwrap_or("");
                        let account = self
                            .sc
                            .subs
                            .iter()
                            .find(|s| s.id == id)
                            .map(|s| s.account.clone());
                        if let Some(a) = account {
                            self.world.reconcile_drift(&a, id);
                            self.drift_noticed.remove(&r.name);
                            self.log(now, format!("operator repaired the drift of {}", r.name));
                        }
                    }
                }
                Phase::Held => {
                    let since = *self.held_noticed.entry(r.name.clone()).or_insert(now);
                    if now - since >= chrono::Duration::hours(12) {
                        db.add_decision(&r.name, false, clock.now())
                            .expect("decision recorded");
                        self.held_noticed.remove(&r.name);
                        wake = true;
                        self.log(now, format!("operator resumed {}", r.name));
                    }
                }
                _ => {}
            }
        }
        if wake {
            let _ = tx.send(Control::Wake).await;
        }
    }
}
