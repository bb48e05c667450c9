//! The generation panel: one prompt through the base model and the current
//! plan side by side, streamed, with tokens/sec.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph};
use ratatui::Frame;

use super::fmt_rate;
use crate::tui::app::{App, GenSide};

pub fn draw(frame: &mut Frame, area: Rect, app: &App) {
    if area.height < 3 {
        return;
    }
    let panel = Block::bordered().title(" generation · p run · e edit prompt ");
    let inner = panel.inner(area);
    frame.render_widget(panel, area);
    let [prompt, cols] =
        Layout::vertical([Constraint::Length(1), Constraint::Fill(1)]).areas(inner);
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled("prompt ", Style::new().fg(Color::Gray)),
            Span::raw(app.gen.prompt.clone()),
        ])),
        prompt,
    );
    let [left, right] = Layout::horizontal([Constraint::Fill(1), Constraint::Fill(1)])
        .spacing(1)
        .areas(cols);
    let plan_label = if app.gen.plan_label.is_empty() {
        app.plan().describe()
    } else {
        app.gen.plan_label.clone()
    };
    draw_side(frame, left, "base", &app.gen.base);
    draw_side(frame, right, &format!("plan: {plan_label}"), &app.gen.plan);
}

fn draw_side(frame: &mut Frame, area: Rect, name: &str, side: &GenSide) {
    if area.height == 0 || area.width < 4 {
        return;
    }
    let state = if side.queued {
        " · waiting".to_string()
    } else if side.running {
        " · streaming…".to_string()
    } else if let (Some(p), Some(d)) = (side.prefill_tps, side.decode_tps) {
        format!(" · {} / {} tok/s", fmt_rate(p), fmt_rate(d))
    } else {
        String::new()
    };
    let head = format!("{name}{state}");
    let width = area.width as usize;
    let mut lines = vec![Line::from(Span::styled(
        truncate(&head, width),
        Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD),
    ))];
    let body = match &side.error {
        Some(e) => vec![format!("error: {e}")],
        None => wrap(&side.text, width),
    };
    // Show the newest text when it overflows.
    let room = (area.height as usize).saturating_sub(1);
    let skip = body.len().saturating_sub(room);
    lines.extend(body.into_iter().skip(skip).map(Line::from));
    frame.render_widget(Paragraph::new(lines), area);
}

fn truncate(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(width.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Greedy word wrap to `width` columns (long words are split).
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut out = Vec::new();
    for para in text.split('\n') {
        let mut line = String::new();
        for word in para.split(' ') {
            let wl = word.chars().count();
            let ll = line.chars().count();
            if ll > 0 && ll + 1 + wl > width {
                out.push(std::mem::take(&mut line));
            } else if ll > 0 {
                line.push(' ');
            }
            let mut chars: Vec<char> = word.chars().collect();
            while chars.len() > width {
                out.push(chars.drain(..width).collect());
            }
            line.extend(chars);
        }
        out.push(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::wrap;

    #[test]
    fn wraps_words_and_splits_long_ones() {
        assert_eq!(wrap("aa bb cc", 5), vec!["aa bb", "cc"]);
        assert_eq!(wrap("abcdefgh", 3), vec!["abc", "def", "gh"]);
        assert_eq!(wrap("a\nb", 10), vec!["a", "b"]);
    }
}
