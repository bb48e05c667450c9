//! The trade-off chart: held-out quality against blocks skipped, measured
//! decode speed-up, or (once a plan ran as a draft) speculative speed-up,
//! for the search trace and the user's plans.

use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Chart, Dataset, GraphType, Paragraph, Wrap};
use ratatui::Frame;

use crate::tui::app::{App, ChartX, ChartY, Origin};

pub fn draw(frame: &mut Frame, area: Rect, app: &App) {
    let y_name = match app.chart_y {
        ChartY::Kl => "KL",
        ChartY::Perplexity => "PPL",
    };
    let x_name = match app.chart_x {
        ChartX::BlocksSkipped => "skipped",
        ChartX::DecodeSpeedup => "decode ×",
        ChartX::SpeculativeSpeedup => "draft ×",
    };
    let title = Line::from(vec![
        Span::raw(format!(" {y_name} vs {x_name} · ")),
        Span::styled("⠒search ", Style::new().fg(Color::Magenta)),
        Span::styled("•yours ", Style::new().fg(Color::Cyan)),
        Span::styled("█now ", Style::new().fg(Color::Yellow)),
    ]);
    let search = app.chart_points(Origin::Search);
    let user = app.chart_points(Origin::User);
    let current: Vec<(f64, f64)> = app
        .current_record()
        .and_then(|r| {
            let q = r.quality?;
            Some((app.chart_x.of(r)?, app.chart_y.of(&q)))
        })
        .into_iter()
        .collect();
    if search.len() + user.len() < 2 {
        let panel = Block::bordered().title(title);
        let msg = "Each evaluated plan becomes a point here. Toggle blocks (space) or run a \
                   search (S) to fill the chart; x / y switch the axes.";
        frame.render_widget(
            Paragraph::new(Line::from(msg))
                .style(Style::new().fg(Color::DarkGray))
                .wrap(Wrap { trim: true })
                .block(panel),
            area,
        );
        return;
    }
    let all = search.iter().chain(&user);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in all {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-9 {
        y1 = y0 + 1.0;
    }
    let mut datasets = Vec::new();
    if !search.is_empty() {
        datasets.push(
            Dataset::default()
                .name("search")
                .marker(Marker::Braille)
                .graph_type(GraphType::Line)
                .style(Style::new().fg(Color::Magenta))
                .data(&search),
        );
    }
    if !user.is_empty() {
        datasets.push(
            Dataset::default()
                .name("yours")
                .marker(Marker::Dot)
                .graph_type(GraphType::Scatter)
                .style(Style::new().fg(Color::Cyan))
                .data(&user),
        );
    }
    if !current.is_empty() {
        datasets.push(
            Dataset::default()
                .name("now")
                .marker(Marker::Block)
                .graph_type(GraphType::Scatter)
                .style(Style::new().fg(Color::Yellow))
                .data(&current),
        );
    }
    let fmt_x = |v: f64| match app.chart_x {
        ChartX::BlocksSkipped => format!("{v:.0}"),
        ChartX::DecodeSpeedup | ChartX::SpeculativeSpeedup => format!("×{v:.2}"),
    };
    let fmt_y = |v: f64| {
        if v.abs() >= 10.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.3}")
        }
    };
    let chart = Chart::new(datasets)
        .block(Block::bordered().title(title))
        .legend_position(None)
        .x_axis(
            Axis::default()
                .bounds([x0, x1])
                .labels([fmt_x(x0), fmt_x(x1)])
                .style(Style::new().fg(Color::Gray)),
        )
        .y_axis(
            Axis::default()
                .bounds([y0, y1])
                .labels([fmt_y(y0), fmt_y(y1)])
                .style(Style::new().fg(Color::Gray)),
        );
    frame.render_widget(chart, area);
}
