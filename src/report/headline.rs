//! The sentences at the top of the report: what each plan on the frontier
//! buys and costs, in words a manager can repeat, and which plan the data
//! favours within a stated quality budget.

use super::frontier::pareto;
use super::Report;
use super::Row;
use super::SpeedKind;

/// "Skip 3 attention blocks and 1 MLP block (fitted scales)".
pub fn what_it_removes(r: &Row) -> String {
    if r.is_base() {
        return "The unmodified model".into();
    }
    let plural =
        |n: usize, what: &str| format!("{n} {what} block{}", if n == 1 { "" } else { "s" });
    let (a, m) = (r.attention_skipped(), r.mlp_skipped());
    let mut s = match (a, m) {
        (0, 0) => match &r.mode_summary {
            Some(mode) => return mode.clone(),
            None => "Skip nothing".to_string(),
        },
        (a, 0) => format!("Skip {}", plural(a, "attention")),
        (0, m) => format!("Skip {}", plural(m, "MLP")),
        (a, m) => format!("Skip {} and {}", plural(a, "attention"), plural(m, "MLP")),
    };
    if r.has_scales {
        s.push_str(" (fitted scales)");
    }
    if let Some(mode) = &r.mode_summary {
        s.push_str(" + ");
        s.push_str(&mode.to_lowercase());
    }
    s
}

/// The speed part of a sentence, saying so when the change is inside the
/// spread of the runs.
pub fn speed_phrase(r: &Row) -> String {
    let s = &r.decode_speedup;
    if r.is_base() {
        return "1.00× decode speed (the reference)".into();
    }
    let spread = format!("runs {:.2}–{:.2}×", s.min, s.max);
    if r.decode_within_noise() {
        format!(
            "no measurable decode speed-up ({:.2}×, {spread}, {})",
            s.median,
            r.speed_kind.label()
        )
    } else if s.median >= 1.0 {
        format!(
            "{:.2}× faster decode ({spread}, {})",
            s.median,
            r.speed_kind.label()
        )
    } else {
        format!(
            "{:.2}× slower decode ({spread}, {})",
            1.0 / s.median,
            r.speed_kind.label()
        )
    }
}

/// One sentence for one plan.
pub fn sentence(r: &Row, base_perplexity: f64) -> String {
    if r.is_base() {
        return format!(
            "The unmodified model: perplexity {:.2}, {:.1} tokens/s decode.",
            r.perplexity, r.decode_tokens_per_sec.median
        );
    }
    format!(
        "{}: {}, {:+.1}% perplexity, {:.0}% of next tokens unchanged.",
        what_it_removes(r),
        speed_phrase(r),
        r.perplexity_change_pct(base_perplexity),
        r.top1_agreement * 100.0
    )
}

/// Rows on the quality–speed frontier (decode speed-up against the
/// perplexity change, each against the unmodified model on the same
/// positions), fastest last.
pub fn frontier_rows(rows: &[Row]) -> Vec<usize> {
    let base = rows
        .iter()
        .find(|r| r.is_base())
        .map_or(f64::NAN, |r| r.perplexity);
    let pts: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| (r.decode_speedup.median, r.perplexity_change_pct(base)))
        .collect();
    pareto(&pts)
}

/// The plan the data favours: the measurably fastest plan whose perplexity
/// is within `budget_pct` of the base; the base when none is measurably faster.
pub fn favoured(rows: &[Row], base_perplexity: f64, budget_pct: f64) -> Option<usize> {
    rows.iter()
        .enumerate()
        .filter(|(_, r)| {
            // A simulated speed is not a saving anyone can deploy.
            !r.is_base()
                && r.speed_kind == SpeedKind::Executed
                && r.perplexity_change_pct(base_perplexity) <= budget_pct
                && r.decode_speedup.min > 1.0
        })
        .max_by(|a, b| {
            a.1.decode_speedup
                .median
                .total_cmp(&b.1.decode_speedup.median)
        })
        .map(|(i, _)| i)
}

