//! End-to-end tests of the workbench: the real binary on the real test
//! model, driven through tmux as a person would drive it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The two tests each load the model and compute; running them together
/// would only slow both down on a small machine.
static SERIAL: Mutex<()> = Mutex::new(());

const BIN: &str = env!("CARGO_BIN_EXE_scalpel");

/// One tmux server (own socket) running `scalpel` in an 80×24 pane.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(name: &str, env: &[(&str, &Path)], args: &str) -> Self {
        let have_tmux = Command::new("tmux").arg("-V").output().is_ok();
        assert!(have_tmux, "these tests need tmux (apt-get install tmux)");
        let socket = format!("scalpel-test-{name}-{}", std::process::id());
        let env: String = env
            .iter()
            .map(|(k, v)| format!("{k}='{}' ", v.display()))
            .collect();
        let cmd = format!("env {env}'{BIN}' {args}; echo EXITED $?; sleep 600");
        let ok = Command::new("tmux")
            .args(["-L", &socket, "new-session", "-d", "-x", "80", "-y", "24"])
            .arg(cmd)
            .status()
            .unwrap()
            .success();
        assert!(ok, "tmux new-session failed");
        Self { socket }
    }

    fn capture(&self) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "capture-pane", "-p"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sends tmux key names (`l`, `Space`, `Enter`, `Escape`, `C-u`).
    fn keys(&self, keys: &[&str]) {
        let ok = Command::new("tmux")
            .args(["-L", &self.socket, "send-keys"])
            .args(keys)
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// Types text literally.
    fn text(&self, text: &str) {
        let ok = Command::new("tmux")
            .args(["-L", &self.socket, "send-keys", "-l", text])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let screen = self.capture();
            if pred(&screen) {
                return screen;
            }
            if start.elapsed() > timeout {
                panic!("timed out after {timeout:?} waiting for {what}; the screen:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}

/// (base, plan) perplexity from the metrics panel, when both are numbers.
fn ppl(screen: &str) -> Option<(f64, f64)> {
    let line = screen.lines().find(|l| l.contains("│PPL "))?;
    let cells: Vec<&str> = line.split('│').nth(1)?.split_whitespace().collect();
    Some((cells.get(1)?.parse().ok()?, cells.get(2)?.parse().ok()?))
}

fn model_arg() -> String {
    format!("--model '{}' --offline", common::smollm2_path().display())
}

const MINUTES: Duration = Duration::from_secs(60);

/// `scalpel eval --plan saved` on the first 1,500 characters of the
/// built-in text, with `args`; its stdout (it must succeed).
fn eval_saved(dir: &Path, saved: &Path, args: &[&str]) -> String {
    let text = dir.join("short.txt");
    std::fs::write(&text, &scalpel::commands::eval::DEFAULT_EVAL_TEXT[..1500]).unwrap();
    let out = Command::new(BIN)
        .arg("--model")
        .arg(common::smollm2_path())
        .args(["--offline", "eval"])
        .args(args)
        .arg("--plan")
        .arg(saved)
        .arg("--text")
        .arg(&text)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "eval --plan failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn toggle_two_blocks_see_metrics_change_save_and_quit() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::scratch_dir();
    let session = dir.path().join("session");
    let tmux = Tmux::start("e2e", &[("SCALPEL_SESSION_DIR", &session)], &model_arg());

    tmux.wait_for("the block grid", MINUTES, |s| {
        s.contains("blocks · 0/60 skipped") && s.contains("│attn ") && s.contains("│mlp ")
    });
    let screen = tmux.wait_for("the base model's perplexity", 10 * MINUTES, |s| {
        ppl(s).is_some()
    });
    let (base, _) = ppl(&screen).unwrap();
    assert!((15.0..35.0).contains(&base), "base PPL {base}");

    // attn.10 and attn.15: the cursor starts on attn.0.
    tmux.keys(&["l"; 10]);
    tmux.keys(&["Space"]);
    tmux.keys(&["l"; 5]);
    tmux.keys(&["Space"]);
    let screen = tmux.wait_for("the two-block plan's metrics", 10 * MINUTES, |s| {
        s.contains("2 skipped") && ppl(s).is_some_and(|(_, p)| p != base)
    });
    let (_, plan_ppl) = ppl(&screen).unwrap();
    assert!(
        plan_ppl > base,
        "skipping blocks should cost perplexity: {plan_ppl} vs {base}"
    );
    assert!(screen.contains("skipped  2/60"), "{screen}");

    // `d`: the two-block plan drafts for the full model; the text must be
    // the full model's own (the lean kernels give the same logits for the
    // k + 1 verify rows as for one decode step).
    tmux.keys(&["d"]);
    let screen = tmux.wait_for("the draft run's verdict", 5 * MINUTES, |s| {
        s.contains("same text ✓") || s.contains("text differs ✗")
    });
    assert!(screen.contains("same text ✓"), "{screen}");
    assert!(screen.contains("draft: attn.10 attn.15"), "{screen}");

    let saved: PathBuf = dir.path().join("two-blocks.json");
    tmux.keys(&["s", "C-u"]);
    tmux.text(&saved.display().to_string());
    tmux.keys(&["Enter"]);
    tmux.wait_for("the save message", MINUTES, |s| s.contains("saved "));
    tmux.keys(&["q"]);
    tmux.wait_for("scalpel to exit", MINUTES, |s| s.contains("EXITED 0"));

    // The saved file is a plan `scalpel eval` accepts.
    let stdout = eval_saved(dir.path(), &saved, &["--no-base", "--window", "128"]);
    assert!(stdout.contains("attn.10 attn.15"), "{stdout}");
    // The autosave kept the session and the current plan.
    assert!(std::fs::read_dir(&session).unwrap().count() >= 2);
}

#[test]
fn redraws_stay_under_100ms_while_a_search_runs() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::scratch_dir();
    let session = dir.path().join("session");
    let log = dir.path().join("frames.log");
    let tmux = Tmux::start(
        "latency",
        &[
            ("SCALPEL_SESSION_DIR", &session),
            ("SCALPEL_FRAME_LOG", &log),
        ],
        &model_arg(),
    );
    tmux.wait_for("the block grid", MINUTES, |s| s.contains("blocks · 0/60"));
    // Stop the importance scoring (if it is not cached) so the search can start.
    tmux.keys(&["Escape"]);
    tmux.wait_for("no background job", 5 * MINUTES, |s| {
        !s.contains(" importance █") && !s.contains(" importance ░")
    });
    tmux.keys(&["S", "C-u", "3", "Enter"]);
    tmux.wait_for("the search to start", MINUTES, |s| s.contains("search K=3"));

    // Keys of every kind while the search computes: moves, metric, help, chart.
    let keys = ["l", "l", "j", "m", "x", "y", "?", "Escape", "h", "k"];
    for _ in 0..3 {
        for k in keys {
            tmux.keys(&[k]);
            std::thread::sleep(Duration::from_millis(120));
        }
    }
    let screen = tmux.capture();
    assert!(
        screen.contains("search K=3"),
        "the search ended too early:\n{screen}"
    );
    tmux.keys(&["Escape"]);
    tmux.wait_for("the search to cancel", 5 * MINUTES, |s| {
        s.contains("cancelled")
    });
    tmux.keys(&["q"]);
    tmux.wait_for("scalpel to exit", MINUTES, |s| s.contains("EXITED 0"));

    let text = std::fs::read_to_string(&log).unwrap();
    let events: Vec<(f64, &str, &str)> = text
        .lines()
        .filter_map(|l| {
            let mut p = l.split_whitespace();
            Some((p.next()?.parse().ok()?, p.next()?, p.next()?))
        })
        .collect();
    let mut latencies = Vec::new();
    let mut gaps = Vec::new();
    let mut last_frame: Option<f64> = None;
    for (i, (t, kind, busy)) in events.iter().enumerate() {
        let searching = busy.starts_with("search");
        if *kind == "key" && searching {
            let next = events[i..]
                .iter()
                .find(|e| e.1 == "frame")
                .expect("a frame after the key");
            latencies.push(next.0 - t);
        }
        if *kind == "frame" {
            if let (Some(prev), true) = (last_frame, searching) {
                gaps.push(t - prev);
            }
            last_frame = Some(*t);
        }
    }
    assert!(
        latencies.len() >= 25,
        "only {} keys arrived during the search",
        latencies.len()
    );
    gaps.sort_by(f64::total_cmp);
    let worst_key = latencies.iter().cloned().fold(0.0, f64::max);
    let worst_gap = gaps.last().copied().unwrap_or(0.0);
    let p95_gap = gaps[gaps.len() * 95 / 100];
    eprintln!(
        "{} keys during the search: worst key→frame {worst_key:.1} ms; {} frames, gaps p95 {p95_gap:.1} ms, worst {worst_gap:.1} ms",
        latencies.len(),
        gaps.len()
    );
    // Every key is on screen within 100 ms.
    assert!(
        worst_key < 100.0,
        "a key took {worst_key:.1} ms to show: {latencies:?}"
    );
    // The steady redraw (every 33 ms) keeps going while the search computes.
    // The worst single gap also depends on the OS scheduler when other
    // programs load the CPU (a 255 ms gap was seen once at load average 11
    // on 2 cores), so it gets a looser bound than the 95th percentile.
    assert!(p95_gap < 100.0, "redraws slowed to {p95_gap:.1} ms (p95)");
    assert!(worst_gap < 1000.0, "the screen froze for {worst_gap:.1} ms");
}

/// The KV view as a person uses it: `v` to the view, the kept-keys map of
/// the default policy on the prompt, `t` to StreamingLLM, `a` to put it in
/// the plan, `s` to save; the saved plan's `kv` section then runs in
/// `scalpel eval`.
#[test]
fn the_kv_view_maps_a_policy_and_saves_it_in_the_plan() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::scratch_dir();
    let session = dir.path().join("session");
    let tmux = Tmux::start("kv", &[("SCALPEL_SESSION_DIR", &session)], &model_arg());
    tmux.wait_for("the block grid", MINUTES, |s| s.contains("blocks · 0/60"));
    tmux.keys(&["v", "v", "v"]);
    let screen = tmux.wait_for("the kept-keys map", 5 * MINUTES, |s| {
        s.contains("┌ KV · quest:32:16:2") && s.contains("kept per layer and KV head")
    });
    assert!(screen.contains("share of KV heads"), "{screen}");
    tmux.keys(&["t"]);
    let screen = tmux.wait_for("the StreamingLLM map", 5 * MINUTES, |s| {
        s.contains("┌ KV · streaming:32:4")
            && s.contains("kept per layer")
            && !s.contains("mapping…")
    });
    // StreamingLLM keeps its 32 keys per layer and KV head.
    assert!(
        screen.contains("kept per layer and KV head: 32.0 of"),
        "{screen}"
    );
    tmux.keys(&["a"]);
    tmux.wait_for("the policy in the plan", MINUTES, |s| {
        s.contains("· in plan")
    });
    let saved = dir.path().join("kv-plan.json");
    tmux.keys(&["s", "C-u"]);
    tmux.text(&saved.display().to_string());
    tmux.keys(&["Enter"]);
    tmux.wait_for("the save message", MINUTES, |s| s.contains("saved "));
    tmux.keys(&["q"]);
    tmux.wait_for("scalpel to exit", MINUTES, |s| s.contains("EXITED 0"));

    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    assert_eq!(plan["sections"]["kv"]["policy"], "streaming:32:4", "{plan}");
    let stdout = eval_saved(dir.path(), &saved, &["--context", "256"]);
    assert!(stdout.contains("streaming:32:4"), "{stdout}");
}
