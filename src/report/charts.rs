//! The report's charts, drawn with plotters' SVG backend into strings: the
//! quality–speed plane with its Pareto frontier and the runs' spread as
//! error bars, and quality and speed against the blocks removed, one colour
//! per method throughout.

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::frontier::pareto;
use super::{Row, SpeedKind};

const WIDTH: u32 = 720;
const HEIGHT: u32 = 460;

/// Colours by method, the same in every chart (colour-blind-safe palette).
const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),   // blue
    RGBColor(230, 159, 0),   // orange
    RGBColor(0, 158, 115),   // green
    RGBColor(204, 121, 167), // purple
    RGBColor(213, 94, 0),    // vermilion
    RGBColor(86, 180, 233),  // sky
    RGBColor(181, 160, 0),   // dark yellow
    RGBColor(120, 72, 150),  // violet
];
const BASE_COLOUR: RGBColor = RGBColor(60, 60, 60);

/// The methods in the order they first appear, the base first.
pub fn methods(rows: &[Row]) -> Vec<String> {
    let mut m: Vec<String> = Vec::new();
    for r in rows {
        if !m.contains(&r.method) {
            m.push(r.method.clone());
        }
    }
    m.sort_by_key(|x| x != "base");
    m
}

fn colour(methods: &[String], method: &str) -> RGBColor {
    if method == "base" {
        return BASE_COLOUR;
    }
    let i = methods
        .iter()
        .filter(|m| *m != "base")
        .position(|m| m == method)
        .unwrap_or(0);
    PALETTE[i % PALETTE.len()]
}

/// A padded axis range that always has some width.
fn range(values: impl Iterator<Item = f64>, min_pad: f64) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.12).max(min_pad);
    (lo - pad, hi + pad)
}

fn ppl_change(r: &Row, base: f64) -> f64 {
    r.perplexity_change_pct(base)
}

/// The three charts, as (file stem, caption, SVG text).
pub fn all(rows: &[Row]) -> Result<Vec<(&'static str, String, String)>> {
    let base = rows
        .iter()
        .find(|r| r.is_base())
        .map_or(f64::NAN, |r| r.perplexity);
    Ok(vec![
        (
            "quality-vs-speed",
            "The trade-off: decode speed-up against the perplexity it costs, each against the \
             unmodified model on the same path and positions. Plans on the line (the Pareto \
             frontier) are the ones no other plan beats on both; bars show the spread of the \
             interleaved runs; hollow points are simulated speeds."
                .to_string(),
            quality_vs_speed(rows, base)?,
        ),
        (
            "quality-vs-blocks",
            "What removing blocks costs in quality, per method (routed and sparse plans at the \
             compute they leave out, in blocks; KV budgets remove none)."
                .to_string(),
            by_blocks(
                rows,
                "Perplexity change vs blocks removed",
                "perplexity change vs base (%, lower is better)",
                |r| (ppl_change(r, base), None),
            )?,
        ),
        (
            "speed-vs-blocks",
            "What removing blocks buys in decode speed, with the spread of the runs. Filled \
             points are executed (the removed work is not computed), hollow ones simulated."
                .to_string(),
            by_blocks(
                rows,
                "Decode speed-up vs blocks removed",
                "decode speed-up vs base (×)",
                |r| {
                    (
                        r.decode_speedup.median,
                        Some((r.decode_speedup.min, r.decode_speedup.max)),
                    )
                },
            )?,
        ),
    ])
}

fn err(title: &str) -> impl Fn(&dyn std::fmt::Display) -> anyhow::Error + '_ {
    move |e| anyhow!("drawing `{title}`: {e}")
}

/// Decode speed-up (x, with error bars) against perplexity change (y),
/// the frontier drawn through its points.
pub fn quality_vs_speed(rows: &[Row], base: f64) -> Result<String> {
    let title = "Perplexity change vs decode speed-up";
    let e = err(title);
    let methods = methods(rows);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let (x0, x1) = range(
            rows.iter()
                .flat_map(|r| [r.decode_speedup.min, r.decode_speedup.max]),
            0.03,
        );
        let (y0, y1) = range(rows.iter().map(|r| ppl_change(r, base)), 1.0);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("decode speed-up vs base (×, higher is better)")
            .y_desc("perplexity change (%, lower is better)")
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|x| e(&x))?;
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .map(|r| (r.decode_speedup.median, ppl_change(r, base)))
            .collect();
        let front: Vec<(f64, f64)> = pareto(&pts).into_iter().map(|i| pts[i]).collect();
        chart
            .draw_series(LineSeries::new(
                front,
                RGBColor(150, 150, 150).stroke_width(2),
            ))
            .map_err(|x| e(&x))?
            .label("Pareto frontier")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RGBColor(150, 150, 150)));
        for r in rows {
            let c = colour(&methods, &r.method);
            let y = ppl_change(r, base);
            chart
                .draw_series(std::iter::once(PathElement::new(
                    [(r.decode_speedup.min, y), (r.decode_speedup.max, y)],
                    c.stroke_width(2),
                )))
                .map_err(|x| e(&x))?;
        }
        draw_points(&mut chart, rows, &methods, |r| {
            (r.decode_speedup.median, ppl_change(r, base))
        })
        .map_err(|x| e(&x))?;
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|x| e(&x))?;
        root.present().map_err(|x| e(&x))?;
    }
    Ok(svg)
}

