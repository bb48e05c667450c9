//! The generation panel: one prompt through the base model and the current
//! plan side by side, streamed, with tokens/sec.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph};
use ratatui::Frame;

use super::{clip, fmt_rate};
use crate::tui::app::{App, GenSide};

pub fn draw(frame: &mut Frame, area: Rect, app: &App) {
    if area.height < 3 {
        return;
    }
    let panel = Block::bordered().title(" generation · p run · d draft · e edit prompt ");
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
    draw_side(frame, left, "base", &app.gen.base, String::new());
    if app.gen.drafting {
        let verdict = draft_verdict(&app.gen.base, &app.gen.plan);
        draw_side(
            frame,
            right,
            &format!("draft: {plan_label}"),
            &app.gen.plan,
            verdict,
        );
    } else {
        draw_side(
            frame,
            right,
            &format!("plan: {plan_label}"),
            &app.gen.plan,
            String::new(),
        );
    }
}

/// A finished draft run against the base run: acceptance, τ, the speed-up
/// (one run of each, one after the other) and whether the text is the same.
fn draft_verdict(base: &GenSide, draft: &GenSide) -> String {
    let Some(stats) = draft.draft else {
        return String::new();
    };
    let speedup = match (draft.decode_tps, base.decode_tps) {
        (Some(d), Some(b)) if b > 0.0 => format!(" · {:.2}× plain", d / b),
        _ => String::new(),
    };
    let same = if draft.text == base.text {
        "same text ✓"
    } else {
        "text differs ✗"
    };
    format!(
        "{same} · α {:.0}% · τ {:.2}{speedup}",
        stats.acceptance_rate * 100.0,
        stats.mean_accepted
    )
}

fn draw_side(frame: &mut Frame, area: Rect, name: &str, side: &GenSide, verdict: String) {
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
    // With one line, the verdict replaces the speeds in the header.
    let one_line = area.height == 1 && !verdict.is_empty();
    let head = match one_line {
        true => format!("{name} · {verdict}"),
        false => format!("{name}{state}"),
    };
    let width = area.width as usize;
    let mut lines = vec![Line::from(Span::styled(
        clip(&head, width),
        Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD),
    ))];
    if !verdict.is_empty() && !one_line {
        lines.push(Line::from(Span::styled(
            clip(&verdict, width),
            Style::new().fg(Color::Yellow),
        )));
    }
    let body: Vec<Line> = match &side.error {
        Some(e) => vec![Line::from(format!("error: {e}"))],
        None if !side.pieces.is_empty() => marked_lines(&side.pieces, width),
        None => wrap(&side.text, width)
            .into_iter()
            .map(Line::from)
            .collect(),
    };
    // Show the newest text when it overflows.
    let room = (area.height as usize).saturating_sub(lines.len());
    let skip = body.len().saturating_sub(room);
    lines.extend(body.into_iter().skip(skip));
    frame.render_widget(Paragraph::new(lines), area);
}

/// Greedy word wrap to `width` columns (long words are split).
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let chars: Vec<(char, bool)> = text.chars().map(|c| (c, false)).collect();
    wrap_marked(&chars, width)
        .into_iter()
        .map(|line| line.into_iter().map(|(c, _)| c).collect())
        .collect()
}

/// Drafted tokens in green, the full model's own in the default colour.
fn marked_lines(pieces: &[(String, bool)], width: usize) -> Vec<Line<'static>> {
    let chars: Vec<(char, bool)> = pieces
        .iter()
        .flat_map(|(p, drafted)| p.chars().map(move |c| (c, *drafted)))
        .collect();
    wrap_marked(&chars, width)
        .into_iter()
        .map(|line| {
            let mut spans: Vec<Span> = Vec::new();
            for run in line.chunk_by(|a, b| a.1 == b.1) {
                let text: String = run.iter().map(|(c, _)| c).collect();
                let style = match run[0].1 {
                    true => Style::new().fg(Color::Green),
                    false => Style::new(),
                };
                spans.push(Span::styled(text, style));
            }
            Line::from(spans)
        })
        .collect()
}

/// Word wrap of characters that each carry a mark (a space keeps the mark
/// of the token it came in); a word longer than `width` is split.
fn wrap_marked<T: Copy>(chars: &[(char, T)], width: usize) -> Vec<Vec<(char, T)>> {
    let width = width.max(1);
    let mut out = Vec::new();
    for para in chars.split(|(c, _)| *c == '\n') {
        let mut line: Vec<(char, T)> = Vec::new();
        let mut start = 0;
        while start <= para.len() {
            let end = para[start..]
                .iter()
                .position(|(c, _)| *c == ' ')
                .map_or(para.len(), |i| start + i);
            let word = &para[start..end];
            if !line.is_empty() && line.len() + 1 + word.len() > width {
                out.push(std::mem::take(&mut line));
            } else if !line.is_empty() {
                line.push(para[start - 1]);
            }
            let mut rest = word;
            while rest.len() > width {
                out.push(rest[..width].to_vec());
                rest = &rest[width..];
            }
            line.extend_from_slice(rest);
            start = end + 1;
        }
        out.push(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_words_and_splits_long_ones() {
        assert_eq!(wrap("aa bb cc", 5), vec!["aa bb", "cc"]);
        assert_eq!(wrap("abcdefgh", 3), vec!["abc", "def", "gh"]);
        assert_eq!(wrap("a\nb", 10), vec!["a", "b"]);
        assert_eq!(wrap("a  b ", 10), vec!["a  b "]);
        assert_eq!(wrap("", 4), vec![""]);
    }

    #[test]
    fn drafted_pieces_keep_their_colour_across_a_wrap() {
        let pieces = vec![
            ("The".to_string(), false),
            (" cat".to_string(), true),
            (" sat".to_string(), true),
            (" down".to_string(), false),
        ];
        let lines = marked_lines(&pieces, 8);
        let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        assert_eq!(text, ["The cat", "sat down"]);
        let green = |l: &Line| -> String {
            l.spans
                .iter()
                .filter(|s| s.style.fg == Some(Color::Green))
                .map(|s| s.content.to_string())
                .collect()
        };
        assert_eq!(green(&lines[0]), " cat");
        assert_eq!(green(&lines[1]), "sat");
    }
}
