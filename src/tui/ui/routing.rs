//! The routing view: for the routed plan the workbench has open, a
//! tokens × blocks heat map of its routers' decisions on the current prompt
//! (rows: the prompt's tokens as text, then the base model's continuation;
//! columns: each layer's attention and MLP block), each token's share of
//! blocks run, and the compute realised, measured as `eval --json`'s
//! `executed_fraction`. Without a routed plan it says how to get one.

use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph};
use ratatui::Frame;

use super::clip;
use super::generation::wrap;
use crate::model::routing::{KvPolicy, RouteOn};
use crate::plan::BlockId;
use crate::tui::app::App;
use crate::tui::jobs::routing::{Cell, RoutedTokens, RoutingState, HOW_TO_ROUTE};

/// Glyphs of the heat map (the legend says the same).
pub const RAN: char = '█';
pub const SKIPPED: char = '·';
pub const STATIC: char = '×';
pub const UNROUTED: char = '▒';

/// The share column at the right of each row (` 87%`).
const SHARE_W: usize = 5;
const MIN_LABEL_W: usize = 8;
const MAX_LABEL_W: usize = 24;

/// How the heat map fits a width: columns per layer (attn, mlp and a gap
/// when there is room), layers shown, and the token label's width.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    pub layer_w: usize,
    pub layers: usize,
    pub label_w: usize,
}

pub fn geometry(width: usize, n_layers: usize) -> Geometry {
    let room = width.saturating_sub(MIN_LABEL_W + SHARE_W);
    let layer_w = if 3 * n_layers <= room { 3 } else { 2 };
    let layers = (room / layer_w).min(n_layers);
    let label_w = (width - SHARE_W - layers * layer_w).min(MAX_LABEL_W);
    Geometry {
        layer_w,
        layers,
        label_w,
    }
}

/// The column (from the panel's inner left edge) of a block's cell.
pub fn cell_column(g: Geometry, block: BlockId) -> usize {
    g.label_w + block.layer * g.layer_w + usize::from(block.kind == crate::plan::BlockKind::Mlp)
}

pub fn draw(frame: &mut Frame, area: Rect, app: &App) {
    if area.height < 3 {
        return;
    }
    let Some(r) = &app.routing else {
        let panel = Block::bordered().title(" routing · no routed plan · v next view ");
        let inner = panel.inner(area);
        frame.render_widget(panel, area);
        frame.render_widget(Paragraph::new(how_to(inner.width as usize)), inner);
        return;
    };
    let file = r.path.file_name().map_or_else(
        || r.path.display().to_string(),
        |f| f.to_string_lossy().into(),
    );
    let state = match (&r.pending, &r.tokens) {
        (Some(_), _) => " · routing…".to_string(),
        (None, Some(t)) => format!(" · {} tokens", t.pieces.len()),
        (None, None) => String::new(),
    };
    let panel = Block::bordered().title(format!(
        " routing · {file}{state} · [ ] tokens · r route again · v next view "
    ));
    let inner = panel.inner(area);
    frame.render_widget(panel, area);
    let width = inner.width as usize;
    let lines = match &r.tokens {
        Some(t) => heat_map(app, r, t, width, inner.height as usize),
        None => {
            let text = match (&r.pending, &r.error) {
                (Some(_), _) => "routing the prompt through the routers…".to_string(),
                (None, Some(e)) => format!("routing failed: {e}"),
                (None, None) => "r routes the prompt through the routers".to_string(),
            };
            let mut lines: Vec<Line> = wrap(&text, width).into_iter().map(Line::from).collect();
            lines.extend(footer_settings(r, width).into_iter().map(grey));
            lines
        }
    };
    frame.render_widget(Paragraph::new(lines), inner);
}

/// What the view says without a routed plan: what routing is and how to get one.
fn how_to(width: usize) -> Vec<Line<'static>> {
    let mut lines: Vec<Line> = wrap(
        "No routed plan is open. Token routing: a small trained router per block decides, \
         per token, whether the block runs; this view shows which tokens skip which blocks \
         on the current prompt, and the compute they realise.",
        width,
    )
    .into_iter()
    .map(Line::from)
    .collect();
    lines.push(Line::from(""));
    lines.push(Line::from(Span::styled(
        format!("  {HOW_TO_ROUTE}"),
        Style::new().fg(Color::Yellow),
    )));
    lines.push(Line::from(""));
    lines.extend(
        wrap(
            "then o opens routed.json here (or start with scalpel tui --plan routed.json); \
             --base-plan P routes on top of a skip plan.",
            width,
        )
        .into_iter()
        .map(Line::from),
    );
    lines
}

fn grey(text: String) -> Line<'static> {
    Line::from(Span::styled(text, Style::new().fg(Color::Gray)))
}

