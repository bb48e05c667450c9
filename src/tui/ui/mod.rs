//! Drawing: one file per panel, all reading `&App` only.

pub mod chart;
pub mod cmdbar;
pub mod generation;
pub mod grid;
pub mod help;
pub mod kv;
pub mod metrics;
pub mod routing;
pub mod speculative;

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Clear, Paragraph, Wrap};
use ratatui::Frame;

use super::app::{App, EvalStage, Mode, View, MIN_HEIGHT, MIN_WIDTH};

/// Where each panel goes on a screen of a given size.
#[derive(Debug, Clone, Copy)]
pub struct Areas {
    pub title: Rect,
    pub grid: Rect,
    pub metrics: Rect,
    pub chart: Rect,
    /// Grid, metrics and chart together: where another mode's view draws.
    pub main: Rect,
    pub generation: Rect,
    /// One line for a running job's progress bar (zero height when idle).
    pub job: Rect,
    pub cmdbar: Rect,
}

/// The layout: grid on top, metrics beside the chart, generation below.
pub fn areas(area: Rect, app: &App) -> Areas {
    let grid_h = grid::height(area.width, app.info.n_layers);
    let job_h = u16::from(app.job.is_some());
    let rest = area.height.saturating_sub(1 + grid_h + job_h + 1);
    // Metrics need 10 rows; extra height is shared with the generation panel.
    let middle_h = (rest * 3 / 5).max(10).min(rest);
    let [title, grid, middle, generation, job, cmdbar] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(grid_h),
        Constraint::Length(middle_h),
        Constraint::Fill(1),
        Constraint::Length(job_h),
        Constraint::Length(1),
    ])
    .areas(area);
    let metrics_w = (area.width * 9 / 20).clamp(40, 60);
    let [metrics, chart] =
        Layout::horizontal([Constraint::Length(metrics_w), Constraint::Fill(1)]).areas(middle);
    Areas {
        title,
        grid,
        metrics,
        chart,
        main: grid.union(middle),
        generation,
        job,
        cmdbar,
    }
}

pub fn too_small(area: Rect) -> bool {
    area.width < MIN_WIDTH || area.height < MIN_HEIGHT
}

pub fn draw(frame: &mut Frame, app: &App) {
    let area = frame.area();
    if too_small(area) {
        draw_too_small(frame, area);
        return;
    }
    let a = areas(area, app);
    draw_title(frame, a.title, app);
    match app.view {
        View::Blocks => {
            grid::draw(frame, a.grid, app);
            metrics::draw(frame, a.metrics, app);
            chart::draw(frame, a.chart, app);
        }
        View::Speculative => speculative::draw(frame, a.main, app),
        View::Routing => routing::draw(frame, a.main, app),
        View::Kv => kv::draw(frame, a.main, app),
    }
    generation::draw(frame, a.generation, app);
    if a.job.height > 0 {
        cmdbar::draw_job(frame, a.job, app);
    }
    cmdbar::draw(frame, a.cmdbar, app);
    match &app.mode {
        Mode::Help => help::draw(frame, area),
        Mode::History { selected } => help::draw_history(frame, area, app, *selected),
        _ => {}
    }
}

fn draw_too_small(frame: &mut Frame, area: Rect) {
    let text = vec![
        Line::from(Span::styled(
            "scalpel needs a bigger terminal",
            Style::default().add_modifier(Modifier::BOLD),
        )),
        Line::from(""),
        Line::from(format!(
            "at least {MIN_WIDTH}×{MIN_HEIGHT}; this one is {}×{}.",
            area.width, area.height
        )),
        Line::from("Enlarge the window, or press q to quit."),
    ];
    let h = (text.len() as u16).min(area.height);
    let y = area.y + area.height.saturating_sub(h) / 2;
    let rect = Rect::new(area.x, y, area.width, h);
    frame.render_widget(Clear, area);
    frame.render_widget(
        Paragraph::new(text)
            .alignment(ratatui::layout::Alignment::Center)
            .wrap(Wrap { trim: true }),
        rect,
    );
}

fn draw_title(frame: &mut Frame, area: Rect, app: &App) {
    let plan = app.plan();
    let state = match app.current_eval().map(|e| e.stage) {
        Some(EvalStage::Quality { done, total }) if total > 0 => {
            format!("evaluating… {done}/{total}")
        }
        Some(EvalStage::Quality { .. }) => "evaluating…".to_string(),
        Some(EvalStage::Speed) => "measuring speed…".to_string(),
        None => String::new(),
    };
    let name: String = app.info.identity.name.chars().take(28).collect();
    let mut spans = vec![
        Span::styled(
            " scalpel ",
            Style::default()
                .fg(Color::Black)
                .bg(Color::Cyan)
                .add_modifier(Modifier::BOLD),
        ),
        Span::raw(format!(
            " {name} · plan {}/{} · {} skipped",
            app.at + 1,
            app.history.len(),
            plan.skip.len()
        )),
    ];
    if plan.has_scales() {
        spans.push(Span::raw(" +scales"));
    }
    if app.view != View::Blocks {
        spans.push(Span::raw(format!(" · {} view", app.view.label())));
    }
    if !state.is_empty() {
        spans.push(Span::raw("  "));
        spans.push(Span::styled(
            state,
            Style::default()
                .fg(Color::Yellow)
                .add_modifier(Modifier::BOLD),
        ));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

/// A rectangle of at most `w`×`h` centred in `area`.
pub fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

/// `1234.5` → `1235`, `12.34` → `12.3`: tokens/sec at a glance.
pub fn fmt_rate(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// `s` cut to `width` columns, with `…` marking the cut.
pub fn clip(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(width.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}
