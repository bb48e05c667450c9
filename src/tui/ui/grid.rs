//! The block grid: layers as columns, attention and MLP as rows, coloured by
//! importance. Layers wrap into bands when the terminal is narrow.

use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph};
use ratatui::Frame;

use crate::plan::{BlockId, BlockKind};
use crate::tui::app::{App, Metric};

const LABEL_W: u16 = 5;
/// Rows per band: layer numbers, attention, MLP.
const BAND_ROWS: u16 = 3;
const GLYPHS: [char; 4] = ['░', '▒', '▓', '█'];
const COLOURS: [Color; 4] = [Color::Green, Color::Yellow, Color::LightRed, Color::Red];

/// How the layers fit a given width.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Geometry {
    cell_w: u16,
    per_band: usize,
    bands: usize,
}

fn geometry(width: u16, n_layers: usize) -> Geometry {
    let avail = width.saturating_sub(2 + LABEL_W).max(1) as usize;
    let n = n_layers.max(1);
    let cell_w = (avail / n).clamp(1, 4) as u16;
    let per_band = (avail / cell_w as usize).clamp(1, n);
    Geometry {
        cell_w,
        per_band,
        bands: n.div_ceil(per_band),
    }
}

/// Rows the grid panel needs at this width (borders, bands, cursor line, legend).
pub fn height(width: u16, n_layers: usize) -> u16 {
    2 + geometry(width, n_layers).bands as u16 * BAND_ROWS + 2
}

/// The screen cell of a block inside the grid panel `area`.
fn cell_rect(area: Rect, g: Geometry, block: BlockId) -> Rect {
    let band = block.layer / g.per_band;
    let col = block.layer % g.per_band;
    let row = match block.kind {
        BlockKind::Attn => 1,
        BlockKind::Mlp => 2,
    };
    Rect::new(
        area.x + 1 + LABEL_W + col as u16 * g.cell_w,
        area.y + 1 + band as u16 * BAND_ROWS + row,
        g.cell_w,
        1,
    )
}

/// Which block a mouse click at (`col`, `row`) hits, if any.
pub fn cell_at(area: Rect, n_layers: usize, col: u16, row: u16) -> Option<BlockId> {
    let g = geometry(area.width, n_layers);
    (0..n_layers)
        .flat_map(|l| [BlockId::attn(l), BlockId::mlp(l)])
        .find(|b| {
            let r = cell_rect(area, g, *b);
            row == r.y && col >= r.x && col < r.x + r.width
        })
}

pub fn draw(frame: &mut Frame, area: Rect, app: &App) {
    let n = app.info.n_layers;
    let g = geometry(area.width, n);
    let skipped = app.plan().skip.len();
    let title = format!(
        " blocks · {skipped}/{} skipped · colour: {} ",
        app.info.n_blocks(),
        app.metric.label()
    );
    let panel = Block::bordered().title(title);
    let inner = panel.inner(area);
    frame.render_widget(panel, area);

    let mut lines: Vec<Line> = Vec::new();
    for band in 0..g.bands {
        let layers = band * g.per_band..((band + 1) * g.per_band).min(n);
        lines.push(header_line(layers.clone(), g.cell_w));
        for kind in [BlockKind::Attn, BlockKind::Mlp] {
            let label = match kind {
                BlockKind::Attn => "attn ",
                BlockKind::Mlp => "mlp  ",
            };
            let mut spans = vec![Span::styled(label, Style::default().fg(Color::Cyan))];
            spans.extend(
                layers
                    .clone()
                    .map(|l| cell(app, BlockId { layer: l, kind }, g.cell_w)),
            );
            lines.push(Line::from(spans));
        }
    }
    lines.push(cursor_line(app));
    lines.push(legend_line(app.metric, app.importance.is_empty()));
    frame.render_widget(Paragraph::new(lines), inner);
}

fn header_line(layers: std::ops::Range<usize>, cell_w: u16) -> Line<'static> {
    let step = if cell_w >= 2 { 5 } else { 10 };
    let width = layers.len() * cell_w as usize;
    let mut row = vec![' '; width];
    for (i, layer) in layers.enumerate() {
        if layer % step == 0 {
            for (j, ch) in layer.to_string().chars().enumerate() {
                if let Some(slot) = row.get_mut(i * cell_w as usize + j) {
                    *slot = ch;
                }
            }
        }
    }
    Line::from(vec![
        Span::styled("layer", Style::default().fg(Color::DarkGray)),
        Span::styled(
            row.into_iter().collect::<String>(),
            Style::default().fg(Color::DarkGray),
        ),
    ])
}

