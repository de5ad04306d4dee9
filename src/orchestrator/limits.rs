//! The orchestrator's limits (SPEC §5 "Bounded everything"): how many sessions run at
//! once, globally and per subject, and how large what a session is given may be.
//!
//! Admission is one check-and-increment under one lock, so concurrent creates can never
//! overshoot a cap. What it hands out is a [`RunSlot`]: the slot is given back when it is
//! dropped, whichever way the run ends (completed, failed, cancelled, expired, stopped at
//! shutdown, a create that fails after admission, even a panicking run task), so the count
//! cannot leak.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What a client over the run cap is told to wait, in seconds (`Retry-After`). Runs last
/// seconds to minutes: a few seconds lets a waiting client in soon after a slot frees,
/// without a crowd of retrying clients adding much load.
pub const RETRY_AFTER_SECS: u64 = 5;

/// The orchestrator's limits, from the `[limits]` flags (`Config::run_limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLimits {
    /// Sessions running on this node at once.
    pub max_running: usize,
    /// Sessions one subject may have running on this node at once.
    pub max_running_per_subject: usize,
    /// Bytes of one prompt's text.
    pub max_prompt_bytes: usize,
    /// Prompts in one session.
    pub max_prompts: usize,
    /// Bytes of a session's `metadata`, serialized as JSON.
    pub max_metadata_bytes: usize,
    /// Bytes of one clarification answer.
    pub max_answer_bytes: usize,
    /// Bytes one model may stream for one prompt, per attempt.
    pub max_model_output_bytes: usize,
    /// How long a run keeps trying to log its events while the log is unreachable.
    pub log_deadline: std::time::Duration,
}

impl Default for RunLimits {
    /// The flags' defaults.
    fn default() -> Self {
        crate::Config::defaults().run_limits()
    }
}

/// Which cap refused a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    Global(usize),
    PerSubject(usize),
}

/// The running-session counts. A std mutex: a check and an increment, never held across
/// an await.
#[derive(Debug, Default)]
struct Counts {
    total: usize,
    /// Subjects with at least one running session (an entry goes when its count is 0).
    per_subject: HashMap<Arc<str>, usize>,
}

/// Hands out [`RunSlot`]s within the caps.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    limits: RunLimits,
    counts: Arc<Mutex<Counts>>,
}

impl Admission {
    pub fn new(limits: RunLimits) -> Self {
        Self {
            limits,
            counts: Arc::default(),
        }
    }

    /// A slot for one more run by `subject` (`None`: auth is off, only the global cap
    /// applies), or the cap that is full.
    pub fn admit(&self, subject: Option<&str>) -> Result<RunSlot, Cap> {
        let mut counts = self.counts.lock().unwrap();
        if counts.total >= self.limits.max_running {
            return Err(Cap::Global(self.limits.max_running));
        }
        let subject: Option<Arc<str>> = match subject {
            None => None,
            Some(subject) => {
                let held = counts.per_subject.get(subject).copied().unwrap_or(0);
                if held >= self.limits.max_running_per_subject {
                    return Err(Cap::PerSubject(self.limits.max_running_per_subject));
                }
                let key: Arc<str> = Arc::from(subject);
                *counts.per_subject.entry(key.clone()).or_insert(0) += 1;
                Some(key)
            }
        };
        counts.total += 1;
        Ok(RunSlot {
            counts: self.counts.clone(),
            subject,
        })
    }

    /// Sessions running now (all subjects).
    /// A slot for a run resumed from another node (or from before a restart): counted like
    /// any other, but never refused, since the run was admitted when it was created and
    /// refusing it now would lose it. The caps may be exceeded until runs end.
    pub fn readmit(&self, subject: Option<&str>) -> RunSlot {
        let mut counts = self.counts.lock().unwrap();
        counts.total += 1;
        let subject: Option<Arc<str>> = subject.map(Arc::from);
        if let Some(key) = &subject {
            *counts.per_subject.entry(key.clone()).or_insert(0) += 1;
        }
        RunSlot {
            counts: self.counts.clone(),
            subject,
        }
    }

    #[cfg(test)]
    fn running(&self) -> usize {
        self.counts.lock().unwrap().total
    }
}

/// One admitted run; dropping it gives the slot back.
#[derive(Debug)]
pub(crate) struct RunSlot {
    counts: Arc<Mutex<Counts>>,
    subject: Option<Arc<str>>,
}

impl Drop for RunSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap();
        counts.total -= 1;
        if let Some(subject) = &self.subject
            && let Some(held) = counts.per_subject.get_mut(subject)
        {
            *held -= 1;
            if *held == 0 {
                counts.per_subject.remove(subject);
            }
        }
    }
}

pub(crate) use crate::event::json_len;

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(global: usize, per_subject: usize) -> RunLimits {
        RunLimits {
            max_running: global,
            max_running_per_subject: per_subject,
            ..RunLimits::default()
        }
    }

    #[test]
    fn slots_are_capped_globally_and_per_subject_and_given_back_on_drop() {
        let admission = Admission::new(limits(3, 2));
        let a1 = admission.admit(Some("alice")).unwrap();
        let a2 = admission.admit(Some("alice")).unwrap();
        assert_eq!(
            admission.admit(Some("alice")).unwrap_err(),
            Cap::PerSubject(2)
        );
        let anonymous = admission.admit(None).unwrap();
        assert_eq!(admission.admit(Some("bob")).unwrap_err(), Cap::Global(3));
        drop(a1);
        let b = admission.admit(Some("bob")).unwrap();
        assert_eq!(admission.running(), 3);
        drop((a2, anonymous, b));
        assert_eq!(admission.running(), 0);
        assert!(admission.counts.lock().unwrap().per_subject.is_empty());
    }

    #[test]
    fn concurrent_admissions_never_overshoot() {
        let admission = Admission::new(limits(5, 100));
        let slots = Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for _ in 0..16 {
                scope.spawn(|| {
                    for _ in 0..100 {
                        if let Ok(slot) = admission.admit(Some("s")) {
                            slots.lock().unwrap().push(slot);
                        }
                    }
                });
            }
        });
        assert_eq!(slots.lock().unwrap().len(), 5);
        assert_eq!(admission.running(), 5);
    }
}
