//! The Pareto frontier of the quality–speed plane: the plans no other plan
//! beats on both speed and quality at once.

/// Indices of the points on the frontier, by increasing speed. A point is
/// on it when no other point is at least as fast and at least as good
/// (lower `loss`) and strictly better on one of the two. Non-finite points
/// are never on it.
pub fn pareto(points: &[(f64, f64)]) -> Vec<usize> {
    let finite = |&(s, l): &(f64, f64)| s.is_finite() && l.is_finite();
    let mut on: Vec<usize> = (0..points.len())
        .filter(|&i| finite(&points[i]))
        .filter(|&i| {
            let (si, li) = points[i];
            !points.iter().enumerate().any(|(j, p)| {
                j != i && finite(p) && p.0 >= si && p.1 <= li && (p.0 > si || p.1 < li)
            })
        })
        .collect();
    on.sort_by(|&a, &b| points[a].0.total_cmp(&points[b].0).then(a.cmp(&b)));
    on
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frontier_of_a_hand_made_set() {
        // (speed-up, perplexity)
        let pts = [
            (1.00, 10.0), // 0 base: best quality
            (1.05, 10.5), // 1 on
            (1.04, 11.0), // 2 dominated by 1
            (1.20, 12.0), // 3 on
            (1.20, 13.0), // 4 dominated by 3 (same speed, worse)
            (0.98, 10.2), // 5 dominated by 0
            (1.50, 20.0), // 6 on: fastest
            (f64::NAN, 1.0),
        ];
        assert_eq!(pareto(&pts), vec![0, 1, 3, 6]);
    }

    #[test]
    fn ties_and_edge_cases() {
        assert!(pareto(&[]).is_empty());
        assert_eq!(pareto(&[(1.0, 5.0)]), vec![0]);
        // Two identical points: neither strictly beats the other.
        assert_eq!(pareto(&[(1.0, 5.0), (1.0, 5.0)]), vec![0, 1]);
    }
}
