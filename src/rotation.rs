//! The rotation state machine: a pure function from (state, event) to
//! (new state, next action), with no network, clock or disk inside.
//!
//! ```text
//!  idle ──start──▶ [preflight] ──ok──▶ rotating ──secret──▶ minted ──vault ack──▶ published
//!   ▲                  │ fails              │ response lost        │ vault fails      │
//!   │                  ▼                    ▼ (rotate again)       ▼ (keep, retry)    ▼
//!   │               failed              rotating               minted          confirming
//!   │                                                                       evidence │ deadline, or
//!   └──────────── retired ◀── retiring ◀─────────────────────────────────────────┘      ▼ receivers failing
//!                                                                                     held
//! ```
//!
//! Every event belongs to one phase of the cycle, and one function holds all of that
//! phase's transitions; an event in any other phase is an [`InvalidEvent`]:
//!
//! ```text
//!  preflight  idle, failed, drifted   start → [preflight]   (drifted: only when asked, not scheduled)
//!                                     preflight passed → rotating;  preflight failed → failed
//!                                     drift found → drifted;  drifted: drift resolved → idle
//!  rotate     rotating                sent → rotating;  secret → minted;  refused → failed
//!                                     response lost → rotating (backoff, rotate again)
//!  publish    minted                  vault ack → published;  vault fails → minted (backoff)
//!  confirm    published, confirming   evidence → retiring;  nothing yet → confirming (poll)
//!                                     receivers failing (fail_after, fail_after_failures) → held
//!                                     deadline → held, or retiring with on_timeout = retire
//!                                     check fails → confirming (backoff, up to the deadline),
//!                                       held past it whatever on_timeout says
//!  retire     retiring                vault ack → idle;  vault fails → retiring (backoff)
//!  operator   held                    resume → confirming;  retire → retiring
//!  recover    any                     (re)start or wait over → same phase, its action again
//!                                     (rotating with the call in flight: response lost, rotate)
//!  orphaned   idle, failed (started)  → same phase, rotation given up
//!             rotating, published, confirming → held
//! ```
//!
//! The driver ([`crate::engine`]) persists the state this module returns *before* it
//! performs the returned [`Action`]. That ordering is what makes every crash point
//! recoverable: on restart the persisted phase says which action was (maybe) under way,
//! and every action is idempotent, so [`Event::Recover`] simply performs it again. The
//! one action that cannot be repeated blindly is the provider's rotate call, because its
//! response is the only copy of the new secret; a crash while it was in flight means the
//! secret may be lost, so the subscription is rotated again and the loss is counted.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::evidence::{Evidence, FailureTally, Finding};
use crate::secret::{Fingerprint, SecretString};

/// Where a subscription is in its rotation cycle. The names are part of the CLI's
/// JSON output (`rekey status --json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Nothing in flight; the next rotation is due at `next_due_at`.
    Idle,
    /// Intent recorded; the provider's rotate call is (or may have been) under way.
    Rotating,
    /// The provider returned a new secret and it is stored locally (fsync'd), not yet
    /// in the secret store.
    Minted,
    /// The secret store holds `current` = new and `previous` = old.
    Published,
    /// Waiting for evidence that a delivery signed with the new secret succeeded.
    Confirming,
    /// Evidence seen (or policy said so): the old secret is being removed.
    Retiring,
    /// No evidence by the deadline; both secrets stay published until an operator acts.
    Held,
    /// The last attempt failed before anything changed at the provider; retried later.
    Failed,
    /// The provider's live secret is not the one in the store: someone rotated outside
    /// rekey. Nothing is rotated or overwritten until an operator reconciles the store
    /// (rekey then returns to idle by itself) or forces a rotation.
    Drifted,
}

impl Phase {
    pub const ALL: [Phase; 9] = [
        Phase::Idle,
        Phase::Rotating,
        Phase::Minted,
        Phase::Published,
        Phase::Confirming,
        Phase::Retiring,
        Phase::Held,
        Phase::Failed,
        Phase::Drifted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Rotating => "rotating",
            Phase::Minted => "minted",
            Phase::Published => "published",
            Phase::Confirming => "confirming",
            Phase::Retiring => "retiring",
            Phase::Held => "held",
            Phase::Failed => "failed",
            Phase::Drifted => "drifted",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// A rotation is under way: the provider may already hold a new secret.
    pub fn in_flight(self) -> bool {
        matches!(
            self,
            Phase::Rotating
                | Phase::Minted
                | Phase::Published
                | Phase::Confirming
                | Phase::Retiring
        )
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the policy says about confirmation and retries; the machine's only parameters.
#[derive(Debug, Clone)]
pub struct Timing {
    pub confirm_timeout: Duration,
    pub confirm_poll: Duration,
    pub on_timeout: OnTimeout,
    /// First wait after a failed step; doubles per consecutive failure up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Hold once deliveries signed with the new secret have kept failing this long
    /// (failures seen at least this far apart) with none succeeding: receivers are
    /// rejecting the new secret, and an operator must hear of it in minutes, not at
    /// the deadline.
    pub fail_after: Duration,
    /// Or hold after this many such failures, when set.
    pub fail_after_failures: Option<u32>,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            confirm_timeout: Duration::from_secs(24 * 3600),
            confirm_poll: Duration::from_secs(300),
            on_timeout: OnTimeout::Hold,
            retry_base: Duration::from_secs(30),
            retry_max: Duration::from_secs(3600),
            fail_after: Duration::from_secs(600),
            fail_after_failures: None,
        }
    }
}

/// What happens when the confirmation deadline passes without evidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTimeout {
    /// Keep both secrets published and alert (the default: never retire on a timer).
    Hold,
    /// Retire the old secret anyway (an explicit policy decision, recorded as such).
    Retire,
}

/// The persisted state of one subscription.
#[derive(Clone)]
pub struct RotationState {
    pub phase: Phase,
    /// Identifies the rotation in flight (also written to the secret store entry).
    pub rotation_id: Option<String>,
    /// When the intent was recorded (just before the rotate call).
    pub intent_at: Option<DateTime<Utc>>,
    /// When the provider's rotate response arrived.
    pub rotated_at: Option<DateTime<Utc>>,
    /// When the secret store acknowledged the dual publication.
    pub published_at: Option<DateTime<Utc>>,
    /// Confirmation deadline (published_at + confirm_timeout).
    pub confirm_deadline: Option<DateTime<Utc>>,
    /// The new secret, held only between mint and publication.
    pub pending_secret: Option<SecretString>,
    pub new_fingerprint: Option<Fingerprint>,
    pub previous_fingerprint: Option<Fingerprint>,
    /// The rotate call was issued and its outcome is not known yet. Persisted before the
    /// call, so a crash leaves it set.
    pub rotate_in_flight: bool,
    /// Rotate responses lost during the current rotation (each meant one more rotation).
    pub lost_responses: u32,
    /// Consecutive failures of the current step; drives the retry backoff.
    pub failures: u32,
    /// Do nothing before this time (backoff after a failure, or the next confirm poll).
    pub not_before: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// When the last rotation completed (retired), for schedules and status.
    pub last_rotated_at: Option<DateTime<Utc>>,
    /// Evidence that let the old secret go, or why it went without.
    pub last_outcome: Option<String>,
    /// Deliveries signed with the new secret that failed during this confirmation.
    pub delivery_failures: FailureTally,
}

impl fmt::Debug for RotationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotationState")
            .field("phase", &self.phase)
            .field("rotation_id", &self.rotation_id)
            .field(
                "pending_secret",
                &self.pending_secret.as_ref().map(Fingerprint::of),
            )
            .field("new_fingerprint", &self.new_fingerprint)
            .field("previous_fingerprint", &self.previous_fingerprint)
            .field("rotate_in_flight", &self.rotate_in_flight)
            .field("lost_responses", &self.lost_responses)
            .field("failures", &self.failures)
            .field("not_before", &self.not_before)
            .field("last_error", &self.last_error)
            .field("delivery_failures", &self.delivery_failures.count())
            .finish_non_exhaustive()
    }
}