/// The recommendation sentence.
pub fn recommendation(report: &Report) -> String {
    let base = report.base_perplexity();
    let budget = report.settings.quality_budget_pct;
    match favoured(&report.rows, base, budget) {
        Some(i) => {
            let r = &report.rows[i];
            format!(
                "Within a quality budget of +{budget:.0}% perplexity, the data favours \
                 “{}”: {} at {:+.1}% perplexity.",
                r.name,
                speed_phrase(r),
                r.perplexity_change_pct(base)
            )
        }
        None => format!(
            "No plan is measurably faster than the unmodified model within a quality budget of \
             +{budget:.0}% perplexity: keep the base model, or allow a larger budget."
        ),
    }
}

/// The headline: the recommendation, then one sentence per frontier plan
/// (the base first), at most `max` of them.
pub fn headline(report: &Report, max: usize) -> Vec<String> {
    let base = report.base_perplexity();
    let mut lines = vec![recommendation(report)];
    let mut idx = frontier_rows(&report.rows);
    idx.sort_by_key(|&i| !report.rows[i].is_base());
    lines.extend(
        idx.into_iter()
            .take(max)
            .map(|i| sentence(&report.rows[i], base)),
    );
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::testing::row;

    #[test]
    fn sentences_say_what_is_removed_and_whether_it_is_faster() {
        let base = row("base", "base", 0, 10.0, (1.0, 1.0, 1.0));
        assert_eq!(
            sentence(&base, 10.0),
            "The unmodified model: perplexity 10.00, 60.0 tokens/s decode."
        );
        let mut four = row("four", "Hopscotch", 4, 11.37, (1.04, 1.02, 1.07));
        four.has_scales = true;
        four.top1_agreement = 0.76;
        assert_eq!(
            sentence(&four, 10.0),
            "Skip 4 attention blocks (fitted scales): 1.04× faster decode (runs 1.02–1.07×, \
             executed), +13.7% perplexity, 76% of next tokens unchanged."
        );
        let noisy = row("noisy", "manual", 1, 10.1, (1.01, 0.97, 1.04));
        assert!(
            sentence(&noisy, 10.0).contains("no measurable decode speed-up"),
            "{}",
            sentence(&noisy, 10.0)
        );
    }

    #[test]
    fn mode_plans_say_what_they_do_against_their_own_reference() {
        let mut kv = row("kv", "KV budget", 0, 20.0, (1.2, 1.1, 1.3));
        kv.mode_summary = Some("Keep a KV budget of window:128 at a 512-token context".into());
        // Measured at its own context, against the full cache there.
        kv.reference_perplexity = Some(16.0);
        kv.top1_agreement = 0.9;
        assert_eq!(
            sentence(&kv, 10.0),
            "Keep a KV budget of window:128 at a 512-token context: 1.20× faster decode \
             (runs 1.10–1.30×, executed), +25.0% perplexity, 90% of next tokens unchanged."
        );
        let mut routed = row("r", "token routing", 2, 10.5, (1.1, 1.05, 1.2));
        routed.mode_summary = Some("Route tokens past blocks (80.0% of blocks executed)".into());
        assert_eq!(
            what_it_removes(&routed),
            "Skip 2 attention blocks + route tokens past blocks (80.0% of blocks executed)"
        );
    }

    #[test]
    fn a_simulated_speed_is_never_recommended() {
        let mut teal = row("teal", "sparsity", 0, 10.2, (1.3, 1.2, 1.4));
        teal.speed_kind = SpeedKind::Simulated;
        let rows = vec![row("base", "base", 0, 10.0, (1.0, 1.0, 1.0)), teal];
        assert_eq!(favoured(&rows, 10.0, 10.0), None);
    }

    #[test]
    fn the_favoured_plan_is_the_fastest_measurable_one_within_budget() {
        let rows = vec![
            row("base", "base", 0, 10.0, (1.0, 1.0, 1.0)),
            row("small", "Hopscotch", 2, 10.5, (1.05, 1.02, 1.08)),
            row("noisy-fast", "manual", 3, 10.6, (1.10, 0.95, 1.20)),
            row("big", "Hopscotch", 8, 14.0, (1.30, 1.25, 1.35)),
        ];
        assert_eq!(favoured(&rows, 10.0, 10.0), Some(1));
        assert_eq!(favoured(&rows, 10.0, 50.0), Some(3));
        assert_eq!(favoured(&rows, 10.0, 1.0), None);
    }
}