fn cell(app: &App, block: BlockId, w: u16) -> Span<'static> {
    let plan = app.plan();
    let w = w as usize;
    let (mut text, mut style) = if plan.is_skipped(block) {
        (
            "×".repeat(w),
            Style::default().fg(Color::White).bg(Color::DarkGray),
        )
    } else {
        match app.level(block) {
            Some(l) => (
                GLYPHS[l as usize].to_string().repeat(w),
                Style::default().fg(COLOURS[l as usize]),
            ),
            None => ("·".repeat(w), Style::default().fg(Color::DarkGray)),
        }
    };
    if is_scaled(app, block) {
        text.pop();
        text.push('*');
        style = style.add_modifier(Modifier::BOLD);
    }
    if block == app.cursor {
        style = style.add_modifier(Modifier::REVERSED);
    }
    Span::styled(text, style)
}

/// Whether the plan's fitted scales change this block's residual update.
fn is_scaled(app: &App, block: BlockId) -> bool {
    if !app.plan().has_scales() {
        return false;
    }
    let s = app.plan().scales_for(block.layer);
    match block.kind {
        BlockKind::Attn => s.b_att != 1.0 || s.s_att != 1.0,
        BlockKind::Mlp => s.b_mlp != 1.0 || s.s_mlp != 1.0,
    }
}

/// The cursor's block: its scores, its cost, its state.
fn cursor_line(app: &App) -> Line<'static> {
    let b = app.cursor;
    let scores = app.importance.get(&b).copied().unwrap_or_default();
    let fmt = |v: Option<f64>, signed: bool| match v {
        Some(v) if signed => format!("{v:+.4}"),
        Some(v) => format!("{v:.4}"),
        None => "…".into(),
    };
    let params = app.info.block_params(b);
    let share = params as f64 / app.info.all_block_params().max(1) as f64 * 100.0;
    let state = if app.plan().is_skipped(b) {
        "skipped"
    } else {
        "kept"
    };
    let mut text = format!(
        "{b:<7} Δloss {} infl {} │ {} params, {share:.1}% │ {state}",
        fmt(scores.delta_loss, true),
        fmt(scores.influence, false),
        fmt_count(params),
    );
    if is_scaled(app, b) {
        let s = app.plan().scales_for(b.layer);
        let (bb, ss) = match b.kind {
            BlockKind::Attn => (s.b_att, s.s_att),
            BlockKind::Mlp => (s.b_mlp, s.s_mlp),
        };
        text.push_str(&format!(" b={bb:.3} s={ss:.3}"));
    }
    Line::from(Span::styled(
        text,
        Style::default().add_modifier(Modifier::BOLD),
    ))
}

fn legend_line(metric: Metric, empty: bool) -> Line<'static> {
    let mut spans = vec![Span::raw(format!("{}: low ", metric.short()))];
    for (g, c) in GLYPHS.iter().zip(COLOURS) {
        spans.push(Span::styled(g.to_string(), Style::default().fg(c)));
    }
    spans.push(Span::raw(" high"));
    spans.push(Span::styled(
        "  ×× skipped  * scaled",
        Style::default().fg(Color::Gray),
    ));
    if empty {
        spans.push(Span::styled(
            "  ·· scoring…",
            Style::default().fg(Color::DarkGray),
        ));
    }
    Line::from(spans)
}

/// `1769472` → `1.77M`.
pub fn fmt_count(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thirty_layers_fit_one_band_at_80_columns() {
        let g = geometry(80, 30);
        assert_eq!((g.cell_w, g.bands), (2, 1));
        assert_eq!(height(80, 30), 7);
        // A deep model on a narrow screen wraps into bands.
        let g = geometry(80, 100);
        assert_eq!((g.cell_w, g.bands), (1, 2));
    }

    #[test]
    fn clicks_hit_the_cell_drawn_there() {
        let area = Rect::new(0, 1, 80, 7);
        let g = geometry(80, 30);
        for b in [BlockId::attn(0), BlockId::mlp(29), BlockId::attn(17)] {
            let r = cell_rect(area, g, b);
            assert_eq!(cell_at(area, 30, r.x + r.width - 1, r.y), Some(b));
        }
        assert_eq!(cell_at(area, 30, 2, 3), None);
    }
}