impl RotationState {
    pub fn new() -> Self {
        RotationState {
            phase: Phase::Idle,
            rotation_id: None,
            intent_at: None,
            rotated_at: None,
            published_at: None,
            confirm_deadline: None,
            pending_secret: None,
            new_fingerprint: None,
            previous_fingerprint: None,
            rotate_in_flight: false,
            lost_responses: 0,
            failures: 0,
            not_before: None,
            last_error: None,
            last_rotated_at: None,
            last_outcome: None,
            delivery_failures: FailureTally::default(),
        }
    }
}

impl Default for RotationState {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a rotation starts; recorded in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Schedule,
    Forced,
    Requested,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Forced => "forced",
            Trigger::Requested => "requested",
        }
    }
}

/// Everything that can happen to a subscription. Results of actions carry `now`, the
/// time the driver observed them; the machine never reads a clock.
#[derive(Debug)]
pub enum Event {
    /// A rotation is due or was asked for.
    Start {
        rotation_id: String,
        trigger: Trigger,
        now: DateTime<Utc>,
    },
    PreflightPassed {
        now: DateTime<Utc>,
    },
    PreflightFailed {
        error: String,
        now: DateTime<Utc>,
    },
    /// The rotate call is about to be sent (the intent, persisted first).
    RotateSent {
        now: DateTime<Utc>,
    },
    RotateSucceeded {
        secret: SecretString,
        now: DateTime<Utc>,
    },
    /// The provider answered and certainly did not rotate (4xx, including 429).
    RotateRejected {
        error: String,
        now: DateTime<Utc>,
    },
    /// The outcome is unknown (timeout, connection cut, 5xx, unreadable body): the
    /// provider may have rotated and the secret may be lost.
    RotateOutcomeUnknown {
        error: String,
        now: DateTime<Utc>,
    },
    Published {
        previous: Option<Fingerprint>,
        now: DateTime<Utc>,
    },
    PublishFailed {
        error: String,
        now: DateTime<Utc>,
    },
    /// A confirmation check ran and found `finding`. `store_path` is where receivers
    /// read the new secret (named when they are found rejecting it).
    Checked {
        finding: Finding,
        store_path: String,
        now: DateTime<Utc>,
    },
    CheckFailed {
        error: String,
        now: DateTime<Utc>,
    },
    Retired {
        now: DateTime<Utc>,
    },
    RetireFailed {
        error: String,
        now: DateTime<Utc>,
    },
    /// The process (re)started (`restarted`), or a wait ended: perform whatever the
    /// phase needs. `eager` (one-shot runs, whose cadence is the operator's timer) acts
    /// now even if a retry or poll was scheduled for later.
    Recover {
        now: DateTime<Utc>,
        restarted: bool,
        eager: bool,
    },
    /// Operator on a held subscription: keep waiting for evidence for another timeout.
    OperatorResume {
        now: DateTime<Utc>,
    },
    /// Operator on a held subscription: retire the old secret without evidence.
    OperatorRetire {
        now: DateTime<Utc>,
    },
    /// Preflight found the provider's live secret differs from the store's `current`.
    /// `detail` says what differs (fingerprints only) and how to recover.
    DriftDetected {
        detail: String,
        now: DateTime<Utc>,
    },
    /// A drifted subscription's store and provider agree again.
    DriftResolved {
        now: DateTime<Utc>,
    },
    /// The subscription left the config (removed, its provider renamed or removed)
    /// while this rotation was under way, and the next step needs what is gone.
    /// `detail` says what was left where and what the operator can do.
    Orphaned {
        detail: String,
        now: DateTime<Utc>,
    },
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::Start { .. } => "start",
            Event::PreflightPassed { .. } => "preflight-passed",
            Event::PreflightFailed { .. } => "preflight-failed",
            Event::RotateSent { .. } => "rotate-sent",
            Event::RotateSucceeded { .. } => "rotate-succeeded",
            Event::RotateRejected { .. } => "rotate-rejected",
            Event::RotateOutcomeUnknown { .. } => "rotate-outcome-unknown",
            Event::Published { .. } => "published",
            Event::PublishFailed { .. } => "publish-failed",
            Event::Checked { .. } => "checked",
            Event::CheckFailed { .. } => "check-failed",
            Event::Retired { .. } => "retired",
            Event::RetireFailed { .. } => "retire-failed",
            Event::Recover { .. } => "recover",
            Event::OperatorResume { .. } => "operator-resume",
            Event::OperatorRetire { .. } => "operator-retire",
            Event::DriftDetected { .. } => "drift-detected",
            Event::DriftResolved { .. } => "drift-resolved",
            Event::Orphaned { .. } => "orphaned",
        }
    }

    fn now(&self) -> DateTime<Utc> {
        match self {
            Event::Start { now, .. }
            | Event::PreflightPassed { now }
            | Event::PreflightFailed { now, .. }
            | Event::RotateSent { now }
            | Event::RotateSucceeded { now, .. }
            | Event::RotateRejected { now, .. }
            | Event::RotateOutcomeUnknown { now, .. }
            | Event::Published { now, .. }
            | Event::PublishFailed { now, .. }
            | Event::Checked { now, .. }
            | Event::CheckFailed { now, .. }
            | Event::Retired { now }
            | Event::RetireFailed { now, .. }
            | Event::Recover { now, .. }
            | Event::OperatorResume { now }
            | Event::OperatorRetire { now }
            | Event::DriftDetected { now, .. }
            | Event::DriftResolved { now }
            | Event::Orphaned { now, .. } => *now,
        }
    }
}

/// What the driver must do next, after persisting the returned state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Check the secret store and the provider before touching anything.
    Preflight,
    /// Record the intent ([`Event::RotateSent`]) and then call the provider's rotate.
    Rotate,
    /// Write `current` = pending secret, `previous` = the store's current one.
    Publish,
    /// Look for evidence of a delivery signed with the new secret since `since`.
    Check { since: DateTime<Utc> },
    /// Write `current` only.
    Retire,
    /// Nothing to do before this time; then feed [`Event::Recover`].
    WaitUntil(DateTime<Utc>),
    /// Nothing to do until an operator acts (held).
    AwaitOperator,
    /// The rotation cycle is over (idle or failed): the scheduler decides what is next.
    Rest,
}

/// One line of the append-only history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: Phase,
    pub to: Phase,
    pub event: &'static str,
    /// Human detail; never contains a secret (fingerprints only).
    pub detail: String,
    /// What a confirmation rested on (only on the transition that confirms).
    pub evidence: Option<Evidence>,
    /// Routine (another poll without evidence, waking from a wait): persisted, but not
    /// worth a history row each time.
    pub quiet: bool,
}

impl Transition {
    /// A history row that changes no phase (discovery, redelivery, a skipped start).
    pub fn note(phase: Phase, event: &'static str, detail: String) -> Transition {
        Transition {
            from: phase,
            to: phase,
            event,
            detail,
            quiet: false,
            evidence: None,
        }
    }
}

#[derive(Debug)]
pub struct Step {
    pub state: RotationState,
    pub action: Action,
    pub transition: Transition,
}

/// An event that makes no sense in the current phase (e.g. a publish result while
/// idle). The driver treats it as a bug report, not as a state change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event `{event}` is not valid in phase `{phase}`")]
pub struct InvalidEvent {
    pub phase: Phase,
    pub event: &'static str,
}

/// The backoff after `failures` consecutive failures: base·2^(n-1), capped.
pub fn backoff(timing: &Timing, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    timing
        .retry_base
        .saturating_mul(1u32 << exp)
        .min(timing.retry_max)
}

