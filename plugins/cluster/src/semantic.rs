//! Splitting a failure mode by what its answers say: k-medoids over cosine distances between
//! answer embeddings, k chosen by the mean silhouette. Deterministic: no random starts.

/// A split of `n` points: each point's cluster, and each cluster's medoid (a point index).
#[derive(Debug, PartialEq)]
pub struct Split {
    pub assignment: Vec<usize>,
    pub medoids: Vec<usize>,
    pub silhouette: f64,
}

/// The best split of the points with distance matrix `d` into 2..=`max_k` clusters of at least
/// `min_size` points each, by mean silhouette; none when no split reaches `min_silhouette`.
pub fn best_split(d: &[Vec<f64>], max_k: usize, min_size: usize, min_silhouette: f64) -> Option<Split> {
    let n = d.len();
    (2..=max_k.min(n / min_size.max(1)))
        .filter_map(|k| {
            let (assignment, medoids) = k_medoids(d, k);
            let sizes: Vec<usize> = (0..k).map(|c| assignment.iter().filter(|&&a| a == c).count()).collect();
            if sizes.iter().any(|&s| s < min_size) {
                return None;
            }
            let silhouette = silhouette(d, &assignment, k);
            Some(Split { assignment, medoids, silhouette })
        })
        .filter(|s| s.silhouette >= min_silhouette)
        // Ties go to the smaller k (found first).
        .fold(None, |best: Option<Split>, s| match &best {
            Some(b) if b.silhouette >= s.silhouette => best,
            _ => Some(s),
        })
}

/// k-medoids (alternating assignment and medoid update), started from the most central point
/// and then each point farthest from the medoids chosen so far.
fn k_medoids(d: &[Vec<f64>], k: usize) -> (Vec<usize>, Vec<usize>) {
    let n = d.len();
    let total = |i: usize| d[i].iter().sum::<f64>();
    let mut medoids = vec![(0..n).min_by(|&a, &b| total(a).total_cmp(&total(b))).expect("points")];
    while medoids.len() < k {
        let far = (0..n)
            .filter(|i| !medoids.contains(i))
            .max_by(|&a, &b| {
                let near = |i: usize| medoids.iter().map(|&m| d[i][m]).fold(f64::INFINITY, f64::min);
                near(a).total_cmp(&near(b)).then(b.cmp(&a))
            })
            .expect("k ≤ n");
        medoids.push(far);
    }
    let assign = |medoids: &[usize]| -> Vec<usize> {
        (0..n).map(|i| (0..medoids.len()).min_by(|&a, &b| d[i][medoids[a]].total_cmp(&d[i][medoids[b]])).expect("k ≥ 1")).collect()
    };
    let mut assignment = assign(&medoids);
    for _ in 0..50 {
        let next: Vec<usize> = (0..k)
            .map(|c| {
                let members: Vec<usize> = (0..n).filter(|&i| assignment[i] == c).collect();
                members
                    .iter()
                    .copied()
                    .min_by(|&a, &b| {
                        let cost = |m: usize| members.iter().map(|&i| d[i][m]).sum::<f64>();
                        cost(a).total_cmp(&cost(b)).then(a.cmp(&b))
                    })
                    .unwrap_or(medoids[c])
            })
            .collect();
        if next == medoids {
            break;
        }
        medoids = next;
        assignment = assign(&medoids);
    }
    (assignment, medoids)
}

/// Mean silhouette: for each point, (b − a) / max(a, b), with a its mean distance to its own
/// cluster and b to the nearest other cluster (0 for a point alone in its cluster).
fn silhouette(d: &[Vec<f64>], assignment: &[usize], k: usize) -> f64 {
    let n = d.len();
    let mean_to = |i: usize, c: usize| {
        let others: Vec<f64> = (0..n).filter(|&j| j != i && assignment[j] == c).map(|j| d[i][j]).collect();
        (!others.is_empty()).then(|| others.iter().sum::<f64>() / others.len() as f64)
    };
    let s: f64 = (0..n)
        .map(|i| {
            let Some(a) = mean_to(i, assignment[i]) else { return 0.0 };
            let b = (0..k).filter(|&c| c != assignment[i]).filter_map(|c| mean_to(i, c)).fold(f64::INFINITY, f64::min);
            if b.is_finite() && a.max(b) > 0.0 { (b - a) / a.max(b) } else { 0.0 }
        })
        .sum();
    s / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn distances(points: &[(f64, f64)]) -> Vec<Vec<f64>> {
        points.iter().map(|a| points.iter().map(|b| ((a.0 - b.0).powi(2) + (a.1 - b.1).powi(2)).sqrt()).collect()).collect()
    }

    #[test]
    fn finds_the_clusters_that_are_there() {
        // Three tight groups of three.
        let pts = [(0.0, 0.0), (0.1, 0.0), (0.0, 0.1), (5.0, 5.0), (5.1, 5.0), (5.0, 5.1), (0.0, 5.0), (0.1, 5.0), (0.0, 5.1)];
        let s = best_split(&distances(&pts), 4, 2, 0.1).unwrap();
        assert_eq!(s.medoids.len(), 3);
        assert!(s.silhouette > 0.9, "{}", s.silhouette);
        for g in 0..3 {
            assert!(s.assignment[3 * g..3 * g + 3].iter().all(|&a| a == s.assignment[3 * g]));
        }
        assert_eq!(s, best_split(&distances(&pts), 4, 2, 0.1).unwrap(), "deterministic");
        // Too small clusters are not allowed, and one blob is left whole.
        assert!(best_split(&distances(&pts), 4, 4, 0.1).is_none());
        let blob = [(0.0, 0.0), (0.1, 0.0), (0.0, 0.1), (0.1, 0.1), (0.05, 0.05), (0.02, 0.08)];
        assert!(best_split(&distances(&blob), 3, 2, 0.5).is_none());
    }
}
