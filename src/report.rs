//! The run report: `report.html` (self-contained: inline CSS and SVG, no script, no network) and
//! `report.md` (for a pull-request comment), written into the store after every run.
//!
//! It reads the run's artifacts by type, whichever kind of stage produced them: the decision, the
//! judgement of every iteration, the failure modes of the last one, and every revised prompt
//! (`revise`'s output, fed back as a prompt) with its diff.

use std::fmt::Write as _;
use std::path::PathBuf;

use artifacts::{Capacity, Clusters, Decision, DecisionRow, Estimate, Judgement, Prompt, Split, main_figure};
use engine::{Pipeline, RunReport, Store};

use crate::found::artifact;

/// What the report shows, gathered from the store.
struct Facts {
    title: String,
    description: String,
    stop: String,
    decision: Option<Decision>,
    /// Per iteration: (iteration, metric name, value, CI).
    quality: Vec<(u32, String, f64, Option<(f64, f64)>)>,
    clusters: Option<Clusters>,
    /// The latest measured max load, if a `capacity` stage ran.
    capacity: Option<Capacity>,
    /// Structured answers (a judge reading JSON), last iteration: per candidate, its reported split
    /// and each field's (path, rule, accuracy).
    fields: Vec<(String, Split, Vec<(String, String, Estimate)>)>,
    /// (version, diff).
    diffs: Vec<(u64, String)>,
}

/// Write `report.html` and `report.md` under `<store>/reports/<pipeline>/`; returns the HTML path.
pub fn write(pipeline: &Pipeline, report: &RunReport, store: &Store, stop: &str) -> std::io::Result<PathBuf> {
    let facts = gather(pipeline, report, store, stop);
    let dir = store.root().join("reports").join(&pipeline.name);
    std::fs::create_dir_all(&dir)?;
    let html = dir.join("report.html");
    engine::atomic::write(&html, render_html(&facts).as_bytes())?;
    engine::atomic::write(&dir.join("report.md"), render_markdown(&facts).as_bytes())?;
    Ok(html)
}

fn gather(pipeline: &Pipeline, report: &RunReport, store: &Store, stop: &str) -> Facts {
    let last = report.iterations.last();
    let mut quality = Vec::new();
    let mut diffs = Vec::new();
    for it in &report.iterations {
        if let Some((_, j)) = artifact::<Judgement>(it, store)
            && let Some((name, v, ci)) = main_figure(|k| j.metrics.get(k).copied().flatten())
        {
            quality.push((it.iteration + 1, name.to_string(), v, ci));
        }
        // The prompt judged in this iteration: the first of its prompts (the revision comes after).
        if let Some((_, p)) = artifact::<Prompt>(it, store)
            && let Some(diff) = crate::output::prompt_diff(&p)
        {
            diffs.push((p.revision.as_ref().map_or(0, |r| r.version), diff));
        }
    }
    Facts {
        title: pipeline.name.clone(),
        description: pipeline.description.clone().unwrap_or_default(),
        stop: stop.to_string(),
        decision: last.and_then(|it| artifact(it, store)).map(|(_, d)| d),
        quality,
        clusters: last.and_then(|it| artifact(it, store)).map(|(_, c)| c),
        capacity: report.iterations.iter().rev().find_map(|it| artifact(it, store)).map(|(_, c)| c),
        fields: last.and_then(|it| artifact::<Judgement>(it, store)).map_or_else(Vec::new, |(_, j)| field_scores(&j)),
        diffs,
    }
}

/// Each candidate's per-field accuracy on its reported split, where answers were read as JSON.
fn field_scores(j: &Judgement) -> Vec<(String, Split, Vec<(String, String, Estimate)>)> {
    j.models
        .iter()
        .filter_map(|(model, m)| {
            let (split, s) = m.reported()?;
            let fields = s.fields.as_ref()?.iter().map(|(path, f)| (path.clone(), f.rule.clone(), f.accuracy)).collect();
            Some((model.clone(), split, fields))
        })
        .collect()
}

