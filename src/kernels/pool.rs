//! A persistent worker pool with cheap hand-off for the many small matmuls of a decode step.
//!
//! A decode step runs ~200 matmuls of a few tens of microseconds each, so the hand-off must cost
//! far less than rayon's generic scope. Workers spin briefly on an epoch counter after each job
//! (the next matmul usually follows within microseconds), then park on a condvar so an idle pool
//! never competes with candle's rayon pool for the two cores.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(200);
/// Bit of `State::ctrl` that closes the current job to late joiners.
const CLOSED: u64 = 1 << 31;
/// Low bits of `State::ctrl`: workers inside the current job.
const ACTIVE_MASK: u64 = CLOSED - 1;

type Job = *const (dyn Fn(usize) + Sync);

struct State {
    /// (epoch << 32) | CLOSED? | active workers.
    ctrl: AtomicU64,
    job: Mutex<Option<(usize, JobPtr)>>,
    next_task: AtomicUsize,
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    wake: Condvar,
    wake_lock: Mutex<()>,
}

#[derive(Clone, Copy)]
struct JobPtr(Job);
// SAFETY: the pointee is `Sync` and outlives every use (the caller waits for all joined workers).
unsafe impl Send for JobPtr {}

/// The pool: `threads() - 1` workers plus the calling thread.
pub struct Pool {
    threads: usize,
    state: Arc<State>,
    /// Serialises callers: one job at a time.
    submit: Mutex<()>,
}

thread_local! {
    /// Set while this thread runs a task, so a nested `for_each` runs inline instead of deadlocking.
    static IN_TASK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The process-wide pool, sized to rayon's thread count at first use.
pub fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(rayon::current_num_threads()))
}

impl Pool {
    /// A pool of `threads` threads in all (the caller counts as one; 0 is taken as 1).
    pub fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        let state = Arc::new(State {
            ctrl: AtomicU64::new(CLOSED),
            job: Mutex::new(None),
            next_task: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            wake: Condvar::new(),
            wake_lock: Mutex::new(()),
        });
        for i in 1..threads {
            let state = Arc::clone(&state);
            std::thread::Builder::new()
                .name(format!("scalpel-kernel-{i}"))
                .spawn(move || worker(&state))
                .expect("cannot spawn a kernel worker thread");
        }
        Pool {
            threads,
            state,
            submit: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs f(0..tasks) over the workers (the caller's thread works too) and returns when all are done.
    pub fn for_each(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        if tasks == 1 || self.threads == 1 || IN_TASK.with(|t| t.get()) {
            (0..tasks).for_each(f);
            return;
        }
        let _one_job = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        let st = &*self.state;
        // SAFETY: only the lifetime is erased; we wait below until no worker can still use it.
        let ptr: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        *st.job.lock().unwrap_or_else(|e| e.into_inner()) = Some((tasks, JobPtr(ptr)));
        st.next_task.store(0, Ordering::SeqCst);
        let epoch = (st.ctrl.load(Ordering::SeqCst) >> 32) + 1;
        st.ctrl.store(epoch << 32, Ordering::SeqCst); // open, no one joined yet
        if st.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = st.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
            st.wake.notify_all();
        }
        IN_TASK.with(|t| t.set(true));
        run_tasks(st, tasks, f);
        IN_TASK.with(|t| t.set(false));
        // Close the job to late joiners, then wait for the joined ones to finish.
        st.ctrl.fetch_or(CLOSED, Ordering::SeqCst);
        let mut spins = 0u32;
        while st.ctrl.load(Ordering::SeqCst) & ACTIVE_MASK != 0 {
            spins = spins.saturating_add(1);
            if spins > 4096 {
                // A joined worker was descheduled (a busy machine): let it run.
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        *st.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Drop for Pool {
    /// Stops the workers (a test pool; the global one lives for the process).
    fn drop(&mut self) {
        let st = &*self.state;
        st.shutdown.store(true, Ordering::SeqCst);
        st.ctrl.fetch_add(1 << 32, Ordering::SeqCst);
        let _g = st.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
        st.wake.notify_all();
    }
}

fn run_tasks(st: &State, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    loop {
        let i = st.next_task.fetch_add(1, Ordering::Relaxed);
        if i >= tasks {
            break;
        }
        f(i);
    }
}

fn worker(st: &State) {
    IN_TASK.with(|t| t.set(true));
    let mut seen = st.ctrl.load(Ordering::SeqCst) >> 32;
    loop {
        // Spin for a new epoch, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let c = st.ctrl.load(Ordering::SeqCst);
            if c >> 32 != seen {
                break;
            }
            spins += 1;
            if spins.is_multiple_of(64) && start.elapsed() > SPIN {
                let g = st.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
                st.sleepers.fetch_add(1, Ordering::SeqCst);
                let g = st
                    .wake
                    .wait_while(g, |_| st.ctrl.load(Ordering::SeqCst) >> 32 == seen)
                    .unwrap_or_else(|e| e.into_inner());
                st.sleepers.fetch_sub(1, Ordering::SeqCst);
                drop(g);
                break;
            }
            std::hint::spin_loop();
        }
        if st.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let c = st.ctrl.load(Ordering::SeqCst);
        seen = c >> 32;
        // Join the job unless it is already closed (then the caller has finished it).
        let mut cur = c;
        let joined = loop {
            if cur >> 32 != seen || cur & CLOSED != 0 {
                break false;
            }
            match st
                .ctrl
                .compare_exchange_weak(cur, cur + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break true,
                Err(now) => cur = now,
            }
        };
        if !joined {
            continue;
        }
        let job = *st.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((tasks, JobPtr(ptr))) = job {
            // SAFETY: the caller keeps `f` alive until our `active` count is released below.
            let f: &(dyn Fn(usize) + Sync) = unsafe { &*ptr };
            run_tasks(st, tasks, f);
        }
        st.ctrl.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A slice that pool tasks write in disjoint ranges.
pub struct Shared<'a> {
    ptr: *mut f32,
    len: usize,
    _slice: PhantomData<&'a mut [f32]>,
}

// SAFETY: tasks only reach the data through `range`, whose callers write
// disjoint ranges (each task its own).
unsafe impl Sync for Shared<'_> {}

impl<'a> Shared<'a> {
    pub fn new(s: &'a mut [f32]) -> Self {
        Self {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _slice: PhantomData,
        }
    }

    /// # Safety
    /// No two live results may overlap.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range(&self, r: Range<usize>) -> &mut [f32] {
        assert!(
            r.start <= r.end && r.end <= self.len,
            "shared range out of bounds"
        );
        std::slice::from_raw_parts_mut(self.ptr.add(r.start), r.end - r.start)
    }
}