fn add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// The action a phase needs when nothing else is known: what [`Event::Recover`]
/// performs, honouring `not_before`.
fn resume_action(s: &RotationState, now: DateTime<Utc>, eager: bool) -> Action {
    if let Some(t) = s.not_before
        && now < t
        && !eager
        && s.phase != Phase::Idle
        && s.phase != Phase::Failed
    {
        return Action::WaitUntil(t);
    }
    match s.phase {
        // Started (a rotation id is set) but preflight never finished: start over.
        Phase::Idle if s.rotation_id.is_some() => Action::Preflight,
        Phase::Idle | Phase::Failed => Action::Rest,
        Phase::Rotating => Action::Rotate,
        Phase::Minted => Action::Publish,
        Phase::Published | Phase::Confirming => Action::Check {
            since: s.published_at.unwrap_or(now),
        },
        Phase::Retiring => Action::Retire,
        Phase::Held | Phase::Drifted => Action::AwaitOperator,
    }
}

/// Applies `event` to `state`. Pure: same inputs, same outputs.
///
/// Each event belongs to one phase of the cycle, and that phase's function holds
/// all of its transitions (the map is the table in the module doc). An event its
/// phase function does not expect in the current phase is invalid.
pub fn apply(state: &RotationState, event: Event, timing: &Timing) -> Result<Step, InvalidEvent> {
    let from = state.phase;
    let name = event.name();
    let at = At {
        from,
        now: event.now(),
        timing,
    };
    let mut s = state.clone();
    let outcome = match event {
        e @ (Event::Start { .. }
        | Event::DriftDetected { .. }
        | Event::DriftResolved { .. }
        | Event::PreflightPassed { .. }
        | Event::PreflightFailed { .. }) => preflight(&mut s, e, &at),
        e @ (Event::RotateSent { .. }
        | Event::RotateSucceeded { .. }
        | Event::RotateRejected { .. }
        | Event::RotateOutcomeUnknown { .. }) => rotate(&mut s, e, &at),
        e @ (Event::Published { .. } | Event::PublishFailed { .. }) => publish(&mut s, e, &at),
        e @ (Event::Checked { .. } | Event::CheckFailed { .. }) => confirm(&mut s, e, &at),
        e @ (Event::Retired { .. } | Event::RetireFailed { .. }) => retire(&mut s, e, &at),
        e @ (Event::OperatorResume { .. } | Event::OperatorRetire { .. }) => {
            operator(&mut s, e, &at)
        }
        Event::Recover {
            restarted, eager, ..
        } => Some(recover(&mut s, restarted, eager, &at)),
        Event::Orphaned { detail, .. } => orphaned(&mut s, detail, &at),
    };
    let Some(outcome) = outcome else {
        return Err(InvalidEvent {
            phase: from,
            event: name,
        });
    };
    let transition = Transition {
        from,
        to: s.phase,
        event: name,
        detail: outcome.detail,
        quiet: outcome.quiet,
        evidence: outcome.evidence,
    };
    Ok(Step {
        state: s,
        action: outcome.action,
        transition,
    })
}

/// What every phase function knows besides the state and the event.
struct At<'a> {
    /// The phase the event arrived in.
    from: Phase,
    /// When the driver observed the event.
    now: DateTime<Utc>,
    timing: &'a Timing,
}

impl At<'_> {
    /// A step failed: count it, wait the backoff, and say so.
    fn fail_step(&self, s: &mut RotationState, error: String) -> (Action, String) {
        s.failures += 1;
        let wait = backoff(self.timing, s.failures);
        let until = add(self.now, wait);
        s.not_before = Some(until);
        let detail = format!(
            "{error}; attempt {} failed, retrying after {}",
            s.failures,
            humantime::format_duration(wait)
        );
        s.last_error = Some(error);
        (Action::WaitUntil(until), detail)
    }
}

/// What a transition does besides changing the state: the next action and the
/// history row's detail, quietness and evidence.
struct Outcome {
    action: Action,
    detail: String,
    quiet: bool,
    evidence: Option<Evidence>,
}

impl From<(Action, String)> for Outcome {
    fn from((action, detail): (Action, String)) -> Outcome {
        Outcome {
            action,
            detail,
            quiet: false,
            evidence: None,
        }
    }
}

/// Idle, failed or drifted: a start, and what preflight finds (passed, failed, or
/// drift; a drifted subscription's drift resolving).
fn preflight(s: &mut RotationState, event: Event, at: &At) -> Option<Outcome> {
    let outcome = match (at.from, event) {
        // A drifted subscription rotates only when an operator asks: rotating makes
        // the provider's secret known again, which is one way to recover.
        (
            Phase::Drifted,
            Event::Start {
                trigger: Trigger::Schedule,
                ..
            },
        ) => return None,
        (
            Phase::Idle | Phase::Failed | Phase::Drifted,
            Event::Start {
                rotation_id,
                trigger,
                ..
            },
        ) => {
            // Preflight comes before the intent: nothing is persisted as in flight until
            // the store and the provider are known to work.
            let detail = format!("rotation {rotation_id} starts ({})", trigger.as_str());
            s.rotation_id = Some(rotation_id);
            (Action::Preflight, detail)
        }
        (Phase::Idle | Phase::Failed | Phase::Drifted, Event::DriftDetected { detail, .. }) => {
            // Found in preflight, before the intent: nothing was touched anywhere.
            s.phase = Phase::Drifted;
            s.rotation_id = None;
            s.not_before = None;
            s.failures = 0;
            s.last_error = Some(detail.clone());
            (Action::AwaitOperator, detail)
        }
        (Phase::Drifted, Event::DriftResolved { .. }) => {
            s.phase = Phase::Idle;
            s.last_error = None;
            (
                Action::Rest,
                "the store's current secret matches the provider's again".into(),
            )
        }
        (Phase::Idle | Phase::Failed | Phase::Drifted, Event::PreflightPassed { .. }) => {
            // No start before it: not a preflight this machine asked for.
            s.rotation_id.as_ref()?;
            s.phase = Phase::Rotating;
            s.intent_at = Some(at.now);
            s.rotated_at = None;
            s.published_at = None;
            s.confirm_deadline = None;
            s.new_fingerprint = None;
            s.previous_fingerprint = None;
            s.lost_responses = 0;
            s.failures = 0;
            s.not_before = None;
            s.last_error = None;
            s.delivery_failures = FailureTally::default();
            (Action::Rotate, "preflight passed; intent recorded".into())
        }
        (Phase::Idle | Phase::Failed | Phase::Drifted, Event::PreflightFailed { error, .. }) => {
            // Nothing was touched at the provider: the old secret is still the live one.
            s.phase = Phase::Failed;
            s.rotation_id = None;
            let (_, detail) = at.fail_step(s, format!("preflight failed: {error}"));
            (Action::Rest, detail)
        }
        _ => return None,
    };
    Some(outcome.into())
}

/// Rotating: the intent is sent, then the provider's answer (a secret, a refusal, or
/// no answer anyone can trust).
fn rotate(s: &mut RotationState, event: Event, at: &At) -> Option<Outcome> {
    let outcome = match (at.from, event) {
        (Phase::Rotating, Event::RotateSent { .. }) => {
            s.rotate_in_flight = true;
            (Action::Rotate, "rotate call sent".into())
        }
        (Phase::Rotating, Event::RotateSucceeded { secret, .. }) => {
            let fp = Fingerprint::of(&secret);
            s.phase = Phase::Minted;
            s.rotate_in_flight = false;
            s.rotated_at = Some(at.now);
            s.new_fingerprint = Some(fp.clone());
            s.pending_secret = Some(secret);
            s.failures = 0;
            s.not_before = None;
            s.last_error = None;
            (
                Action::Publish,
                format!("provider returned new secret {fp}; stored locally"),
            )
        }
        (Phase::Rotating, Event::RotateRejected { error, .. }) => {
            // The provider said no: it did not rotate, so the published secret still
            // verifies. Give the rotation up and retry at the backoff.
            s.phase = Phase::Failed;
            s.rotate_in_flight = false;
            s.rotation_id = None;
            s.intent_at = None;
            let (_, detail) = at.fail_step(
                s,
                format!("provider refused rotation (old secret unchanged): {error}"),
            );
            (Action::Rest, detail)
        }
        (Phase::Rotating, Event::RotateOutcomeUnknown { error, .. }) => {
            // The provider may hold a secret nobody has: only another rotation recovers.
            s.rotate_in_flight = false;
            s.lost_responses += 1;
            at.fail_step(
                s,
                format!(
                    "rotate response lost ({error}); the provider's secret is unknown and will be rotated again"
                ),
            )
        }
        _ => return None,
    };
    Some(outcome.into())
}