fn heat_map(
    app: &App,
    r: &RoutingState,
    t: &RoutedTokens,
    width: usize,
    height: usize,
) -> Vec<Line<'static>> {
    let g = geometry(width, app.info.n_layers);
    let foot = footer(r, t, g, width);
    let rows = height.saturating_sub(1 + foot.len()).max(1);
    let n = t.pieces.len();
    let first = r.scroll.min(n.saturating_sub(rows));
    let mut lines = vec![header(g)];
    for token in first..(first + rows).min(n) {
        lines.push(token_row(t, token, g));
    }
    let gap = height.saturating_sub(lines.len() + foot.len());
    lines.extend((0..gap).map(|_| Line::from("")));
    let shown = format!(
        "rows {}–{}/{n} (prompt {} + gen {})",
        first + 1,
        (first + rows).min(n),
        t.prompt_tokens,
        n - t.prompt_tokens
    );
    let mut foot = foot;
    if let Some(last) = foot.last_mut() {
        *last = clip(&format!("{last} · {shown}"), width);
    }
    lines.extend(foot.into_iter().map(grey));
    lines
}

/// Layer numbers every five layers over their attention cell.
fn header(g: Geometry) -> Line<'static> {
    let mut text: Vec<char> = format!("{:<w$}", "token", w = g.label_w).chars().collect();
    text.resize(g.label_w + g.layers * g.layer_w + SHARE_W, ' ');
    for layer in (0..g.layers).step_by(5) {
        let at = g.label_w + layer * g.layer_w;
        for (i, c) in layer.to_string().chars().enumerate() {
            if at + i < text.len() - SHARE_W {
                text[at + i] = c;
            }
        }
    }
    let share_at = text.len() - SHARE_W;
    for (i, c) in "  run".chars().enumerate() {
        text[share_at + i] = c;
    }
    Line::from(Span::styled(
        text.into_iter().collect::<String>(),
        Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD),
    ))
}

/// A token piece as one line of text: newlines and tabs made visible.
fn visible(piece: &str) -> String {
    piece
        .replace('\n', "⏎")
        .replace('\t', "⇥")
        .replace(' ', "␣")
}

fn token_row(t: &RoutedTokens, token: usize, g: Geometry) -> Line<'static> {
    let label = clip(
        &format!("{:>3} {}", token + 1, visible(&t.pieces[token])),
        g.label_w.saturating_sub(1),
    );
    let generated = token >= t.prompt_tokens;
    let label_style = match generated {
        true => Style::new().fg(Color::Yellow),
        false => Style::new(),
    };
    let mut spans = vec![Span::styled(
        format!("{label:<w$}", w = g.label_w),
        label_style,
    )];
    for layer in 0..g.layers {
        for block in [BlockId::attn(layer), BlockId::mlp(layer)] {
            let (c, style) = glyph(t.decisions.get(token, block), block);
            spans.push(Span::styled(c.to_string(), style));
        }
        if g.layer_w == 3 {
            spans.push(Span::raw(" "));
        }
    }
    spans.push(Span::raw(format!(
        "{:>4.0}%",
        t.decisions.token_share(token) * 100.0
    )));
    Line::from(spans)
}

fn glyph(cell: Cell, block: BlockId) -> (char, Style) {
    let ran = match block.kind {
        crate::plan::BlockKind::Attn => Color::Green,
        crate::plan::BlockKind::Mlp => Color::Cyan,
    };
    match cell {
        Cell::Ran => (RAN, Style::new().fg(ran)),
        Cell::Skipped => (SKIPPED, Style::new().fg(Color::DarkGray)),
        Cell::Static => (STATIC, Style::new().fg(Color::LightRed)),
        Cell::Unrouted => (UNROUTED, Style::new().fg(Color::Gray)),
    }
}

/// How the routers decide: capacity, blocks, K/V policy, threshold.
fn footer_settings(r: &RoutingState, width: usize) -> Vec<String> {
    let s = &r.section;
    let on = match s.on {
        RouteOn::Attn => "attention",
        RouteOn::Mlp => "MLP",
        RouteOn::Both => "attention + MLP",
    };
    let kv = match s.kv {
        KvPolicy::Write => "a skipped token writes K/V",
        KvPolicy::Gap => "a skipped token leaves a K/V gap",
    };
    let base = match r.plan.skip.is_empty() {
        true => String::new(),
        false => format!(" · over {}", r.plan.describe()),
    };
    vec![clip(
        &format!(
            "{on} routed, capacity {:.2}, threshold {:.3}, {kv}{base}",
            s.capacity, s.threshold
        ),
        width,
    )]
}

/// The realised compute, the settings and the legend.
fn footer(r: &RoutingState, t: &RoutedTokens, g: Geometry, width: usize) -> Vec<String> {
    let d = &t.decisions;
    let mut out = wrap(
        &format!(
            "executed {:.1}% of blocks per token (measured, as eval's executed_fraction) · \
             routed blocks run {:.1}%",
            d.executed_fraction * 100.0,
            d.routed_share * 100.0
        ),
        width,
    );
    out.extend(footer_settings(r, width));
    let mut legend = format!("{RAN} ran {SKIPPED} skipped {STATIC} plan {UNROUTED} no router");
    if g.layers < d.cells.first().map_or(0, |c| c.len() / 2) {
        legend.push_str(&format!(" · layers 0–{} shown", g.layers - 1));
    }
    out.push(legend);
    out
}
