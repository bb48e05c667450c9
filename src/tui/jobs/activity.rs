//! Which background jobs are running, so a speed measurement can say
//! whether it shared the cores with one: a job entering marks itself in
//! every measurement open at that moment, and a measurement starts with
//! the jobs already running.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::tui::app::Overlap;

/// A background job that competes with a speed measurement for the cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    Importance,
    Search,
    Fit,
    Generation,
    /// A job of another mode: marked as `another job`.
    Other,
}

impl Busy {
    fn mark(self, o: &mut Overlap) {
        match self {
            Busy::Importance => o.importance = true,
            Busy::Search => o.search = true,
            Busy::Fit => o.fit = true,
            Busy::Generation => o.generation = true,
            Busy::Other => o.other = true,
        }
    }
}

#[derive(Default)]
struct State {
    running: Vec<(u64, Busy)>,
    watches: HashMap<u64, Overlap>,
    next_id: u64,
}

impl State {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// Shared by every lane of the worker.
#[derive(Clone, Default)]
pub struct Activity {
    state: Arc<Mutex<State>>,
}

/// Holds a job as running until dropped (also when the job panics).
pub struct Running {
    activity: Activity,
    id: u64,
}

/// Collects the jobs that ran at any moment between `watch` and `finish`.
pub struct Watch {
    activity: Activity,
    id: u64,
}

impl Activity {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn enter(&self, job: Busy) -> Running {
        let mut st = self.lock();
        let id = st.id();
        st.running.push((id, job));
        for o in st.watches.values_mut() {
            job.mark(o);
        }
        Running {
            activity: self.clone(),
            id,
        }
    }

    pub fn watch(&self) -> Watch {
        let mut st = self.lock();
        let id = st.id();
        let mut o = Overlap::default();
        for (_, job) in &st.running {
            job.mark(&mut o);
        }
        st.watches.insert(id, o);
        Watch {
            activity: self.clone(),
            id,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.activity
            .lock()
            .running
            .retain(|(id, _)| *id != self.id);
    }
}

impl Watch {
    pub fn finish(self) -> Overlap {
        self.activity
            .lock()
            .watches
            .get(&self.id)
            .copied()
            .unwrap_or_default()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.activity.lock().watches.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_sees_jobs_running_at_its_start_and_jobs_started_during_it() {
        let a = Activity::default();
        assert!(a.watch().finish().is_clean(), "nothing ran");

        let importance = a.enter(Busy::Importance);
        let w = a.watch();
        drop(importance);
        let o = w.finish();
        assert!(o.importance && !o.generation, "{o:?}");

        let w = a.watch();
        // Started and finished inside the measurement: still counts.
        drop(a.enter(Busy::Generation));
        let o = w.finish();
        assert_eq!(o.names(), vec!["generation"]);

        // A job of another mode is marked too, by a name of its own.
        let w = a.watch();
        drop(a.enter(Busy::Other));
        assert_eq!(
            w.finish().warning().unwrap(),
            "⚠ another job running: not comparable"
        );

        // Finished before the measurement began: does not count.
        drop(a.enter(Busy::Search));
        assert!(a.watch().finish().is_clean());
        assert!(a.lock().watches.is_empty() && a.lock().running.is_empty());
    }
}