/// Minted: the secret store's answer to the dual publication.
fn publish(s: &mut RotationState, event: Event, at: &At) -> Option<Outcome> {
    let outcome = match (at.from, event) {
        (Phase::Minted, Event::Published { previous, .. }) => {
            let now = at.now;
            s.phase = Phase::Published;
            s.pending_secret = None;
            s.published_at = Some(now);
            s.confirm_deadline = Some(add(now, at.timing.confirm_timeout));
            s.failures = 0;
            s.not_before = None;
            s.last_error = None;
            let window = s
                .rotated_at
                .map(|r| format!("; exposure window {} ms", (now - r).num_milliseconds()))
                .unwrap_or_default();
            let detail = match &previous {
                Some(p) => format!("published current={} previous={p}{window}", fp_str(s)),
                None => format!(
                    "published current={} (no previous secret){window}",
                    fp_str(s)
                ),
            };
            s.previous_fingerprint = previous;
            (Action::Check { since: now }, detail)
        }
        (Phase::Minted, Event::PublishFailed { error, .. }) => {
            // The secret stays in local state; publication is retried.
            at.fail_step(s, format!("publish failed (secret kept locally): {error}"))
        }
        _ => return None,
    };
    Some(outcome.into())
}

/// Published or confirming: a check's finding ([`checked`]: evidence retires, failing
/// receivers or the deadline hold), or a check that could not run.
fn confirm(s: &mut RotationState, event: Event, at: &At) -> Option<Outcome> {
    match (at.from, event) {
        (
            Phase::Published | Phase::Confirming,
            Event::Checked {
                finding,
                store_path,
                ..
            },
        ) => {
            let c = checked(s, finding, &store_path, at.now, at.timing);
            Some(Outcome {
                action: c.action,
                detail: c.detail,
                quiet: at.from == Phase::Confirming && c.routine,
                evidence: c.evidence,
            })
        }
        (Phase::Published | Phase::Confirming, Event::CheckFailed { error, .. }) => {
            Some(check_failed(s, error, at).into())
        }
        _ => None,
    }
}

/// A confirmation check that could not run: retry at the backoff, but never past the
/// deadline; past it, hold.
fn check_failed(s: &mut RotationState, error: String, at: &At) -> (Action, String) {
    s.phase = Phase::Confirming;
    let deadline = s.confirm_deadline.unwrap_or(at.now);
    // A check that fails is not evidence either way, and not "no evidence"
    // either: `on_timeout = "retire"` trusts a provider that answered. Past the
    // deadline a failing check holds, whatever the policy.
    if at.now >= deadline {
        s.phase = Phase::Held;
        s.not_before = None;
        // Nothing retries from held: the count goes into the reason instead.
        let failed = s.failures + 1;
        s.failures = 0;
        let msg = format!(
            "the confirmation check itself kept failing up to the deadline ({failed} \
             failure(s) in a row; last error: {error}); failing checks are no evidence \
             either way, so both secrets stay published whatever on_timeout says"
        );
        s.last_error = Some(msg.clone());
        return (Action::AwaitOperator, msg);
    }
    let (action, detail) = at.fail_step(s, format!("confirmation check failed: {error}"));
    let action = match action {
        Action::WaitUntil(t) => {
            let t = t.min(deadline);
            s.not_before = Some(t);
            Action::WaitUntil(t)
        }
        other => other,
    };
    (action, detail)
}

/// Retiring: the secret store's answer to removing the old secret.
fn retire(s: &mut RotationState, event: Event, at: &At) -> Option<Outcome> {
    let outcome = match (at.from, event) {
        (Phase::Retiring, Event::Retired { .. }) => {
            s.phase = Phase::Idle;
            s.last_rotated_at = s.rotated_at.or(Some(at.now));
            s.previous_fingerprint = None;
            s.rotation_id = None;
            s.rotate_in_flight = false;
            s.failures = 0;
            s.not_before = None;
            s.last_error = None;
            (
                Action::Rest,
                format!("retired the old secret; current={}", fp_str(s)),
            )
        }
        (Phase::Retiring, Event::RetireFailed { error, .. }) => at.fail_step(
            s,
            format!("retire failed (both secrets stay published): {error}"),
        ),
        _ => return None,
    };
    Some(outcome.into())
}

/// Held: an operator confirms again (the failures seen so far acknowledged) or
/// retires the old secret without evidence.
fn operator(s: &mut RotationState, event: Event, at: &At) -> Option<Outcome> {
    let outcome = match (at.from, event) {
        (Phase::Held, Event::OperatorResume { .. }) => {
            s.phase = Phase::Confirming;
            s.delivery_failures.acknowledge();
            s.confirm_deadline = Some(add(at.now, at.timing.confirm_timeout));
            s.not_before = None;
            s.last_error = None;
            (
                Action::Check {
                    since: s.published_at.unwrap_or(at.now),
                },
                "operator resumed confirmation".into(),
            )
        }
        (Phase::Held, Event::OperatorRetire { .. }) => {
            s.phase = Phase::Retiring;
            s.not_before = None;
            s.last_error = None;
            s.last_outcome = Some("retired without evidence by an operator".into());
            (Action::Retire, "operator retired the old secret".into())
        }
        _ => return None,
    };
    Some(outcome.into())
}

/// Any phase, after a restart or a wait: perform what the phase needs again. Only a
/// rotate call that was in flight cannot simply be repeated.
fn recover(s: &mut RotationState, restarted: bool, eager: bool, at: &At) -> Outcome {
    let phase = at.from;
    let mut action = resume_action(s, at.now, eager);
    let mut detail = format!("resuming in {phase} after a restart");
    let mut quiet = !restarted;
    if phase == Phase::Rotating && s.rotate_in_flight {
        // Crashed while the rotate call was out: its response, if any, is gone.
        s.rotate_in_flight = false;
        s.lost_responses += 1;
        detail = "interrupted while the rotate call was in flight; its response \
                  was lost, rotating again"
            .into();
        quiet = false;
        action = Action::Rotate;
    } else if phase == Phase::Idle && action == Action::Preflight {
        detail = "resuming the rotation that started before the restart".into();
    } else if phase == Phase::Minted && restarted {
        detail = "resuming after a restart: publishing the locally stored secret".into();
    }
    Outcome {
        action,
        detail,
        quiet,
        evidence: None,
    }
}

/// The subscription left the config mid-rotation (see [`Event::Orphaned`]).
fn orphaned(s: &mut RotationState, detail: String, at: &At) -> Option<Outcome> {
    let outcome = match at.from {
        // Started, but nothing was touched at the provider yet: give the rotation up.
        Phase::Idle | Phase::Failed if s.rotation_id.is_some() => {
            s.rotation_id = None;
            s.not_before = None;
            s.last_error = Some(detail.clone());
            (Action::Rest, detail)
        }
        // The provider may hold a secret that only a held rotation accounts for:
        // both secrets stay where they are and an operator decides.
        Phase::Rotating | Phase::Published | Phase::Confirming => {
            s.phase = Phase::Held;
            s.rotate_in_flight = false;
            s.not_before = None;
            s.last_error = Some(detail.clone());
            (Action::AwaitOperator, detail)
        }
        _ => return None,
    };
    Some(outcome.into())
}

