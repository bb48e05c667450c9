//! The bottom bar: the keys valid right now (gitui-style), a text prompt
//! when one is open, the last status message, and the job progress line.

use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;
use ratatui::Frame;

use crate::tui::app::{App, Mode};
use crate::tui::keys;

const KEY: Style = Style::new().fg(Color::Black).bg(Color::Gray);

/// (key, action) pairs valid in the current mode, most useful first,
/// from the one table of bindings.
pub fn keys(app: &App) -> Vec<(&'static str, &'static str)> {
    match &app.mode {
        Mode::Help => keys::HELP_BAR.to_vec(),
        Mode::History { .. } => keys::bar(keys::HISTORY, app),
        Mode::Input { .. } => keys::bar(keys::INPUT, app),
        Mode::Normal => keys::bar(keys::main_commands(), app),
    }
}

pub fn draw(frame: &mut Frame, area: Rect, app: &App) {
    if let Mode::Input { kind, text } = &app.mode {
        let hint: Vec<String> = keys(app)
            .iter()
            .map(|(k, what)| format!("{k} {what}"))
            .collect();
        let hint = hint.join(" · ");
        let line = Line::from(vec![
            Span::styled(
                format!(" {}: ", kind.label()),
                Style::new().fg(Color::Yellow),
            ),
            Span::raw(text.clone()),
            Span::styled("█", Style::new().fg(Color::Gray)),
            Span::styled(format!("  {hint}"), Style::new().fg(Color::DarkGray)),
        ]);
        frame.render_widget(Paragraph::new(line), area);
        return;
    }
    let mut spans = Vec::new();
    let mut used = 0usize;
    // A status message takes the right part of the bar while it is fresh.
    let status = app.status.as_ref().map(|s| {
        let style = if s.error {
            Style::new().fg(Color::LightRed)
        } else {
            Style::new().fg(Color::Green)
        };
        (format!(" {}", s.text), style)
    });
    let budget = area.width as usize
        - status
            .as_ref()
            .map_or(0, |(t, _)| t.chars().count().min(area.width as usize / 2));
    for (key, what) in keys(app) {
        let w = key.chars().count() + what.chars().count() + 3;
        if used + w > budget {
            break;
        }
        spans.push(Span::styled(format!(" {key} "), KEY));
        spans.push(Span::raw(format!("{what} ")));
        used += w;
    }
    if let Some((text, style)) = status {
        let room = (area.width as usize).saturating_sub(used);
        let text: String = text.chars().take(room).collect();
        spans.push(Span::styled(text, style));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

/// `search K=4 ▕████░░░░▏ 45% · ETA 0:32 · loss 2.913 · step 2/4 · esc cancels`
pub fn draw_job(frame: &mut Frame, area: Rect, app: &App) {
    let Some(job) = &app.job else { return };
    let bar_w = 20usize;
    let filled = (job.fraction() * bar_w as f64).round() as usize;
    let eta = match job.eta(app.now) {
        Some(d) => {
            let s = d.as_secs();
            format!("ETA {}:{:02}", s / 60, s % 60)
        }
        None => "ETA …".into(),
    };
    let mut tail = format!(" {:>3.0}% · {eta}", job.fraction() * 100.0);
    if let Some(loss) = job.loss {
        tail.push_str(&format!(" · loss {loss:.4}"));
    }
    if !job.detail.is_empty() {
        tail.push_str(&format!(" · {}", job.detail));
    }
    tail.push_str(if job.cancelling {
        " · cancelling…"
    } else {
        " · esc cancels"
    });
    let line = Line::from(vec![
        Span::styled(
            format!(" {} ", job.kind.label()),
            Style::new().fg(Color::Magenta).add_modifier(Modifier::BOLD),
        ),
        Span::styled("█".repeat(filled), Style::new().fg(Color::Magenta)),
        Span::styled("░".repeat(bar_w - filled), Style::new().fg(Color::DarkGray)),
        Span::raw(tail),
    ]);
    frame.render_widget(Paragraph::new(line), area);
}
