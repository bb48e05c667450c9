//! The metrics panel: held-out quality and measured speed of the current
//! plan beside the base model, with deltas, and what the plan skips.

use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Wrap};
use ratatui::Frame;

use super::fmt_rate;
use crate::tui::app::{App, EvalStage};

const DIM: Style = Style::new().fg(Color::DarkGray);

pub fn draw(frame: &mut Frame, area: Rect, app: &App) {
    let record = app.current_record();
    let quality = record.and_then(|r| r.quality);
    let speed = record.and_then(|r| r.speed);
    let base = app.base_quality;
    let pending = app.current_eval().map(|e| e.stage);
    let is_base = app.plan().skip.is_empty() && !app.plan().has_scales();
    let title = match pending {
        Some(EvalStage::Quality { done, total }) if total > 0 => {
            format!(" metrics · evaluating… {done}/{total} ")
        }
        Some(EvalStage::Quality { .. }) => " metrics · evaluating… ".to_string(),
        Some(EvalStage::Speed) => " metrics · measuring speed… ".to_string(),
        None => " metrics · held-out ".to_string(),
    };
    let panel = Block::bordered().title(title);
    let inner = panel.inner(area);
    frame.render_widget(panel, area);
    // "…" while a number is being measured, "—" when nothing is under way.
    let wait = |what: &str| match pending {
        Some(EvalStage::Quality { .. }) => "…",
        Some(EvalStage::Speed) if what == "s" => "…",
        _ => "—",
    };

    let mut lines = vec![row(["", "base", "plan", "Δ"], Style::new().fg(Color::Gray))];
    match (base, quality) {
        (Some(b), Some(q)) => {
            lines.push(row_delta(
                "PPL",
                format!("{:.2}", b.perplexity),
                format!("{:.2}", q.perplexity),
                format!("{:+.2}", q.perplexity - b.perplexity),
                q.perplexity > b.perplexity * 1.001,
            ));
            lines.push(row_delta(
                "KL",
                "0".into(),
                if is_base {
                    "0".into()
                } else {
                    format!("{:.4}", q.kl)
                },
                String::new(),
                q.kl > 0.0,
            ));
            lines.push(row_delta(
                "top-1",
                "100%".into(),
                format!("{:.1}%", q.top1 * 100.0),
                format!("{:+.1}pt", (q.top1 - 1.0) * 100.0),
                q.top1 < 1.0,
            ));
        }
        (b, _) => {
            let base_ppl = b.map_or_else(
                || {
                    if app.baseline_error.is_some() {
                        "failed".into()
                    } else {
                        "…".into()
                    }
                },
                |b| format!("{:.2}", b.perplexity),
            );
            let plan_ppl =
                quality.map_or(wait("q").to_string(), |q| format!("{:.2}", q.perplexity));
            lines.push(row(["PPL", &base_ppl, &plan_ppl, ""], Style::new()));
            lines.push(row(["KL", "0", wait("q"), ""], Style::new()));
            lines.push(row(["top-1", "100%", wait("q"), ""], Style::new()));
        }
    }
    match speed {
        Some(s) => {
            lines.push(row_ratio("prefill", s.base_prefill, s.plan_prefill));
            lines.push(row_ratio("decode", s.base_decode, s.plan_decode));
            if let Some(w) = s.overlap.warning() {
                lines.push(Line::from(Span::styled(w, Style::new().fg(Color::Yellow))));
            }
        }
        None => {
            lines.push(row(
                ["prefill", wait("s"), wait("s"), "tok/s"],
                Style::new(),
            ));
            lines.push(row(["decode", wait("s"), wait("s"), "tok/s"], Style::new()));
        }
    }
    let (params, flops) = app.info.skipped_shares(app.plan());
    lines.push(Line::from(vec![
        Span::raw(format!(
            "skipped {:>2}/{} ",
            app.plan().skip.len(),
            app.info.n_blocks()
        )),
        Span::styled(
            format!(
                "params −{:.1}% FLOPs −{:.1}%",
                params * 100.0,
                flops * 100.0
            ),
            Style::new().fg(Color::Cyan),
        ),
    ]));
    lines.push(Line::from(Span::styled(app.info.heldout.clone(), DIM)));
    lines.push(Line::from(Span::styled(app.info.speed.clone(), DIM)));
    // The last lines describe the measurement and may wrap on narrow panels.
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), inner);
}

/// Label, base, plan, delta in fixed columns.
fn row(cells: [&str; 4], style: Style) -> Line<'static> {
    Line::from(Span::styled(
        format!(
            "{:<8}{:>9}{:>11}{:>9}",
            cells[0], cells[1], cells[2], cells[3]
        ),
        style,
    ))
}

/// A row whose delta is red when it got worse.
fn row_delta(label: &str, base: String, plan: String, delta: String, worse: bool) -> Line<'static> {
    let delta_style = if worse {
        Style::new().fg(Color::LightRed)
    } else {
        Style::new().fg(Color::Green)
    };
    Line::from(vec![
        Span::raw(format!("{label:<8}{base:>9}")),
        Span::styled(
            format!("{plan:>11}"),
            Style::new().add_modifier(Modifier::BOLD),
        ),
        Span::styled(format!("{delta:>9}"), delta_style),
    ])
}

fn row_ratio(label: &str, base: f64, plan: f64) -> Line<'static> {
    let ratio = plan / base;
    row_delta(
        label,
        fmt_rate(base),
        fmt_rate(plan),
        format!("×{ratio:.2}"),
        ratio < 1.0,
    )
}
