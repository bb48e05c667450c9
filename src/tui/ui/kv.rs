//! The KV view: for the policy set here (`t`, `+`/`-`), a positions ×
//! layers map of the keys it keeps on the current prompt (and the base
//! model's continuation), each cell the share of KV heads that keep that
//! stretch of positions (Quest: that its last query attends to), then the
//! cache's size against the full cache and the long-context measurements
//! of this session (`L`).

use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph};
use ratatui::Frame;

use super::clip;
use super::generation::wrap;
use crate::tui::app::App;
use crate::tui::jobs::kv::{KeptMap, KvView, LongRow, LONG_CONTEXT, MAP_CHUNK};

/// Shades by share of KV heads keeping the positions (the legend says the same).
pub const SHADES: [char; 5] = [' ', '░', '▒', '▓', '█'];
/// A layer that holds no K/V (its attention is skipped).
pub const NO_KV: char = '×';
const LABEL_W: usize = 10;
/// Long-context rows shown (the newest).
const LONG_ROWS: usize = 3;

pub fn shade(share: f32) -> char {
    if share <= 0.0 {
        return '·';
    }
    let i = (share * 4.0).ceil().clamp(1.0, 4.0) as usize;
    SHADES[i]
}

pub fn draw(frame: &mut Frame, area: Rect, app: &App) {
    if area.height < 3 {
        return;
    }
    let v = &app.kv;
    let state = match (&v.pending, &v.map) {
        (Some(_), _) => " · mapping…".to_string(),
        (None, Some((_, m))) => format!(" · {} tokens", m.tokens),
        _ => String::new(),
    };
    let attached = if v.attached { " · in plan" } else { "" };
    let panel = Block::bordered().title(format!(
        " KV · {}{attached}{state} · t policy · +- budget · a attach · L long · v next view ",
        v.spec()
    ));
    let inner = panel.inner(area);
    frame.render_widget(panel, area);
    let (width, height) = (inner.width as usize, inner.height as usize);
    let long = long_lines(v, width);
    let mut lines: Vec<Line> = match &v.map {
        Some((_, map)) => {
            let room = height.saturating_sub(long.len() + 2).max(1);
            let mut l = vec![grey(clip(&legend(map), width))];
            l.extend(heat_map(map, width, room));
            l.push(grey(clip(&summary(map), width)));
            l
        }
        None => {
            let text = match (&v.pending, &v.error) {
                (Some(_), _) => "prefilling the prompt through the cache…".to_string(),
                (None, Some(e)) => format!("mapping failed: {e}"),
                (None, None) => "KV budgets: a policy keeps part of the cache (window, \
                     StreamingLLM, H2O, SnapKV evict; Quest keeps all and reads some pages \
                     per query). This view maps which keys it keeps on the prompt; L measures \
                     it at long context."
                    .to_string(),
            };
            wrap(&text, width).into_iter().map(Line::from).collect()
        }
    };
    let fill = height.saturating_sub(lines.len() + long.len());
    lines.extend(std::iter::repeat_n(Line::from(""), fill));
    lines.extend(long);
    frame.render_widget(Paragraph::new(lines), inner);
}

fn legend(map: &KeptMap) -> String {
    format!(
        "rows: positions 0–{} (chunks of {MAP_CHUNK}); columns: layers; share of KV heads \
         keeping them █ all ▓ ▒ ░ some · none × no K/V",
        map.tokens.saturating_sub(1)
    )
}

/// Positions × layers, `rows` lines at most.
fn heat_map(map: &KeptMap, width: usize, rows: usize) -> Vec<Line<'static>> {
    let n_layers = map.layers.len();
    let room = width.saturating_sub(LABEL_W);
    let layer_w = if 2 * n_layers <= room { 2 } else { 1 };
    let shown = (room / layer_w).min(n_layers);
    let buckets = rows.min(map.tokens).max(1);
    let per = map.tokens.div_ceil(buckets);
    (0..map.tokens.div_ceil(per))
        .map(|b| {
            let (lo, hi) = (b * per, ((b + 1) * per).min(map.tokens));
            let mut spans = vec![Span::styled(
                format!("{:>w$} ", format!("{lo}–{}", hi - 1), w = LABEL_W - 1),
                Style::new().fg(Color::DarkGray),
            )];
            for layer in &map.layers[..shown] {
                let (glyph, colour) = match layer {
                    None => (NO_KV, Color::DarkGray),
                    Some(s) => {
                        let mean = s[lo..hi].iter().sum::<f32>() / (hi - lo) as f32;
                        let colour = if mean > 0.0 {
                            Color::Green
                        } else {
                            Color::DarkGray
                        };
                        (shade(mean), colour)
                    }
                };
                spans.push(Span::styled(
                    glyph.to_string().repeat(layer_w),
                    Style::new().fg(colour),
                ));
            }
            Line::from(spans)
        })
        .collect()
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn summary(map: &KeptMap) -> String {
    let saved = 1.0 - map.kv_bytes as f64 / map.full_kv_bytes.max(1) as f64;
    let mut local = match map.local_layers {
        0 => String::new(),
        n => format!(" · {n} local layers keep their own window"),
    };
    if map.dense_layers > 0 {
        local.push_str(&format!(" · layers 0–{} dense", map.dense_layers - 1));
    }
    format!(
        "kept per layer and KV head: {:.1} of {} keys · KV {:.2} MiB vs {:.2} MiB full ({:+.0}%){local}",
        map.mean_kept(),
        map.tokens,
        mib(map.kv_bytes),
        mib(map.full_kv_bytes),
        -100.0 * saved
    )
}

fn long_lines(v: &KvView, width: usize) -> Vec<Line<'static>> {
    if v.long.is_empty() {
        return vec![grey(clip(
            &format!(
                "L: perplexity, KL, top-1 and attention recall of the policy against the full \
                 cache on the first {LONG_CONTEXT} tokens of the built-in text"
            ),
            width,
        ))];
    }
    let mut lines = vec![grey(clip(
        &format!("long context (first {LONG_CONTEXT} tokens of the built-in text, scored past the budget):"),
        width,
    ))];
    let from = v.long.len().saturating_sub(LONG_ROWS);
    lines.extend(
        v.long[from..]
            .iter()
            .map(|r| Line::from(clip(&long_row(r), width))),
    );
    lines
}

pub fn long_row(r: &LongRow) -> String {
    let recall = r
        .recall
        .map_or("-".into(), |x| format!("{:.1}%", 100.0 * x));
    format!(
        "{} · {} · PPL {:.2} vs {:.2} ({:+.1}%) · KL {:.4} · top-1 {:.1}% · recall {recall} · KV {:.1}/{:.1} MiB · {:.0} s",
        r.policy,
        r.plan,
        r.perplexity,
        r.full_perplexity,
        100.0 * (r.perplexity / r.full_perplexity - 1.0),
        r.kl,
        100.0 * r.top1,
        mib(r.kv_bytes),
        mib(r.full_kv_bytes),
        r.seconds
    )
}

fn grey(text: String) -> Line<'static> {
    Line::from(Span::styled(text, Style::new().fg(Color::DarkGray)))
}
