//! The event loop: draw on a steady tick, read keys and mouse without
//! blocking, fold in worker updates. Nothing here waits on the model.
//! With `SCALPEL_FRAME_LOG=<file>` it logs when each key arrives and each
//! frame is drawn, so tests can measure redraw latency.

use std::io::Write;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use anyhow::Result;
use ratatui::crossterm::event::{self, Event};
use ratatui::layout::Rect;
use ratatui::DefaultTerminal;

use super::app::{App, Request, Update};
use super::autosave::Autosave;
use super::handler;
use super::ui;
use super::worker::Worker;

/// The last panic of a compute thread (a worker lane, rayon, a scoped
/// thread), as the panic hook saw it: with its location.
static COMPUTE_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// The thread that draws; a panic anywhere else is a compute thread's.
static UI_THREAD: std::sync::OnceLock<std::thread::ThreadId> = std::sync::OnceLock::new();

/// Takes the last compute-thread panic the hook recorded (the worker adds
/// it to its crash report).
pub fn take_compute_panic() -> Option<String> {
    COMPUTE_PANIC
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
}

/// Redraw period when nothing happens.
pub const TICK: Duration = Duration::from_millis(33);

/// Frame and key timestamps (ms since start) for latency tests.
struct FrameLog {
    out: Option<std::io::BufWriter<std::fs::File>>,
    start: Instant,
}

impl FrameLog {
    fn from_env() -> Self {
        let out = std::env::var_os("SCALPEL_FRAME_LOG")
            .and_then(|p| std::fs::File::create(p).ok())
            .map(std::io::BufWriter::new);
        Self {
            out,
            start: Instant::now(),
        }
    }

    fn log(&mut self, what: &str, app: &App) {
        if let Some(out) = &mut self.out {
            let ms = self.start.elapsed().as_secs_f64() * 1000.0;
            let busy = app
                .job
                .as_ref()
                .map_or("idle".to_string(), |j| j.kind.label());
            let _ = writeln!(out, "{ms:.1} {what} {}", busy.replace(' ', "_"));
            let _ = out.flush();
        }
    }
}

pub fn run_loop(
    terminal: &mut DefaultTerminal,
    app: &mut App,
    worker: &Worker,
    updates: &Receiver<Update>,
    autosave: &Autosave,
) -> Result<()> {
    let mut log = FrameLog::from_env();
    let dispatch = |reqs: Vec<Request>| reqs.into_iter().for_each(|r| worker.send(r));
    dispatch(app.start());
    loop {
        app.now = Instant::now();
        let screen: Rect = terminal.draw(|f| ui::draw(f, app))?.area;
        log.log("frame", app);
        if app.quit {
            return Ok(());
        }
        if event::poll(TICK)? {
            // Take every input already waiting before the next frame.
            loop {
                match event::read()? {
                    Event::Key(key) => {
                        log.log("key", app);
                        dispatch(handler::handle_key(app, key));
                    }
                    Event::Mouse(m) => dispatch(handler::handle_mouse(app, m, screen)),
                    _ => {}
                }
                if app.quit || !event::poll(Duration::ZERO)? {
                    break;
                }
            }
        }
        while let Ok(u) = updates.try_recv() {
            dispatch(app.apply(u));
        }
        if let Err(e) = autosave.save_if_dirty(app) {
            app.set_status(format!("autosave failed: {e:#}"), true);
        }
        // A lane reports its own crash (`Update::Crashed`); this catches a
        // panic in any other thread, which nothing else would show.
        if let Some(p) = take_compute_panic() {
            app.set_status(
                format!("a background thread crashed ({p}); please report it"),
                true,
            );
        }
        if let Some(e) = autosave.take_error() {
            app.set_status(format!("autosave failed: {e}"), true);
        }
    }
}

pub fn enable_mouse() {
    let _ = ratatui::crossterm::execute!(
        std::io::stdout(),
        ratatui::crossterm::event::EnableMouseCapture
    );
    // ratatui's panic hook restores the screen; mouse reporting must go too.
    // A compute thread's panic (worker lane, rayon, scoped thread: any
    // thread but this one) leaves the screen alone and becomes a message.
    let _ = UI_THREAD.set(std::thread::current().id());
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let ui = UI_THREAD.get() == Some(&std::thread::current().id());
        if !ui {
            *COMPUTE_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(info.to_string());
            return;
        }
        disable_mouse();
        previous(info);
    }));
}

pub fn disable_mouse() {
    let _ = ratatui::crossterm::execute!(
        std::io::stdout(),
        ratatui::crossterm::event::DisableMouseCapture
    );
}

/// Model compute runs at a lower CPU priority than the UI thread, so a
/// busy machine still redraws on time. Builds rayon's pool (candle's
/// matmul threads) with the lower priority too, unless `--threads` built it.
pub fn lower_compute_priority() {
    let _ = rayon::ThreadPoolBuilder::new()
        .start_handler(|_| nice_this_thread())
        // A panic in a job nobody waits on would abort the process; the
        // hook has recorded it, and the screen shows it.
        .panic_handler(|_| {})
        .build_global();
}

/// Lowers the calling thread's priority (Linux threads have their own nice value).
pub fn nice_this_thread() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on the calling thread id has no memory effects.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 5);
    }
}