/// What a check's finding leads to.
struct Checked {
    action: Action,
    detail: String,
    evidence: Option<Evidence>,
    /// Another poll without news: persisted, no history row.
    routine: bool,
}

impl Checked {
    fn to(action: Action, detail: String) -> Checked {
        Checked {
            action,
            detail,
            evidence: None,
            routine: false,
        }
    }
}

/// A check's finding: retire on evidence; hold when deliveries signed with the new
/// secret keep failing (by count or for `fail_after`) or the deadline passes;
/// otherwise poll again.
fn checked(
    s: &mut RotationState,
    finding: Finding,
    store_path: &str,
    now: DateTime<Utc>,
    timing: &Timing,
) -> Checked {
    let deadline = s.confirm_deadline.unwrap_or(now);
    s.failures = 0;
    s.last_error = None;
    let failing = match finding {
        Finding::Confirmed(ev) => {
            s.phase = Phase::Retiring;
            s.not_before = None;
            s.last_outcome = Some(format!("confirmed: {ev}"));
            return Checked {
                action: Action::Retire,
                detail: format!("evidence: {ev}"),
                evidence: Some(ev),
                routine: false,
            };
        }
        Finding::Failing(f) => Some(f),
        Finding::Nothing => None,
    };
    let news = failing
        .as_ref()
        .is_some_and(|f| s.delivery_failures.add(f, now));
    if let Some(reason) = failing_too_long(&s.delivery_failures, store_path, timing) {
        s.phase = Phase::Held;
        s.not_before = None;
        s.last_error = Some(reason.clone());
        return Checked::to(Action::AwaitOperator, reason);
    }
    if now >= deadline {
        return deadline_passed(s, store_path, timing);
    }
    s.phase = Phase::Confirming;
    let next = add(now, timing.confirm_poll).min(deadline);
    s.not_before = Some(next);
    let mut c = Checked::to(Action::WaitUntil(next), "no evidence yet".into());
    c.routine = !news;
    if let (Some(f), true) = (&failing, news) {
        c.detail = format!(
            "a delivery signed with the new secret failed ({}; {} so far): receivers may \
             not have the new secret yet",
            f.detail,
            s.delivery_failures.count()
        );
    }
    c
}

/// Why to hold now because deliveries signed with the new secret keep failing, if so.
fn failing_too_long(tally: &FailureTally, store_path: &str, timing: &Timing) -> Option<String> {
    let first = tally.first_seen?;
    let count = tally.count();
    let by_count = timing
        .fail_after_failures
        .is_some_and(|n| count >= n.max(1));
    // Failures that kept coming for `fail_after`, not one failure and then silence:
    // a receiver that reloads its secret late fails a delivery or two and then
    // accepts the next, and that must not page anyone.
    let by_time = tally.span()
        >= chrono::TimeDelta::from_std(timing.fail_after).unwrap_or(chrono::TimeDelta::MAX);
    (by_count || by_time).then(|| {
        format!(
            "receivers are rejecting the new secret: {count} delivery(ies) signed with it \
             failed since {} and none succeeded (last: {}). Receivers must read `current` \
             from `{store_path}` and accept `previous` until the rotation ends; both secrets \
             stay published. Then `rekey resume` to confirm again, or `rekey retire`",
            first.to_rfc3339(),
            tally.last.as_deref().unwrap_or("-"),
        )
    })
}

/// No evidence by the deadline: hold (the default) or retire as the policy says.
fn deadline_passed(s: &mut RotationState, store_path: &str, timing: &Timing) -> Checked {
    s.not_before = None;
    match timing.on_timeout {
        OnTimeout::Hold => {
            s.phase = Phase::Held;
            let msg = format!(
                "no delivery signed with the new secret succeeded before the confirmation \
                 deadline; both secrets stay published at `{store_path}`"
            );
            s.last_error = Some(msg.clone());
            Checked::to(Action::AwaitOperator, msg)
        }
        OnTimeout::Retire => {
            s.phase = Phase::Retiring;
            s.last_outcome = Some("retired without evidence (policy on_timeout = retire)".into());
            Checked::to(
                Action::Retire,
                "no evidence by the deadline; policy on_timeout = retire".into(),
            )
        }
    }
}