/// A figure with its interval, as the tables write it.
fn with_interval(e: &Estimate) -> String {
    match e.ci95 {
        Some([lo, hi]) => format!("{:.3} [{lo:.3}, {hi:.3}]", e.value),
        None => format!("{:.3}", e.value),
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn num(v: Option<f64>) -> String {
    match v {
        Some(x) if x.fract() == 0.0 && x.abs() < 1e9 => format!("{x:.0}"),
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.3}").trim_end_matches('0').trim_end_matches('.').to_string(),
        None => "–".into(),
    }
}

/// The candidate table's rows, as the guide compares configurations — hardware · max load ·
/// quality · $ — then size, license, offline latency, throughput and the verdict.
fn candidate_rows(decision: &Decision) -> Vec<[String; 10]> {
    decision
        .candidates
        .iter()
        .filter(|c| c.split.is_some())
        .map(|c| {
            let quality = quality_of(c).map_or("–".to_string(), |(name, value, ci)| {
                format!("{name} {value:.3}{}", ci.map_or(String::new(), |(l, h)| format!(" [{l:.3}, {h:.3}]")))
            });
            let t = |k: &str| c.timing.as_ref().and_then(|t| t.get(k).copied());
            // A fine-tuned model names its lineage (its verdict carries the gain over its base).
            let model = match &c.base {
                Some(base) => format!("{} (fine-tuned from {base})", c.model),
                None => c.model.clone(),
            };
            let machine = c.serving.as_ref().map_or("–".to_string(), |s| format!("{} ({})", s.machine, s.hardware));
            let cost = match t("usd_per_mtok_at_max_rps") {
                Some(at) => format!("{} (batch) · {} at max load", num(t("usd_per_mtok")), num(Some(at))),
                None => num(t("usd_per_mtok")),
            };
            [
                model,
                machine,
                num(t("max_rps")),
                quality,
                cost,
                format!("{} / {}", num(Some(c.params_active_b)), num(Some(c.params_total_b))),
                c.license.clone(),
                format!("{} / {}", num(t("latency_p50_ms")), num(t("latency_p95_ms"))),
                num(t("tokens_per_s")),
                c.verdict.clone(),
            ]
        })
        .collect()
}

/// The models a policy kept out (they were never measured): model, size, license, why.
fn excluded_rows(decision: &Decision) -> Vec<[String; 4]> {
    decision
        .candidates
        .iter()
        .filter(|c| c.split.is_none())
        .map(|c| {
            let why = c.verdict.strip_prefix("excluded by policy: ").unwrap_or(&c.verdict);
            [c.model.clone(), format!("{} / {}", num(Some(c.params_active_b)), num(Some(c.params_total_b))), c.license.clone(), why.to_string()]
        })
        .collect()
}

const EXCLUDED_HEADERS: [&str; 4] = ["model", "params active / total (B)", "license", "why excluded"];

const HEADERS: [&str; 10] = ["model", "machine (hardware)", "max load (req/s within the SLO)", "held-out quality [95% CI]", "$ / 1M tokens", "params active / total (B)", "license", "latency p50 / p95 (ms, offline batch)", "tokens/s", "verdict"];

/// A point on a plot: label, x, y, and a vertical interval.
struct Point {
    label: String,
    x: f64,
    y: f64,
    ci: Option<(f64, f64)>,
    highlight: bool,
}

/// An SVG scatter (or line, `connect`) plot with axes, ticks, error bars and labels.
fn plot(title: &str, x_label: &str, y_label: &str, points: &[Point], log_x: bool, connect: bool) -> String {
    let (w, h, left, right, top, bottom) = (560.0, 300.0, 60.0, 20.0, 30.0, 45.0);
    let fx = |x: f64| if log_x { x.max(1e-9).log10() } else { x };
    let xs: Vec<f64> = points.iter().map(|p| fx(p.x)).collect();
    let (mut x0, mut x1) = (xs.iter().copied().fold(f64::INFINITY, f64::min), xs.iter().copied().fold(f64::NEG_INFINITY, f64::max));
    if !(x1 > x0) {
        // One point: a decade either side on a log axis, else from 0 to twice it.
        (x0, x1) = if log_x { (x0 - 1.0, x1 + 1.0) } else if x0 > 0.0 { (0.0, 2.0 * x0) } else { (x0 - 1.0, x0 + 1.0) };
    }
    let pad = (x1 - x0) * 0.08;
    // What these axes hold (iterations, dollars, sizes, rates) is never below zero.
    let (x0, x1) = (if log_x || xs.iter().any(|x| *x < 0.0) { x0 - pad } else { (x0 - pad).max(0.0) }, x1 + pad);
    let (y0, y1) = (0.0, 1.0);
    let sx = |x: f64| left + (fx(x) - x0) / (x1 - x0) * (w - left - right);
    let sy = |y: f64| top + (1.0 - (y.clamp(y0, y1) - y0) / (y1 - y0)) * (h - top - bottom);
    let mut s = format!(r#"<figure><svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{t}"><title>{t}</title>"#, t = esc(title));
    let _ = write!(s, r##"<rect x="{left}" y="{top}" width="{}" height="{}" fill="#fafafa" stroke="#999"/>"##, w - left - right, h - top - bottom);
    for k in 0..=4 {
        let y = f64::from(k) / 4.0;
        let _ = write!(s, r##"<line x1="{left}" x2="{}" y1="{py}" y2="{py}" stroke="#ddd"/><text x="{}" y="{}" font-size="11" text-anchor="end">{y:.2}</text>"##, w - right, left - 6.0, sy(y) + 4.0, py = sy(y));
    }
    // Whole numbers (iterations) get whole ticks.
    let whole = points.iter().all(|p| p.x.fract() == 0.0);
    let ticks: Vec<f64> = if log_x {
        (x0.ceil() as i32..=x1.floor() as i32).map(|e| 10f64.powi(e)).collect()
    } else if whole {
        (x0.ceil() as i64..=x1.floor() as i64).map(|t| t as f64).collect()
    } else {
        (0..=4).map(|k| x0 + (x1 - x0) * f64::from(k) / 4.0).collect()
    };
    for t in ticks {
        let label = if log_x || whole { format!("{t}") } else { format!("{t:.2}") };
        let _ = write!(s, r##"<text x="{}" y="{}" font-size="11" text-anchor="middle">{}</text>"##, sx(t), h - bottom + 16.0, esc(&label));
    }
    let _ = write!(s, r##"<text x="{}" y="{}" font-size="12" text-anchor="middle">{}</text>"##, (left + w - right) / 2.0, h - 8.0, esc(x_label));
    let _ = write!(s, r##"<text x="14" y="{}" font-size="12" text-anchor="middle" transform="rotate(-90 14 {})">{}</text>"##, (top + h - bottom) / 2.0, (top + h - bottom) / 2.0, esc(y_label));
    if connect && points.len() > 1 {
        let path: Vec<String> = points.iter().map(|p| format!("{:.1},{:.1}", sx(p.x), sy(p.y))).collect();
        let _ = write!(s, r##"<polyline points="{}" fill="none" stroke="#3465a4" stroke-width="2"/>"##, path.join(" "));
    }
    for p in points {
        let (cx, cy) = (sx(p.x), sy(p.y));
        if let Some((lo, hi)) = p.ci {
            let _ = write!(s, r##"<line class="ci" x1="{cx:.1}" x2="{cx:.1}" y1="{:.1}" y2="{:.1}" stroke="#3465a4"/>"##, sy(lo), sy(hi));
        }
        let fill = if p.highlight { "#cc0000" } else { "#3465a4" };
        let _ = write!(s, r##"<circle class="point" cx="{cx:.1}" cy="{cy:.1}" r="5" fill="{fill}"><title>{}: {:.3}</title></circle>"##, esc(&p.label), p.y);
        // Labels of points near the right edge run leftwards, so they stay inside the figure.
        let (lx, anchor) = if cx > w - right - 120.0 { (cx - 7.0, "end") } else { (cx + 7.0, "start") };
        let _ = write!(s, r##"<text x="{lx:.1}" y="{:.1}" font-size="11" text-anchor="{anchor}">{}</text>"##, cy - 7.0, esc(&p.label));
    }
    s.push_str(&format!("</svg><figcaption>{}</figcaption></figure>", esc(title)));
    s
}

/// One candidate's latencies (to the first token and to the last) against the load, at the
/// percentile the SLO's attainment asks for (p99 for 0.99), so a load fails about where its
/// points cross the SLO's bounds, the dashed lines. Poisson loads are circles at their arrival
/// rate, joined in rate order: filled were sustained, hollow were not; the anchors (a fixed number
/// in flight) are squares at the rate they completed. The green line is the max load found. A
/// latency far over the SLO, or a load that completed nothing, is drawn at the top edge (each
/// point's tooltip says what it was).
fn load_plot(model: &str, capacity: &Capacity, timing: &artifacts::CapacityTiming) -> String {
    use artifacts::{Load, Percentiles};
    let (w, h, left, right, top, bottom) = (560.0, 300.0, 60.0, 20.0, 30.0, 45.0);
    let slo = &capacity.slo;
    let (pct, at): (&str, fn(&Percentiles) -> f64) = if slo.attainment > 0.95 {
        ("p99", |p| p.p99)
    } else if slo.attainment > 0.5 {
        ("p95", |p| p.p95)
    } else {
        ("p50", |p| p.p50)
    };
    // Where a load sits: the rate arrivals were drawn at, or what a fixed number in flight completed.
    let x_of = |l: &Load| l.rate_rps.unwrap_or(l.achieved_rps);
    let mut poisson: Vec<&Load> = timing.loads.iter().filter(|l| l.rate_rps.is_some()).collect();
    poisson.sort_by(|a, b| x_of(a).total_cmp(&x_of(b)));
    let anchors: Vec<&Load> = timing.loads.iter().filter(|l| l.rate_rps.is_none() && l.completed > 0).collect();
    let highest = timing.loads.iter().filter(|l| l.completed > 0).map(|l| at(&l.e2e_ms).max(at(&l.ttft_ms))).fold(0.0, f64::max);
    // A round step, four to six of them to the top, at least the SLO's bound and a bit.
    let span = highest.min(3.0 * slo.e2e_ms).max(1.15 * slo.e2e_ms);
    let magnitude = 10f64.powf((span / 4.0).log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * magnitude).find(|st| span / st <= 6.0).unwrap_or(10.0 * magnitude);
    let y1 = (span / step).ceil() * step;
    let x_max = timing.loads.iter().map(x_of).fold(timing.max_rps, f64::max).max(1e-3);
    let x1 = x_max * 1.08;
    let sx = |x: f64| left + x / x1 * (w - left - right);
    let sy = |y: f64| top + (1.0 - y.clamp(0.0, y1) / y1) * (h - top - bottom);
    let title = format!("{model}: {pct} latency vs offered load (max load {} req/s)", num(Some(timing.max_rps)));
    let mut s = format!(r#"<figure class="load"><svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{t}"><title>{t}</title>"#, t = esc(&title));
    let _ = write!(s, r##"<rect x="{left}" y="{top}" width="{}" height="{}" fill="#fafafa" stroke="#999"/>"##, w - left - right, h - top - bottom);
    let mut y = 0.0;
    while y <= y1 + step / 2.0 {
        let _ = write!(s, r##"<line x1="{left}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end">{y:.0}</text>"##, w - right, left - 6.0, sy(y) + 4.0, py = sy(y));
        y += step;
    }
    for k in 0..=4 {
        let x = x_max * f64::from(k) / 4.0;
        let _ = write!(s, r##"<text x="{:.1}" y="{}" font-size="11" text-anchor="middle">{x:.2}</text>"##, sx(x), h - bottom + 16.0);
    }
    let _ = write!(s, r##"<text x="{}" y="{}" font-size="12" text-anchor="middle">offered load (requests/s)</text>"##, (left + w - right) / 2.0, h - 8.0);
    let _ = write!(s, r##"<text x="14" y="{c}" font-size="12" text-anchor="middle" transform="rotate(-90 14 {c})">{pct} latency (ms)</text>"##, c = (top + h - bottom) / 2.0);
    // TPOT, a time per token, has no place on this axis; its bound is in the SLO attainment.
    for (b, name) in [(slo.ttft_ms, "TTFT"), (slo.e2e_ms, "end-to-end")] {
        let _ = write!(s, r##"<line class="slo" x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#cc0000" stroke-dasharray="6 4"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end" fill="#cc0000">SLO {name} {} ms</text>"##, w - right, w - right - 4.0, sy(b) - 4.0, num(Some(b)), y = sy(b));
    }
    if timing.max_rps > 0.0 {
        let x = sx(timing.max_rps);
        let _ = write!(s, r##"<line class="max" x1="{x:.1}" x2="{x:.1}" y1="{top}" y2="{}" stroke="#4e9a06" stroke-dasharray="2 3"/>"##, h - bottom);
    }
    // What one load says, as its tooltip.
    let about = |l: &Load, name: &str, ms: Option<f64>| {
        let what = match (l.rate_rps, l.concurrency) {
            (Some(r), _) => format!("Poisson {r:.2} req/s"),
            (None, n) => format!("{} in flight", n.unwrap_or(1)),
        };
        let latency = ms.map_or("none completed within the load".to_string(), |ms| format!("{name} {pct} {ms:.0} ms"));
        esc(&format!("{what}: {latency}; {:.2} req/s offered, {:.2} achieved, {:.1}% within the SLO", l.offered_rps, l.achieved_rps, l.attainment * 100.0))
    };
    let series: [(&str, &str, &dyn Fn(&Load) -> f64); 2] = [("end-to-end", "#3465a4", &|l| at(&l.e2e_ms)), ("TTFT", "#f57900", &|l| at(&l.ttft_ms))];
    for (name, colour, of) in series {
        let y_of = |l: &Load| if l.completed > 0 { of(l) } else { y1 };
        let path: Vec<String> = poisson.iter().map(|l| format!("{:.1},{:.1}", sx(x_of(l)), sy(y_of(l)))).collect();
        let _ = write!(s, r##"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"##, path.join(" "));
        for l in &poisson {
            let fill = if l.sustained { colour } else { "#fff" };
            let tip = about(l, name, (l.completed > 0).then(|| of(l)));
            let _ = write!(s, r##"<circle class="load-point" cx="{:.1}" cy="{:.1}" r="4" fill="{fill}" stroke="{colour}" stroke-width="2"><title>{tip}</title></circle>"##, sx(x_of(l)), sy(y_of(l)));
        }
        for l in &anchors {
            let (x, y) = (sx(x_of(l)), sy(of(l)));
            let _ = write!(s, r##"<rect class="anchor" x="{:.1}" y="{:.1}" width="8" height="8" fill="none" stroke="{colour}" stroke-width="2"><title>{}</title></rect>"##, x - 4.0, y - 4.0, about(l, name, Some(of(l))));
        }
    }
    let _ = write!(s, r##"<text x="{}" y="{}" font-size="11" fill="#3465a4">— end-to-end {pct}</text><text x="{}" y="{}" font-size="11" fill="#f57900">— TTFT {pct}</text>"##, left + 6.0, top - 8.0, left + 130.0, top - 8.0);
    s.push_str(&format!(
        "</svg><figcaption>{}. Circles: Poisson arrivals (filled: sustained; hollow: the SLO missed or the rate not kept up); squares: one and {} requests in flight; green: the max load. {}</figcaption></figure>",
        esc(&title),
        timing.loads.iter().filter_map(|l| l.concurrency).max().unwrap_or(1),
        esc(&timing.found)
    ));
    s
}

/// Candidates no other candidate beats on both quality (higher) and cost (lower).
fn pareto(points: &[(f64, f64)]) -> Vec<bool> {
    points.iter().map(|&(c, q)| !points.iter().any(|&(c2, q2)| c2 <= c && q2 >= q && (c2 < c || q2 > q))).collect()
}

/// A candidate's main quality figure: its name, value and 95% interval (judged candidates only).
fn quality_of(c: &DecisionRow) -> Option<(&'static str, f64, Option<(f64, f64)>)> {
    let quality = c.quality.as_ref()?;
    main_figure(|k| quality.get(k).copied())
}

fn render_html(f: &Facts) -> String {
    let mut body = String::new();
    let _ = write!(body, "<h1>{}</h1><p>{}</p>", esc(&f.title), esc(&f.description));
    match &f.decision {
        Some(d) => {
            let _ = write!(body, r#"<section id="decision"><h2>Decision</h2><p class="summary">{}</p>"#, esc(&d.summary));
            body.push_str("<table><tr><th>target</th><th>bound</th></tr>");
            for (k, v) in &d.targets {
                let _ = write!(body, "<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(v));
            }
            body.push_str("</table>");
            let _ = write!(body, "<p>Loop: {}</p></section>", esc(&f.stop));
            let judged: Vec<&DecisionRow> = d.candidates.iter().filter(|c| quality_of(c).is_some()).collect();
            let selected = d.selected.as_deref();
            let size_points: Vec<Point> = judged
                .iter()
                .map(|c| {
                    let (_, y, ci) = quality_of(c).expect("filtered");
                    Point { highlight: Some(c.model.as_str()) == selected, label: c.model.clone(), x: c.params_total_b, y, ci }
                })
                .collect();
            body.push_str(r#"<section id="plots"><h2>Plots</h2>"#);
            body.push_str(&plot("Quality vs size", "total parameters (B, log scale)", "held-out quality", &size_points, true, false));
            let costed: Vec<(&DecisionRow, f64, f64)> = judged.iter().filter_map(|c| Some((*c, *c.timing.as_ref()?.get("usd_per_mtok")?, quality_of(c)?.1))).collect();
            if costed.is_empty() {
                body.push_str("<p>Cost/quality Pareto front: no candidate has a measured cost (set a price table on the `select` stage).</p>");
            } else {
                let front = pareto(&costed.iter().map(|(_, c, q)| (*c, *q)).collect::<Vec<_>>());
                let points: Vec<Point> = costed
                    .iter()
                    .zip(&front)
                    .map(|((c, cost, q), on)| Point { label: format!("{}{}", c.model, if *on { " (Pareto)" } else { "" }), x: *cost, y: *q, ci: None, highlight: *on })
                    .collect();
                body.push_str(&plot("Cost vs quality (red: the Pareto front)", "$ per 1M tokens", "held-out quality", &points, false, false));
            }
        }
        None => body.push_str(r#"<p>This pipeline has no `select` stage: no decision.</p><section id="plots"><h2>Plots</h2>"#),
    }
    if let Some(capacity) = &f.capacity {
        for (model, m) in &capacity.models {
            body.push_str(&load_plot(model, capacity, &m.timing));
        }
    }
    if !f.quality.is_empty() {
        let points: Vec<Point> = f.quality.iter().map(|(it, name, v, ci)| Point { label: format!("{it}: {name} {v:.3}"), x: f64::from(*it), y: *v, ci: *ci, highlight: false }).collect();
        body.push_str(&plot("Quality per iteration (the prompt version judged in it; best candidate, held-out)", "iteration", "held-out quality", &points, false, true));
    }
    body.push_str("</section>");
    if let Some(d) = &f.decision {
        body.push_str(r#"<section id="candidates"><h2>Candidates</h2><table><tr>"#);
        for h in HEADERS {
            let _ = write!(body, "<th>{}</th>", esc(h));
        }
        body.push_str("</tr>");
        for row in candidate_rows(d) {
            body.push_str("<tr>");
            for cell in row {
                let _ = write!(body, "<td>{}</td>", esc(&cell));
            }
            body.push_str("</tr>");
        }
        body.push_str("</table>");
        let excluded = excluded_rows(d);
        if !excluded.is_empty() {
            let _ = write!(body, "<details><summary>{} catalog model(s) excluded by policy</summary><table><tr>", excluded.len());
            for h in EXCLUDED_HEADERS {
                let _ = write!(body, "<th>{}</th>", esc(h));
            }
            body.push_str("</tr>");
            for row in excluded {
                body.push_str("<tr>");
                for cell in row {
                    let _ = write!(body, "<td>{}</td>", esc(&cell));
                }
                body.push_str("</tr>");
            }
            body.push_str("</table></details>");
        }
        body.push_str("</section>");
    }
    if !f.fields.is_empty() {
        body.push_str(r#"<section id="fields"><h2>Per field (answers read as JSON, last iteration)</h2><table><tr><th>model</th><th>split</th><th>field</th><th>match</th><th>accuracy [95% CI]</th></tr>"#);
        for (model, split, fields) in &f.fields {
            for (path, rule, accuracy) in fields {
                let _ = write!(body, "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>", esc(model), split.as_str(), esc(path), esc(rule), with_interval(accuracy));
            }
        }
        body.push_str("</table></section>");
    }
    if let Some(clusters) = &f.clusters {
        body.push_str(r#"<section id="clusters"><h2>Failure modes (dev split, last iteration)</h2>"#);
        for (model, m) in &clusters.models {
            let _ = write!(body, "<h3>{}</h3><table><tr><th>size</th><th>mode</th><th>description</th><th>examples</th></tr>", esc(model));
            for c in &m.clusters {
                let examples: Vec<String> = c
                    .examples
                    .iter()
                    // The label as JSON writes it: quoted, or `null`.
                    .map(|e| format!("<li><code>{}</code>: expected {}, answered “{}”</li>", esc(&e.id), esc(&serde_json::to_string(&e.label).expect("JSON")), esc(&e.answer)))
                    .collect();
                let _ = write!(
                    body,
                    "<tr><td>{}</td><td><b>{}</b><br><code>{}</code></td><td>{}</td><td><ul>{}</ul></td></tr>",
                    c.size,
                    esc(&c.name),
                    esc(&c.id),
                    esc(&c.description),
                    examples.join("")
                );
            }
            body.push_str("</table>");
        }
        body.push_str("</section>");
    }
    if !f.diffs.is_empty() {
        body.push_str(r#"<section id="prompts"><h2>Prompt versions</h2>"#);
        for (_, diff) in &f.diffs {
            body.push_str("<pre class=\"diff\">");
            for line in diff.lines() {
                let class = match line.chars().next() {
                    Some('+') if !line.starts_with("+++") => "add",
                    Some('-') if !line.starts_with("---") => "del",
                    _ => "ctx",
                };
                let _ = writeln!(body, "<span class=\"{class}\">{}</span>", esc(line));
            }
            body.push_str("</pre>");
        }
        body.push_str("</section>");
    }
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}: pipeline report</title><style>{CSS}</style></head><body>{body}</body></html>\n",
        esc(&f.title)
    )
}

const CSS: &str = "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}\
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.3em .5em;text-align:left;vertical-align:top;font-size:.9em}\
th{background:#eee}.summary{font-size:1.1em;font-weight:600}figure{display:inline-block;margin:.5em}\
pre.diff{background:#f6f8fa;padding:.5em;overflow:auto}.add{color:#22863a}.del{color:#b31d28}";

fn render_markdown(f: &Facts) -> String {
    let mut s = format!("## `{}`: pipeline report\n\n", f.title);
    if !f.description.is_empty() {
        let _ = writeln!(s, "{}\n", f.description);
    }
    match &f.decision {
        Some(d) => {
            let _ = writeln!(s, "**Decision:** {}\n\nLoop: {}\n", d.summary, f.stop);
            let _ = writeln!(s, "| {} |\n|{}|", HEADERS.join(" | "), HEADERS.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
            for row in candidate_rows(d) {
                let cells: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
                let _ = writeln!(s, "| {} |", cells.join(" | "));
            }
            s.push('\n');
            let excluded = excluded_rows(d);
            if !excluded.is_empty() {
                let _ = writeln!(s, "<details><summary>{} catalog model(s) excluded by policy</summary>\n", excluded.len());
                let _ = writeln!(s, "| {} |\n|{}|", EXCLUDED_HEADERS.join(" | "), EXCLUDED_HEADERS.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
                for row in excluded {
                    let cells: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
                    let _ = writeln!(s, "| {} |", cells.join(" | "));
                }
                s.push_str("\n</details>\n\n");
            }
        }
        None => s.push_str("No `select` stage: no decision.\n\n"),
    }
    if !f.quality.is_empty() {
        s.push_str("| iteration | held-out quality | 95% CI |\n|---|---|---|\n");
        for (it, name, v, ci) in &f.quality {
            let _ = writeln!(s, "| {it} | {name} {v:.3} | {} |", ci.map_or("–".into(), |(l, h)| format!("{l:.3} – {h:.3}")));
        }
        s.push('\n');
    }
    if !f.fields.is_empty() {
        s.push_str("Per field (answers read as JSON):\n\n| model | split | field | match | accuracy [95% CI] |\n|---|---|---|---|---|\n");
        for (model, split, fields) in &f.fields {
            for (path, rule, accuracy) in fields {
                let _ = writeln!(s, "| {model} | {} | `{path}` | {rule} | {} |", split.as_str(), with_interval(accuracy));
            }
        }
        s.push('\n');
    }
    if let Some(clusters) = &f.clusters {
        for (model, m) in &clusters.models {
            let _ = writeln!(s, "Failure modes of `{model}` (dev split):\n\n| size | mode | id |\n|---|---|---|");
            for c in &m.clusters {
                let _ = writeln!(s, "| {} | {} | `{}` |", c.size, c.name.replace('|', "\\|"), c.id);
            }
            s.push('\n');
        }
    }
    for (_, diff) in &f.diffs {
        let _ = writeln!(s, "<details><summary>{}</summary>\n\n```diff\n{}```\n</details>\n", diff.lines().next().unwrap_or_default(), diff.lines().skip(1).map(|l| format!("{l}\n")).collect::<String>());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A measured load at `offered` req/s whose requests took `ms` (every percentile).
    fn load(offered: f64, ms: f64, sustained: bool) -> artifacts::Load {
        let p = artifacts::Percentiles { p50: ms, p95: ms, p99: ms };
        artifacts::Load {
            kind: "poisson".into(),
            rate_rps: Some(offered),
            concurrency: None,
            requests: 10,
            completed: 10,
            errors: 0,
            error_examples: Vec::new(),
            cut_off: 0,
            queued: 0,
            met_slo: if sustained { 10 } else { 5 },
            attainment: if sustained { 1.0 } else { 0.5 },
            offered_rps: offered,
            achieved_rps: offered,
            goodput_rps: offered,
            ttft_ms: artifacts::Percentiles { p50: ms / 4.0, p95: ms / 4.0, p99: ms / 4.0 },
            itl_ms: p,
            tpot_ms: p,
            e2e_ms: p,
            prompt_tokens_mean: None,
            completion_tokens_mean: 6.0,
            send_lag_p99_ms: 0.1,
            client_behind: false,
            stopped_early: false,
            sustained,
        }
    }

    #[test]
    fn the_load_plot_draws_every_load_against_the_slo_and_keeps_overloads_on_the_canvas() {
        let slo = artifacts::Slo { ttft_ms: 500.0, e2e_ms: 2000.0, tpot_ms: None, attainment: 0.99 };
        let mut anchor = load(3.0, 900.0, true);
        (anchor.kind, anchor.rate_rps, anchor.concurrency) = ("throughput".into(), None, Some(8));
        let mut nothing = load(5.0, 0.0, false);
        nothing.completed = 0;
        let loads = vec![anchor, load(1.0, 800.0, true), load(4.0, 60_000.0, false), load(2.0, 1500.0, true), nothing];
        let timing = artifacts::CapacityTiming { max_rps: 2.0, goodput_rps: 2.0, tokens_per_s: None, found: "between 2.00 and 4.00".into(), loads, search_s: 9.0 };
        let capacity = Capacity { slo, models: Default::default() };
        let svg = load_plot("<m>", &capacity, &timing);
        // Four Poisson loads and an anchor, two series; the failed ones hollow in both.
        assert_eq!(svg.matches("class=\"load-point\"").count(), 8);
        assert_eq!(svg.matches("class=\"anchor\"").count(), 2);
        assert_eq!(svg.matches(r##"fill="#fff""##).count(), 4);
        assert!(svg.contains("Poisson 5.00 req/s: none completed within the load"), "{svg}");
        assert_eq!(svg.matches("class=\"slo\"").count(), 2);
        assert!(svg.contains("SLO end-to-end 2000 ms") && svg.contains("p99 latency") && svg.contains("&lt;m&gt;") && !svg.contains("<m>"), "{svg}");
        // Every point inside the plot area, the 60 s overload drawn at its top edge.
        let cys: Vec<f64> = svg.split("class=\"load-point\" cx=\"").skip(1).map(|t| t.split("cy=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap()).collect();
        assert!(cys.iter().all(|y| (30.0..=255.0).contains(y)), "{cys:?}");
        assert_eq!(cys.iter().filter(|y| **y == 30.0).count(), 4, "both series of the 60 s overload and of the load that completed nothing: {cys:?}");
        // Round ticks: 0 to 6000 ms by 1000 (the span is 3 × the SLO's 2000 ms).
        assert!(svg.contains(">6000</text>") && svg.contains(">1000</text>") && !svg.contains(">7000</text>"), "{svg}");
        // The max load's line sits at 2 req/s: x = 60 + 2 / (5 × 1.08) × 480.
        assert!(svg.contains(&format!(r#"class="max" x1="{:.1}""#, 60.0 + 2.0 / (5.0 * 1.08) * 480.0)), "{svg}");
    }

    #[test]
    fn pareto_front_keeps_the_undominated() {
        // (cost, quality): b dominates c; a is cheapest, d is best.
        let front = pareto(&[(0.1, 0.5), (0.5, 0.7), (0.6, 0.6), (2.0, 0.9)]);
        assert_eq!(front, [true, true, false, true]);
    }

    #[test]
    fn plots_escape_labels_and_draw_every_point() {
        let points = vec![
            Point { label: "<m1>".into(), x: 0.135, y: 0.26, ci: Some((0.16, 0.37)), highlight: false },
            Point { label: "m2".into(), x: 70.0, y: 0.8, ci: None, highlight: true },
        ];
        let svg = plot("t", "x", "y", &points, true, false);
        assert_eq!(svg.matches("class=\"point\"").count(), 2);
        assert_eq!(svg.matches("class=\"ci\"").count(), 1);
        assert!(svg.contains("&lt;m1&gt;") && !svg.contains("<m1>"));
        // One iteration: a whole-number axis, ticked at whole numbers only.
        let one = plot("t", "iteration", "y", &[Point { label: "1".into(), x: 1.0, y: 0.5, ci: None, highlight: false }], false, true);
        assert!(one.contains(">1</text>") && !one.contains(">0.4"), "{one}");
    }

    /// The `x` of every tick label on the horizontal axis (font-size 11, centred).
    fn x_ticks(svg: &str) -> Vec<f64> {
        svg.split(r#"font-size="11" text-anchor="middle">"#).skip(1).filter_map(|t| t.split('<').next()?.parse().ok()).collect()
    }

    #[test]
    fn axes_of_costs_and_counts_never_go_below_zero_and_labels_stay_inside() {
        // One costed point: the axis runs from 0 to twice it, not from −1.
        let cost = plot("c", "$", "q", &[Point { label: "smollm2-135m-instruct (Pareto)".into(), x: 0.04, y: 0.2, ci: None, highlight: true }], false, false);
        let ticks = x_ticks(&cost);
        assert!(!ticks.is_empty() && ticks.iter().all(|t| *t >= 0.0), "{ticks:?}");
        // Near the right edge a label runs leftwards.
        let iterations: Vec<Point> = (1..=3).map(|i| Point { label: format!("{i}: accuracy 0.260"), x: f64::from(i), y: 0.26, ci: None, highlight: false }).collect();
        let svg = plot("q", "iteration", "q", &iterations, false, true);
        assert!(x_ticks(&svg).iter().all(|t| *t >= 0.0));
        assert!(svg.contains(r#"text-anchor="end">3: accuracy 0.260</text>"#) && svg.contains(r#"text-anchor="start">1: accuracy 0.260</text>"#), "{svg}");
    }
}
