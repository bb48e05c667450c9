//! Popups: `?` help grouped by panel, and the plan history list.

use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph};
use ratatui::Frame;

use super::centered;
use crate::tui::app::App;

/// Every key, grouped by the panel it acts on.
pub const HELP: &[(&str, &[(&str, &str)])] = &[
    (
        "Block grid",
        &[
            ("←↓↑→ hjkl", "move between blocks"),
            ("click", "select a block; click again or right-click: skip"),
            ("0 / $", "first / last layer"),
            ("space enter", "skip or restore the block (re-evaluates)"),
            ("c", "clear: back to the base model"),
            ("m", "colour by Δloss / block influence"),
        ],
    ),
    (
        "Plans and history",
        &[
            ("u  ^r", "undo / redo"),
            ("H", "history list: jump to any earlier plan"),
            ("s / o", "save / open a plan file"),
        ],
    ),
    (
        "Search and fit",
        &[
            ("S", "Hopscotch: skip K attention blocks (asks K)"),
            ("F", "fit Hopscotch scales for the current plan"),
            ("Esc", "cancel the running search, fit or scoring"),
        ],
    ),
    (
        "Chart",
        &[
            ("x", "x axis: blocks skipped / decode speed-up"),
            ("y", "y axis: KL / perplexity"),
        ],
    ),
    (
        "Generation",
        &[
            ("p", "run the prompt through base and plan"),
            ("d", "plan drafts, full model verifies (lossless)"),
            ("e", "edit the prompt"),
        ],
    ),
    (
        "Anywhere",
        &[
            ("?", "this help"),
            ("q  ^c", "quit (the session is autosaved)"),
        ],
    ),
];

pub fn draw(frame: &mut Frame, area: Rect) {
    let mut lines = Vec::new();
    for (group, keys) in HELP {
        lines.push(Line::from(Span::styled(
            *group,
            Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD),
        )));
        for (key, what) in *keys {
            lines.push(Line::from(vec![
                Span::styled(format!("  {key:<12}"), Style::new().fg(Color::Yellow)),
                Span::raw(*what),
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