fn fp_str(s: &RotationState) -> String {
    s.new_fingerprint
        .as_ref()
        .map(|f| f.to_string())
        .unwrap_or_else(|| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::{ExposeSecret, secret};

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(1_800_000_000 + secs)
    }

    fn timing() -> Timing {
        Timing {
            confirm_timeout: Duration::from_secs(100),
            confirm_poll: Duration::from_secs(10),
            on_timeout: OnTimeout::Hold,
            retry_base: Duration::from_secs(5),
            retry_max: Duration::from_secs(60),
            fail_after: Duration::from_secs(30),
            fail_after_failures: None,
        }
    }

    fn nothing(now: DateTime<Utc>) -> Event {
        Event::Checked {
            finding: Finding::Nothing,
            store_path: "secret/webhooks/acme".into(),
            now,
        }
    }

    fn confirmed(detail: &str, now: DateTime<Utc>) -> Event {
        Event::Checked {
            finding: Finding::Confirmed(Evidence::untimed("test", detail.into())),
            store_path: "secret/webhooks/acme".into(),
            now,
        }
    }

    fn failing(seen: crate::evidence::FailureCount, now: DateTime<Utc>) -> Event {
        Event::Checked {
            finding: Finding::Failing(crate::evidence::Failures {
                seen: vec![seen],
                detail: "status 401".into(),
            }),
            store_path: "secret/webhooks/acme".into(),
            now,
        }
    }

    fn step(s: &RotationState, e: Event) -> Step {
        apply(s, e, &timing()).expect("valid transition")
    }

    fn start(s: &RotationState, now: i64) -> Step {
        step(
            s,
            Event::Start {
                rotation_id: "r1".into(),
                trigger: Trigger::Forced,
                now: t(now),
            },
        )
    }

    /// Drives a fresh subscription to the given phase along the happy path.
    fn at(phase: Phase) -> RotationState {
        let mut s = RotationState::new();
        if phase == Phase::Idle {
            return s;
        }
        s = start(&s, 0).state;
        s = step(&s, Event::PreflightPassed { now: t(1) }).state;
        s = step(&s, Event::RotateSent { now: t(1) }).state;
        if phase == Phase::Rotating {
            return s;
        }
        s = step(
            &s,
            Event::RotateSucceeded {
                secret: secret("whsec_new"),
                now: t(2),
            },
        )
        .state;
        if phase == Phase::Minted {
            return s;
        }
        s = step(
            &s,
            Event::Published {
                previous: Some(Fingerprint::of_str("whsec_old")),
                now: t(3),
            },
        )
        .state;
        if phase == Phase::Published {
            return s;
        }
        s = step(&s, nothing(t(4))).state;
        if phase == Phase::Confirming {
            return s;
        }
        if phase == Phase::Held {
            return step(&s, nothing(t(200))).state;
        }
        s = step(&s, confirmed("lastSuccessAt", t(20))).state;
        assert_eq!(s.phase, Phase::Retiring);
        s
    }

    #[test]
    fn happy_path_runs_every_step_in_order() {
        let s0 = RotationState::new();
        let a = start(&s0, 0);
        assert_eq!(
            (a.state.phase, &a.action),
            (Phase::Idle, &Action::Preflight)
        );
        let b = step(&a.state, Event::PreflightPassed { now: t(1) });
        assert_eq!(
            (b.state.phase, &b.action),
            (Phase::Rotating, &Action::Rotate)
        );
        assert_eq!(b.state.intent_at, Some(t(1)));
        let b2 = step(&b.state, Event::RotateSent { now: t(1) });
        assert!(b2.state.rotate_in_flight);
        let c = step(
            &b2.state,
            Event::RotateSucceeded {
                secret: secret("whsec_new"),
                now: t(2),
            },
        );
        assert_eq!(
            (c.state.phase, &c.action),
            (Phase::Minted, &Action::Publish)
        );
        assert_eq!(
            c.state.pending_secret.as_ref().unwrap().expose_secret(),
            "whsec_new"
        );
        assert!(!c.state.rotate_in_flight);
        let d = step(
            &c.state,
            Event::Published {
                previous: Some(Fingerprint::of_str("whsec_old")),
                now: t(3),
            },
        );
        assert_eq!(d.state.phase, Phase::Published);
        assert_eq!(d.action, Action::Check { since: t(3) });
        assert!(
            d.state.pending_secret.is_none(),
            "plaintext wiped after publish"
        );
        assert_eq!(d.state.confirm_deadline, Some(t(103)));
        let e = step(&d.state, nothing(t(4)));
        assert_eq!(e.state.phase, Phase::Confirming);
        assert_eq!(e.action, Action::WaitUntil(t(14)));
        let f = step(
            &e.state,
            confirmed("lastSuccessAt 2026-11-23T00:00:10Z", t(14)),
        );
        assert_eq!(
            (f.state.phase, &f.action),
            (Phase::Retiring, &Action::Retire)
        );
        let g = step(&f.state, Event::Retired { now: t(15) });
        assert_eq!((g.state.phase, &g.action), (Phase::Idle, &Action::Rest));
        assert_eq!(g.state.last_rotated_at, Some(t(2)));
        assert!(g.state.rotation_id.is_none());
        assert!(
            g.state
                .last_outcome
                .as_deref()
                .unwrap()
                .starts_with("confirmed")
        );
    }

    #[test]
    fn failed_preflight_touches_nothing_and_backs_off() {
        let s = start(&RotationState::new(), 0).state;
        let f = step(
            &s,
            Event::PreflightFailed {
                error: "vault is sealed".into(),
                now: t(1),
            },
        );
        assert_eq!(f.state.phase, Phase::Failed);
        assert_eq!(f.action, Action::Rest);
        assert!(f.state.intent_at.is_none() && f.state.rotation_id.is_none());
        assert_eq!(f.state.not_before, Some(t(6)));
        assert!(f.state.last_error.as_deref().unwrap().contains("sealed"));
        // A failed subscription can start again.
        let again = start(&f.state, 10);
        assert_eq!(again.action, Action::Preflight);
    }

    #[test]
    fn rejected_rotation_fails_without_loss() {
        let s = at(Phase::Rotating);
        let f = step(
            &s,
            Event::RotateRejected {
                error: "403 This action is unauthorized.".into(),
                now: t(2),
            },
        );
        assert_eq!(f.state.phase, Phase::Failed);
        assert_eq!(f.state.lost_responses, 0);
        assert!(!f.state.rotate_in_flight);
        assert_eq!(f.action, Action::Rest);
    }

    #[test]
    fn unknown_rotate_outcome_counts_a_loss_and_rotates_again_after_backoff() {
        let s = at(Phase::Rotating);
        let f = step(
            &s,
            Event::RotateOutcomeUnknown {
                error: "connection reset".into(),
                now: t(2),
            },
        );
        assert_eq!(f.state.phase, Phase::Rotating);
        assert_eq!(f.state.lost_responses, 1);
        assert_eq!(f.action, Action::WaitUntil(t(7)));
        // Waking before the backoff waits again; after it, rotates (no second loss).
        let early = step(
            &f.state,
            Event::Recover {
                now: t(3),
                restarted: true,
                eager: false,
            },
        );
        assert_eq!(early.action, Action::WaitUntil(t(7)));
        let later = step(
            &f.state,
            Event::Recover {
                now: t(8),
                restarted: true,
                eager: false,
            },
        );
        assert_eq!(later.action, Action::Rotate);
        assert_eq!(later.state.lost_responses, 1);
    }

    #[test]
    fn an_eager_resume_acts_at_once_despite_a_scheduled_wait() {
        let s = at(Phase::Confirming);
        let r = step(
            &s,
            Event::Recover {
                now: t(5),
                restarted: true,
                eager: true,
            },
        );
        assert_eq!(r.action, Action::Check { since: t(3) });
    }

    #[test]
    fn second_unknown_outcome_doubles_the_backoff_up_to_the_cap() {
        let mut s = at(Phase::Rotating);
        let mut waits = vec![];
        for i in 0..6 {
            let f = step(
                &s,
                Event::RotateOutcomeUnknown {
                    error: "timeout".into(),
                    now: t(100 * i),
                },
            );
            if let Action::WaitUntil(u) = f.action {
                waits.push((u - t(100 * i)).num_seconds());
            }
            s = f.state;
        }
        assert_eq!(waits, vec![5, 10, 20, 40, 60, 60]);
        assert_eq!(s.lost_responses, 6);
    }

    #[test]
    fn failed_publish_keeps_the_secret_and_retries() {
        let s = at(Phase::Minted);
        let f = step(
            &s,
            Event::PublishFailed {
                error: "vault sealed".into(),
                now: t(3),
            },
        );
        assert_eq!(f.state.phase, Phase::Minted);
        assert!(
            f.state.pending_secret.is_some(),
            "secret must not be dropped"
        );
        assert_eq!(f.action, Action::WaitUntil(t(8)));
        let r = step(
            &f.state,
            Event::Recover {
                now: t(9),
                restarted: true,
                eager: false,
            },
        );
        assert_eq!(r.action, Action::Publish);
        assert!(r.state.pending_secret.is_some());
    }

    #[test]
    fn publication_without_previous_is_recorded() {
        let s = at(Phase::Minted);
        let p = step(
            &s,
            Event::Published {
                previous: None,
                now: t(3),
            },
        );
        assert!(p.transition.detail.contains("no previous secret"));
        assert!(p.state.previous_fingerprint.is_none());
    }

    #[test]
    fn no_evidence_by_deadline_holds_by_default() {
        let s = at(Phase::Confirming);
        let h = step(&s, nothing(t(103)));
        assert_eq!(
            (h.state.phase, &h.action),
            (Phase::Held, &Action::AwaitOperator)
        );
        assert!(h.state.last_error.is_some());
        // A restart leaves it held: never retired on a timer.
        let r = step(
            &h.state,
            Event::Recover {
                now: t(10_000),
                restarted: true,
                eager: false,
            },
        );
        assert_eq!(
            (r.state.phase, &r.action),
            (Phase::Held, &Action::AwaitOperator)
        );
    }

    #[test]
    fn failures_after_publication_hold_after_fail_after_naming_the_store_path() {
        use crate::evidence::FailureCount::Newest;
        let s = at(Phase::Confirming);
        // The first failure is news: a history row, not a quiet poll.
        let a = step(&s, failing(Newest("t8".into()), t(10)));
        assert_eq!(a.state.phase, Phase::Confirming);
        assert!(!a.transition.quiet, "{:?}", a.transition);
        assert!(
            a.transition.detail.contains("failed"),
            "{}",
            a.transition.detail
        );
        // The same failure seen again is no news.
        let b = step(&a.state, failing(Newest("t8".into()), t(20)));
        assert!(b.transition.quiet);
        assert_eq!(b.state.delivery_failures.count(), 1);
        // fail_after (30 s) after the first failure was seen, with no success: held,
        // long before the deadline (t(103)).
        let h = step(&b.state, failing(Newest("t35".into()), t(40)));
        assert_eq!(
            (h.state.phase, &h.action),
            (Phase::Held, &Action::AwaitOperator)
        );
        let why = h.state.last_error.as_deref().unwrap_or_default();
        assert!(why.contains("rejecting the new secret"), "{why}");
        assert!(why.contains("secret/webhooks/acme"), "{why}");
        assert!(why.contains("2 delivery"), "{why}");
    }

    #[test]
    fn one_failure_then_silence_waits_for_the_next_delivery_not_fail_after() {
        use crate::evidence::FailureCount::Newest;
        // A receiver that reloads late rejects one delivery; nothing since.
        let s = at(Phase::Confirming);
        let a = step(&s, failing(Newest("t8".into()), t(10)));
        let b = step(&a.state, failing(Newest("t8".into()), t(60)));
        assert_eq!(b.state.phase, Phase::Confirming, "{:?}", b.transition);
        // Its next delivery succeeds: confirmed, no hold on the way.
        let c = step(&b.state, confirmed("lastSuccessAt", t(70)));
        assert_eq!(c.state.phase, Phase::Retiring);
    }

    #[test]
    fn failures_hold_by_count_when_set_and_a_success_still_confirms_first() {
        use crate::evidence::FailureCount::Listed;
        let tm = Timing {
            fail_after_failures: Some(3),
            ..timing()
        };
        let s = at(Phase::Confirming);
        let a = apply(&s, failing(Listed(2), t(10)), &tm).unwrap();
        assert_eq!(a.state.phase, Phase::Confirming);
        let ok = apply(&a.state, confirmed("delivery log", t(11)), &tm).unwrap();
        assert_eq!(ok.state.phase, Phase::Retiring);
        assert!(ok.transition.evidence.is_some());
        let h = apply(&a.state, failing(Listed(3), t(11)), &tm).unwrap();
        assert_eq!(h.state.phase, Phase::Held);
    }

    #[test]
    fn a_resumed_hold_counts_only_new_failures_and_a_new_rotation_starts_clean() {
        use crate::evidence::FailureCount::{Listed, Probe};
        let s = at(Phase::Confirming);
        let a = step(&s, failing(Listed(4), t(10)));
        let h = step(&a.state, failing(Listed(5), t(41)));
        assert_eq!(h.state.phase, Phase::Held);
        let r = step(&h.state, Event::OperatorResume { now: t(50) });
        assert_eq!(r.state.delivery_failures.count(), 0);
        // The four already seen do not hold it again; a new failure starts the clock.
        let b = step(&r.state, failing(Listed(4), t(90)));
        assert_eq!(b.state.phase, Phase::Confirming);
        let c = step(&b.state, failing(Probe, t(95)));
        assert_eq!(c.state.delivery_failures.first_seen, Some(t(95)));
        let d = step(&c.state, failing(Probe, t(126)));
        assert_eq!(d.state.phase, Phase::Held);
        // The next rotation starts with no failures.
        let mut idle = d.state.clone();
        idle.phase = Phase::Idle;
        idle.rotation_id = None;
        let next = step(
            &start(&idle, 200).state,
            Event::PreflightPassed { now: t(201) },
        );
        assert_eq!(next.state.delivery_failures, FailureTally::default());
    }

    #[test]
    fn on_timeout_retire_retires_and_says_so() {
        let s = at(Phase::Confirming);
        let tm = Timing {
            on_timeout: OnTimeout::Retire,
            ..timing()
        };
        let r = apply(&s, nothing(t(103)), &tm).unwrap();
        assert_eq!(r.state.phase, Phase::Retiring);
        assert!(r.state.last_outcome.unwrap().contains("without evidence"));
    }

    #[test]
    fn confirm_polls_never_overshoot_the_deadline() {
        let s = at(Phase::Confirming);
        let c = step(&s, nothing(t(98)));
        assert_eq!(c.action, Action::WaitUntil(t(103)));
    }

    #[test]
    fn check_errors_back_off_and_end_in_hold_not_retire() {
        let s = at(Phase::Confirming);
        let c = step(
            &s,
            Event::CheckFailed {
                error: "503".into(),
                now: t(10),
            },
        );
        assert_eq!(c.state.phase, Phase::Confirming);
        assert_eq!(c.action, Action::WaitUntil(t(15)));
        let tm = Timing {
            on_timeout: OnTimeout::Hold,
            ..timing()
        };
        let late = apply(
            &c.state,
            Event::CheckFailed {
                error: "503".into(),
                now: t(200),
            },
            &tm,
        )
        .unwrap();
        assert_eq!(late.state.phase, Phase::Held);
        assert_eq!(late.transition.from, Phase::Confirming);
    }

    /// A check that keeps failing is not "no evidence": `on_timeout = "retire"` is a
    /// decision about a provider that answered, so past the deadline it still holds.
    #[test]
    fn a_failing_check_past_the_deadline_holds_even_under_on_timeout_retire() {
        let tm = Timing {
            on_timeout: OnTimeout::Retire,
            ..timing()
        };
        let s = at(Phase::Confirming);
        let early = apply(
            &s,
            Event::CheckFailed {
                error: "503 from the delivery log".into(),
                now: t(10),
            },
            &tm,
        )
        .unwrap();
        assert_eq!(early.state.phase, Phase::Confirming);
        for from in [early.state, at(Phase::Published)] {
            let late = apply(
                &from,
                Event::CheckFailed {
                    error: "connection refused".into(),
                    now: t(200),
                },
                &tm,
            )
            .unwrap();
            assert_eq!(
                (late.state.phase, &late.action),
                (Phase::Held, &Action::AwaitOperator)
            );
            assert_eq!(late.transition.from, from.phase);
            assert_eq!(late.transition.to, Phase::Held);
            assert!(late.state.last_outcome.is_none(), "not retired");
            assert_eq!(late.state.not_before, None);
            let why = late.state.last_error.as_deref().unwrap();
            assert!(why.contains("check itself kept failing"), "{why}");
            assert!(why.contains("connection refused"), "{why}");
            assert!(late.transition.detail.contains("connection refused"));
        }
    }

    #[test]
    fn retire_failure_keeps_both_published_and_retries() {
        let s = at(Phase::Retiring);
        let f = step(
            &s,
            Event::RetireFailed {
                error: "cas conflict".into(),
                now: t(30),
            },
        );
        assert_eq!(f.state.phase, Phase::Retiring);
        assert_eq!(f.action, Action::WaitUntil(t(35)));
        assert_eq!(
            step(
                &f.state,
                Event::Recover {
                    now: t(36),
                    restarted: true,
                    eager: false
                }
            )
            .action,
            Action::Retire
        );
    }

    #[test]
    fn operator_can_resume_or_retire_a_held_rotation() {
        let h = at(Phase::Held);
        let r = step(&h, Event::OperatorResume { now: t(500) });
        assert_eq!(r.state.phase, Phase::Confirming);
        assert_eq!(r.state.confirm_deadline, Some(t(600)));
        assert_eq!(r.action, Action::Check { since: t(3) });
        let x = step(&h, Event::OperatorRetire { now: t(500) });
        assert_eq!(
            (x.state.phase, &x.action),
            (Phase::Retiring, &Action::Retire)
        );
        assert!(x.state.last_outcome.unwrap().contains("operator"));
    }

    /// Every crash point: the state persisted at each boundary, fed `Recover` on
    /// restart, leads to the action that finishes the rotation without loss.
    #[test]
    fn recovery_from_every_persisted_phase() {
        let cases = [
            (Phase::Idle, Action::Rest),
            (Phase::Minted, Action::Publish),
            (Phase::Published, Action::Check { since: t(3) }),
            (Phase::Confirming, Action::WaitUntil(t(14))),
            (Phase::Retiring, Action::Retire),
            (Phase::Held, Action::AwaitOperator),
        ];
        for (phase, want) in cases {
            let s = at(phase);
            let r = step(
                &s,
                Event::Recover {
                    now: t(5),
                    restarted: true,
                    eager: false,
                },
            );
            assert_eq!(r.state.phase, phase, "{phase}");
            assert_eq!(r.action, want, "{phase}");
            assert_eq!(r.state.lost_responses, 0, "{phase}");
        }
        // Confirming after the poll time checks at once.
        let c = step(
            &at(Phase::Confirming),
            Event::Recover {
                now: t(50),
                restarted: true,
                eager: false,
            },
        );
        assert_eq!(c.action, Action::Check { since: t(3) });
        // Minted keeps the secret to publish.
        let m = step(
            &at(Phase::Minted),
            Event::Recover {
                now: t(5),
                restarted: true,
                eager: false,
            },
        );
        assert!(m.state.pending_secret.is_some());
    }

    #[test]
    fn crash_with_rotate_in_flight_counts_exactly_one_lost_response() {
        let s = at(Phase::Rotating);
        assert!(s.rotate_in_flight);
        let r = step(
            &s,
            Event::Recover {
                now: t(5),
                restarted: true,
                eager: false,
            },
        );
        assert_eq!(
            (r.state.phase, &r.action),
            (Phase::Rotating, &Action::Rotate)
        );
        assert_eq!(r.state.lost_responses, 1);
        assert!(r.transition.detail.contains("lost"));
        // Crash after the intent but before the call was sent: nothing was lost.
        let before_send = step(
            &start(&RotationState::new(), 0).state,
            Event::PreflightPassed { now: t(1) },
        )
        .state;
        let r2 = step(
            &before_send,
            Event::Recover {
                now: t(5),
                restarted: true,
                eager: false,
            },
        );
        assert_eq!(r2.action, Action::Rotate);
        assert_eq!(r2.state.lost_responses, 0);
    }

    #[test]
    fn a_rotation_interrupted_during_preflight_is_resumed_not_forgotten() {
        // A crash during preflight leaves the state idle with a rotation id: the
        // requested rotation starts over with a new preflight.
        let s = start(&RotationState::new(), 0).state;
        let r = step(
            &s,
            Event::Recover {
                now: t(1),
                restarted: true,
                eager: false,
            },
        );
        assert_eq!(r.action, Action::Preflight);
        assert!(r.transition.detail.contains("started before the restart"));
        assert!(!r.transition.quiet);
        let p = step(&r.state, Event::PreflightPassed { now: t(2) });
        assert_eq!(p.action, Action::Rotate);
    }

    #[test]
    fn events_out_of_phase_are_rejected() {
        let idle = RotationState::new();
        let bad = [
            Event::RotateSucceeded {
                secret: secret("x"),
                now: t(0),
            },
            Event::Published {
                previous: None,
                now: t(0),
            },
            Event::Retired { now: t(0) },
            confirmed("x", t(0)),
            Event::OperatorRetire { now: t(0) },
            Event::PreflightPassed { now: t(0) },
        ];
        for e in bad {
            let name = e.name();
            assert_eq!(
                apply(&idle, e, &timing()).unwrap_err(),
                InvalidEvent {
                    phase: Phase::Idle,
                    event: name
                }
            );
        }
        // Starting a second rotation while one is in flight is refused.
        for phase in [
            Phase::Rotating,
            Phase::Minted,
            Phase::Confirming,
            Phase::Held,
        ] {
            let s = at(phase);
            assert!(
                apply(
                    &s,
                    Event::Start {
                        rotation_id: "r2".into(),
                        trigger: Trigger::Forced,
                        now: t(9)
                    },
                    &timing()
                )
                .is_err(),
                "{phase}"
            );
        }
    }

    #[test]
    fn no_transition_detail_or_debug_contains_the_secret() {
        let s = at(Phase::Minted);
        assert!(!format!("{s:?}").contains("whsec_new"));
        let p = step(
            &s,
            Event::Published {
                previous: Some(Fingerprint::of_str("whsec_old")),
                now: t(3),
            },
        );
        assert!(!p.transition.detail.contains("whsec_"));
        assert!(
            p.transition
                .detail
                .contains(&Fingerprint::of_str("whsec_new").to_string())
        );
    }

    #[test]
    fn phase_names_round_trip() {
        for p in Phase::ALL {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
        }
        assert_eq!(Phase::parse("bogus"), None);
    }

    fn drifted() -> RotationState {
        let s = start(&RotationState::new(), 0).state;
        step(
            &s,
            Event::DriftDetected {
                detail: "rotated outside rekey".into(),
                now: t(1),
            },
        )
        .state
    }

    #[test]
    fn drift_found_in_preflight_stops_everything_and_awaits_an_operator() {
        let s = start(&RotationState::new(), 0).state;
        let d = step(
            &s,
            Event::DriftDetected {
                detail: "rotated outside rekey; to recover …".into(),
                now: t(1),
            },
        );
        assert_eq!(
            (d.state.phase, &d.action),
            (Phase::Drifted, &Action::AwaitOperator)
        );
        assert!(d.state.rotation_id.is_none() && d.state.intent_at.is_none());
        assert!(
            d.state
                .last_error
                .as_deref()
                .unwrap()
                .contains("to recover")
        );
        assert_eq!(d.transition.event, "drift-detected");
        assert!(!d.transition.quiet, "recorded in the history");
        // A restart leaves it drifted; the schedule cannot start a rotation.
        let r = step(
            &d.state,
            Event::Recover {
                now: t(99),
                restarted: true,
                eager: true,
            },
        );
        assert_eq!(
            (r.state.phase, &r.action),
            (Phase::Drifted, &Action::AwaitOperator)
        );
        assert!(!Phase::Drifted.in_flight());
        let scheduled = Event::Start {
            rotation_id: "r".into(),
            trigger: Trigger::Schedule,
            now: t(5),
        };
        assert!(apply(&d.state, scheduled, &timing()).is_err());
    }

    #[test]
    fn drift_ends_when_the_store_is_reconciled_or_an_operator_forces_a_rotation() {
        let ok = step(&drifted(), Event::DriftResolved { now: t(5) });
        assert_eq!((ok.state.phase, &ok.action), (Phase::Idle, &Action::Rest));
        assert!(ok.state.last_error.is_none());
        let forced = step(
            &drifted(),
            Event::Start {
                rotation_id: "r2".into(),
                trigger: Trigger::Forced,
                now: t(5),
            },
        );
        assert_eq!(forced.action, Action::Preflight);
        let p = step(&forced.state, Event::PreflightPassed { now: t(6) });
        assert_eq!(
            (p.state.phase, &p.action),
            (Phase::Rotating, &Action::Rotate)
        );
        // Resolution is only meaningful while drifted.
        assert!(
            apply(
                &RotationState::new(),
                Event::DriftResolved { now: t(5) },
                &timing()
            )
            .is_err()
        );
    }

    #[test]
    fn a_rotation_orphaned_mid_flight_is_held_and_one_not_yet_sent_is_given_up() {
        let tm = timing();
        let orphaned = || Event::Orphaned {
            detail: "left the config".into(),
            now: t(50),
        };
        for phase in [Phase::Rotating, Phase::Published, Phase::Confirming] {
            let s = RotationState {
                phase,
                rotation_id: Some("r1".into()),
                rotate_in_flight: phase == Phase::Rotating,
                ..RotationState::new()
            };
            let step = apply(&s, orphaned(), &tm).unwrap();
            assert_eq!(step.state.phase, Phase::Held, "{phase}");
            assert_eq!(step.action, Action::AwaitOperator);
            assert!(!step.state.rotate_in_flight);
            assert_eq!(step.state.last_error.as_deref(), Some("left the config"));
        }
        let started = RotationState {
            rotation_id: Some("r1".into()),
            ..RotationState::new()
        };
        let step = apply(&started, orphaned(), &tm).unwrap();
        assert_eq!((step.state.phase, step.action), (Phase::Idle, Action::Rest));
        assert_eq!(step.state.rotation_id, None);
        // A minted secret is published and a retire finished whatever happened to
        // the config: those steps need only the store, never this event.
        for phase in [Phase::Minted, Phase::Retiring, Phase::Held] {
            let s = RotationState {
                phase,
                rotation_id: Some("r1".into()),
                pending_secret: Some(secret("whsec_x")),
                ..RotationState::new()
            };
            assert!(apply(&s, orphaned(), &tm).is_err(), "{phase}");
        }
    }
}
