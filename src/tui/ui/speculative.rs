//! The speculative view: every draft run (`d`) of this session, as
//! measured: the drafting plan, acceptance α, tokens per verify τ, plain
//! and speculative decode speed, the speed-up and whether the output was
//! the full model's greedy text, newest at the bottom.

use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph};
use ratatui::Frame;

use super::generation::wrap;
use super::{clip, fmt_rate};
use crate::tui::app::{App, DraftRun};
use crate::tui::jobs::generate::DRAFT_LEN;

/// Columns after the plan's: tokens, α, τ, plain, spec, ×, same.
const TAIL: usize = 46;
/// The current-plan mark and the run number before it.
const HEAD: usize = 5;

pub fn draw(frame: &mut Frame, area: Rect, app: &App) {
    if area.height < 3 {
        return;
    }
    let panel = Block::bordered()
        .title(" speculative · draft runs this session · d draft · v back to blocks ");
    let inner = panel.inner(area);
    frame.render_widget(panel, area);
    let width = inner.width as usize;
    let plan_w = width.saturating_sub(HEAD + TAIL).clamp(8, 48);
    let mut foot = footer(app, width);
    let mut lines = vec![Line::from(Span::styled(
        format!(
            "{:>4} {:<plan_w$} {:>6} {:>5} {:>5} {:>6} {:>6} {:>6}  same",
            "#", "draft plan", "tokens", "α", "τ", "plain", "spec", "×"
        ),
        Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD),
    ))];
    let room = (inner.height as usize).saturating_sub(1 + foot.len());
    let runs = &app.draft_runs;
    // The newest runs when they do not all fit.
    let first = runs.len().saturating_sub(room);
    for (i, run) in runs.iter().enumerate().skip(first) {
        lines.push(row(app, i, run, plan_w));
    }
    if first > 0 {
        foot.insert(0, format!("{first} older runs above"));
    }
    let gap = (inner.height as usize).saturating_sub(lines.len() + foot.len());
    lines.extend((0..gap).map(|_| Line::from("")));
    lines.extend(
        foot.into_iter()
            .map(|t| Line::from(Span::styled(t, Style::new().fg(Color::Gray)))),
    );
    frame.render_widget(Paragraph::new(lines), inner);
}

fn row(app: &App, i: usize, run: &DraftRun, plan_w: usize) -> Line<'static> {
    let mark = if &run.plan == app.plan() { '●' } else { ' ' };
    let plain = run.plain_decode.map_or("—".into(), fmt_rate);
    let speedup = run.speedup().map_or("—".into(), |x| format!("{x:.2}×"));
    let text = format!(
        "{mark}{:>3} {:<plan_w$} {:>6} {:>4.0}% {:>5.2} {:>6} {:>6} {:>6}  ",
        i + 1,
        clip(&run.plan.describe(), plan_w),
        run.new_tokens,
        run.stats.acceptance_rate * 100.0,
        run.stats.mean_accepted,
        plain,
        fmt_rate(run.draft_decode),
        speedup,
    );
    let same = match run.identical {
        true => Span::styled("✓", Style::new().fg(Color::Green)),
        false => Span::styled("✗", Style::new().fg(Color::LightRed)),
    };
    Line::from(vec![Span::raw(text), same])
}

/// A run in progress, the session's summary, and how the numbers are taken.
fn footer(app: &App, width: usize) -> Vec<String> {
    let mut out = Vec::new();
    let live = &app.gen.plan;
    if app.gen.drafting && (live.running || live.queued) {
        let drafted = live.pieces.iter().filter(|(_, d)| *d).count();
        out.push(clip(
            &format!(
                "drafting now: {} · {} tokens, {drafted} drafted",
                app.gen.plan_label,
                live.pieces.len()
            ),
            width,
        ));
    }
    let runs = &app.draft_runs;
    if runs.is_empty() {
        out.extend(wrap(
            "no draft runs yet: d runs the prompt with the current plan drafting \
             and the full model verifying, so the text must be the plain greedy text",
            width,
        ));
    } else {
        let same = runs.iter().filter(|r| r.identical).count();
        let differ: Vec<String> = (1..=runs.len())
            .filter(|i| !runs[i - 1].identical)
            .map(|i| i.to_string())
            .collect();
        let differ = match differ.is_empty() {
            true => String::new(),
            false => format!(" (✗ differs: run {})", differ.join(", ")),
        };
        let tau = runs.iter().map(|r| r.stats.mean_accepted).sum::<f64>() / runs.len() as f64;
        let best = runs
            .iter()
            .filter_map(|r| Some((r.speedup()?, r)))
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map_or(String::new(), |(x, r)| {
                format!(" · best {x:.2}× {}", r.plan.describe())
            });
        out.push(clip(
            &format!(
                "identical output {same}/{}{differ} · mean τ {tau:.2}{best}",
                runs.len()
            ),
            width,
        ));
    }
    out.extend(wrap(
        &format!(
            "greedy, {DRAFT_LEN} drafted per verify; plain then speculative, one run each \
             (a glance: `scalpel speculate` measures interleaved)"
        ),
        width,
    ));
    out
}
