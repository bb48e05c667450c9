//! The report's charts, drawn with plotters' SVG backend into strings.

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::Row;

/// One scatter chart: a point per plan, labelled with its name.
pub struct Scatter<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub x: fn(&Row) -> f64,
    pub y: fn(&Row) -> f64,
}

/// The three trade-off charts, as (file stem, caption, SVG text).
pub fn all(rows: &[Row]) -> Result<Vec<(&'static str, &'static str, String)>> {
    let blocks = |r: &Row| r.skipped.len() as f64;
    let charts = [
        (
            "quality-vs-blocks",
            "What each plan costs in quality: perplexity on the held-out text against the number \
             of blocks it skips.",
            Scatter {
                title: "Perplexity vs blocks skipped",
                x_label: "blocks skipped",
                y_label: "perplexity (lower is better)",
                x: blocks,
                y: |r| r.perplexity,
            },
        ),
        (
            "speed-vs-blocks",
            "What each plan buys: decode speed relative to the base model, timed in the same run.",
            Scatter {
                title: "Decode speed-up vs blocks skipped",
                x_label: "blocks skipped",
                y_label: "decode speed-up vs base (×)",
                x: blocks,
                y: |r| r.decode_speedup,
            },
        ),
        (
            "quality-vs-speed",
            "The trade-off itself: plans toward the lower right are faster and better.",
            Scatter {
                title: "Perplexity vs decode speed",
                x_label: "decode tokens/s",
                y_label: "perplexity (lower is better)",
                x: |r| r.decode_tokens_per_sec,
                y: |r| r.perplexity,
            },
        ),
    ];
    charts
        .into_iter()
        .map(|(stem, caption, c)| Ok((stem, caption, scatter(rows, &c)?)))
        .collect()
}

/// A padded axis range that always has some width.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.12).max(hi.abs() * 0.02).max(0.5);
    (lo - pad, hi + pad)
}

pub fn scatter(rows: &[Row], c: &Scatter) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (640, 420)).into_drawing_area();
        let err = |e: &dyn std::fmt::Display| anyhow!("drawing `{}`: {e}", c.title);
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (x0, x1) = range(rows.iter().map(c.x));
        let (y0, y1) = range(rows.iter().map(c.y));
        let mut chart = ChartBuilder::on(&root)
            .caption(c.title, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(c.x_label)
            .y_desc(c.y_label)
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|e| err(&e))?;
        let points: Vec<(f64, f64, &str)> = rows
            .iter()
            .map(|r| ((c.x)(r), (c.y)(r), r.name.as_str()))
            .collect();
        chart
            .draw_series(
                points
                    .iter()
                    .map(|(x, y, _)| Circle::new((*x, *y), 5, RGBColor(31, 119, 180).filled())),
            )
            .map_err(|e| err(&e))?;
        chart
            .draw_series(points.iter().map(|(x, y, name)| {
                Text::new(name.to_string(), (*x, *y), ("sans-serif", 13).into_font())
            }))
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, skipped: usize, ppl: f64, speed: f64) -> Row {
        Row {
            name: name.into(),
            skipped: (0..skipped).map(|i| format!("attn.{i}")).collect(),
            has_scales: false,
            perplexity: ppl,
            kl_to_base: 0.0,
            top1_agreement: 1.0,
            prefill_tokens_per_sec: speed,
            decode_tokens_per_sec: speed,
            prefill_speedup: speed / 100.0,
            decode_speedup: speed / 100.0,
        }
    }

    #[test]
    fn charts_are_svg_with_a_point_and_label_per_plan() {
        let rows = vec![row("base", 0, 10.0, 100.0), row("four<&>", 4, 11.0, 110.0)];
        let charts = all(&rows).unwrap();
        assert_eq!(charts.len(), 3);
        for (_, _, svg) in charts {
            assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
            assert_eq!(svg.matches("<circle").count(), 2, "{svg}");
            assert!(
                svg.contains("four&lt;&amp;&gt;") || svg.contains("four"),
                "{svg}"
            );
        }
    }

    #[test]
    fn a_single_point_still_gets_an_axis_range() {
        let (lo, hi) = range([3.0].into_iter());
        assert!(lo < 3.0 && hi > 3.0);
    }
}
