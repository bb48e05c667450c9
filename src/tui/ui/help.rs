//! Popups: `?` help grouped by panel, and the plan history list.

use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph};
use ratatui::Frame;

use super::centered;
use crate::tui::app::App;
use crate::tui::keys;

pub fn draw(frame: &mut Frame, area: Rect) {
    let mut lines = Vec::new();
    // Every main-screen key, grouped by the panel it acts on.
    for group in keys::MAIN {
        lines.push(Line::from(Span::styled(
            group.name,
            Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD),
        )));
        for c in group.commands {
            lines.push(Line::from(vec![
                Span::styled(format!("  {:<12}", c.keys), Style::new().fg(Color::Yellow)),
                Span::raw(c.description),
            ]));
        }
    }
    let h = lines.len() as u16 + 2;
    let rect = centered(area, 64, h);
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" help · any key closes ")),
        rect,
    );
}

pub fn draw_history(frame: &mut Frame, area: Rect, app: &App, selected: usize) {
    let rect = centered(
        area,
        70,
        (app.history.len() as u16 + 2).clamp(5, area.height - 2),
    );
    let room = rect.height.saturating_sub(2) as usize;
    // Keep the selection in view.
    let first = selected.saturating_sub(room.saturating_sub(1));
    let lines: Vec<Line> = app
        .history
        .iter()
        .enumerate()
        .skip(first)
        .take(room)
        .map(|(i, plan)| {
            let q = app
                .record(plan)
                .and_then(|r| r.quality)
                .map(|q| format!("PPL {:>7.2} KL {:.4}", q.perplexity, q.kl))
                .unwrap_or_else(|| "not evaluated".into());
            let mark = if i == app.at { '●' } else { ' ' };
            let mut desc = plan.describe();
            if desc.chars().count() > 34 {
                desc = format!(
                    "{} blocks: {}…",
                    plan.skip.len(),
                    desc.chars().take(22).collect::<String>()
                );
            }
            let style = if i == selected {
                Style::new().add_modifier(Modifier::REVERSED)
            } else {
                Style::new()
            };
            Line::from(Span::styled(
                format!("{mark}{:>3} {desc:<35} {q}", i + 1),
                style,
            ))
        })
        .collect();
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new(lines)
            .block(Block::bordered().title(" history · enter jumps · esc closes ")),
        rect,
    );
}