type Chart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// A labelled point per plan, one legend entry per method.
fn draw_points(
    chart: &mut Chart,
    rows: &[Row],
    methods: &[String],
    at: impl Fn(&Row) -> (f64, f64),
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    for m in methods {
        let c = colour(methods, m);
        let mine: Vec<&Row> = rows.iter().filter(|r| &r.method == m).collect();
        // Simulated speeds are hollow: no work was saved for real.
        chart
            .draw_series(mine.iter().map(|r| {
                let style = match r.speed_kind {
                    SpeedKind::Executed => c.filled(),
                    SpeedKind::Simulated => c.stroke_width(2),
                };
                Circle::new(at(r), 5, style)
            }))?
            .label(m.clone())
            .legend(move |(x, y)| Circle::new((x + 8, y), 5, c.filled()));
        chart.draw_series(mine.iter().map(|r| {
            let (x, y) = at(r);
            Text::new(
                format!(" {}", r.name),
                (x, y),
                ("sans-serif", 13).into_font(),
            )
        }))?;
    }
    Ok(())
}

/// A value per plan (with an optional spread) against the blocks it
/// removes. Points are not joined: plans of one method need not be steps
/// of one sequence.
fn by_blocks(
    rows: &[Row],
    title: &str,
    y_label: &str,
    value: impl Fn(&Row) -> (f64, Option<(f64, f64)>),
) -> Result<String> {
    let e = err(title);
    let methods = methods(rows);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let (x0, x1) = range(rows.iter().map(|r| r.blocks_removed), 0.5);
        let (y0, y1) = range(
            rows.iter().flat_map(|r| {
                let (v, s) = value(r);
                let (lo, hi) = s.unwrap_or((v, v));
                [v, lo, hi]
            }),
            0.03,
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("blocks removed (or their compute, in blocks)")
            .y_desc(y_label)
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|x| e(&x))?;
        for r in rows {
            if let (_, Some((lo, hi))) = value(r) {
                let x = r.blocks_removed;
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        [(x, lo), (x, hi)],
                        colour(&methods, &r.method).stroke_width(2),
                    )))
                    .map_err(|x| e(&x))?;
            }
        }
        draw_points(&mut chart, rows, &methods, |r| {
            (r.blocks_removed, value(r).0)
        })
        .map_err(|x| e(&x))?;
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|x| e(&x))?;
        root.present().map_err(|x| e(&x))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::testing::row;

    #[test]
    fn charts_are_svg_with_a_point_and_label_per_plan() {
        let rows = vec![
            row("base", "base", 0, 10.0, (1.0, 1.0, 1.0)),
            row("four<&>", "Hopscotch", 4, 11.0, (1.1, 1.05, 1.12)),
            row("two", "manual", 2, 10.4, (1.02, 0.99, 1.04)),
        ];
        let charts = all(&rows).unwrap();
        assert_eq!(charts.len(), 3);
        for (_, _, svg) in charts {
            assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
            // A point per plan plus one legend marker per method.
            assert_eq!(svg.matches("<circle").count(), 3 + 3, "{svg}");
            assert!(svg.contains("four&lt;&amp;&gt;"), "{svg}");
            for m in ["base", "Hopscotch", "manual"] {
                assert!(svg.contains(m), "legend names {m}");
            }
        }
    }

    #[test]
    fn each_method_keeps_its_colour_and_the_base_is_grey() {
        let ms = vec!["base".to_string(), "Hopscotch".into(), "manual".into()];
        assert_eq!(colour(&ms, "base"), BASE_COLOUR);
        assert_eq!(colour(&ms, "Hopscotch"), PALETTE[0]);
        assert_eq!(colour(&ms, "manual"), PALETTE[1]);
    }

    #[test]
    fn every_mode_gets_its_own_colour_and_simulated_points_are_hollow() {
        let methods = [
            "Hopscotch search",
            "by hand",
            "KV budget",
            "sparsity",
            "token routing",
            "healed",
            "replaced",
            "fitted by hand",
        ];
        let mut rows = vec![row("base", "base", 0, 10.0, (1.0, 1.0, 1.0))];
        for (i, m) in methods.iter().enumerate() {
            rows.push(row(&format!("p{i}"), m, 1, 10.5, (1.01, 1.0, 1.02)));
        }
        rows[4].speed_kind = SpeedKind::Simulated;
        let ms = super::methods(&rows);
        let colours: Vec<RGBColor> = methods.iter().map(|m| colour(&ms, m)).collect();
        for (i, a) in colours.iter().enumerate() {
            assert!(
                colours[i + 1..].iter().all(|b| b != a),
                "{} shares its colour",
                methods[i]
            );
        }
        let svg = quality_vs_speed(&rows, 10.0).unwrap();
        let hollow = svg
            .split("<circle")
            .skip(1)
            .filter(|c| c.split("/>").next().unwrap().contains("fill=\"none\""))
            .count();
        assert_eq!(hollow, 1, "one simulated point");
    }

    #[test]
    fn a_single_point_still_gets_an_axis_range() {
        let (lo, hi) = range([3.0].into_iter(), 0.5);
        assert!(lo < 3.0 && hi > 3.0);
    }
}
