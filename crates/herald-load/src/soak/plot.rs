//! Line charts as SVG, written by hand: polylines, axes with ticks and labels, shaded bands
//! (the server's offline periods) and vertical markers (the restart).

use std::fmt::Write as _;

/// One line.
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) color: &'static str,
    /// Points in x order; a non-finite y breaks the line.
    pub(crate) points: Vec<(f64, f64)>,
}

/// A straight line from one point to another, with its legend.
pub(crate) type Fit = ((f64, f64), (f64, f64), String);

/// A chart.
pub(crate) struct Chart {
    pub(crate) title: String,
    pub(crate) x_label: String,
    pub(crate) y_label: String,
    pub(crate) series: Vec<Series>,
    /// Shaded x ranges, with the legend's name for them.
    pub(crate) bands: Vec<(f64, f64)>,
    pub(crate) band_name: String,
    /// Vertical lines with a label.
    pub(crate) markers: Vec<(f64, String)>,
    /// A straight line drawn over the data (a fit), from (x0, y0) to (x1, y1).
    pub(crate) fit: Option<Fit>,
    pub(crate) log_y: bool,
    /// Start the y axis at zero (linear charts).
    pub(crate) y_from_zero: bool,
}

const W: f64 = 860.0;
const H: f64 = 380.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 52.0;

/// 1, 2 or 5 times a power of ten, near `range / target`.
fn nice_step(range: f64, target: f64) -> f64 {
    let raw = (range / target).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let n = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    n * mag
}

fn fmt_tick(v: f64, step: f64) -> String {
    if v.abs() >= 1e6 && step >= 1e5 {
        format!("{}M", trim(v / 1e6, step / 1e6))
    } else if v.abs() >= 1e4 && step >= 1e3 {
        format!("{}k", trim(v / 1e3, step / 1e3))
    } else {
        trim(v, step)
    }
}

fn trim(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    format!("{v:.decimals$}")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Chart {
    pub(crate) fn render(&self) -> String {
        let pts = self
            .series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(_, y)| y.is_finite() && (!self.log_y || *y > 0.0));
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if let Some(((fx0, fy0), (fx1, fy1), _)) = &self.fit {
            x0 = x0.min(*fx0);
            x1 = x1.max(*fx1);
            y0 = y0.min(fy0.min(*fy1));
            y1 = y1.max(fy0.max(*fy1));
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        // y range: linear with a margin (from zero if asked), or whole decades.
        let (ly0, ly1);
        if self.log_y {
            ly0 = y0.max(1e-3).log10().floor();
            ly1 = (y1.max(1e-3).log10().ceil()).max(ly0 + 1.0);
            (y0, y1) = (10f64.powf(ly0), 10f64.powf(ly1));
        } else {
            if self.y_from_zero {
                y0 = y0.min(0.0);
            }
            let span = (y1 - y0).max(y1.abs() * 0.05).max(1e-9);
            if !self.y_from_zero {
                y0 -= span * 0.08;
            }
            y1 += span * 0.08;
            let step = nice_step(y1 - y0, 6.0);
            y0 = (y0 / step).floor() * step;
            y1 = (y1 / step).ceil() * step;
            (ly0, ly1) = (0.0, 0.0);
        }
        let pw = W - LEFT - RIGHT;
        let ph = H - TOP - BOTTOM;
        let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| {
            let f = if self.log_y {
                (y.max(1e-9).log10() - ly0) / (ly1 - ly0)
            } else {
                (y - y0) / (y1 - y0)
            };
            TOP + ph - f.clamp(-0.02, 1.02) * ph
        };
        let mut o = String::new();
        let _ = write!(
            o,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect x="0" y="0" width="{W}" height="{H}" fill="#ffffff"/>
<text x="{}" y="22" font-size="15" text-anchor="middle" font-weight="bold">{}</text>
"##,
            W / 2.0,
            esc(&self.title)
        );
        // Bands.
        for (a, b) in &self.bands {
            let (a, b) = (a.max(x0), b.min(x1));
            if b > a {
                let _ = writeln!(
                    o,
                    r##"<rect x="{:.1}" y="{TOP}" width="{:.1}" height="{ph}" fill="#d9d9d9" fill-opacity="0.6"/>"##,
                    sx(a),
                    sx(b) - sx(a)
                );
            }
        }
        // Grid and ticks.
        let xstep = nice_step(x1 - x0, 10.0);
        let mut x = (x0 / xstep).ceil() * xstep;
        while x <= x1 + xstep * 1e-9 {
            let px = sx(x);
            let _ = writeln!(
                o,
                r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#eeeeee"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                TOP + ph,
                TOP + ph + 16.0,
                fmt_tick(x, xstep)
            );
            x += xstep;
        }
        if self.log_y {
            let mut d = ly0;
            while d <= ly1 + 1e-9 {
                let v = 10f64.powf(d);
                let py = sy(v);
                let _ = writeln!(
                    o,
                    r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#eeeeee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                    LEFT + pw,
                    LEFT - 6.0,
                    py + 4.0,
                    fmt_tick(v, v)
                );
                d += 1.0;
            }
        } else {
            let ystep = nice_step(y1 - y0, 6.0);
            let mut y = y0;
            while y <= y1 + ystep * 1e-9 {
                let py = sy(y);
                let _ = writeln!(
                    o,
                    r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#eeeeee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                    LEFT + pw,
                    LEFT - 6.0,
                    py + 4.0,
                    fmt_tick(y, ystep)
                );
                y += ystep;
            }
        }
        // Axes and their labels.
        let _ = writeln!(
            o,
            r##"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{:.1}" stroke="#333333"/><line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333333"/>"##,
            TOP + ph,
            TOP + ph,
            LEFT + pw,
            TOP + ph
        );
        let _ = writeln!(
            o,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            LEFT + pw / 2.0,
            H - 12.0,
            esc(&self.x_label)
        );
        let _ = writeln!(
            o,
            r##"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"##,
            TOP + ph / 2.0,
            TOP + ph / 2.0,
            esc(&self.y_label)
        );
        // Markers.
        for (mx, label) in &self.markers {
            if *mx < x0 || *mx > x1 {
                continue;
            }
            let px = sx(*mx);
            let _ = writeln!(
                o,
                r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#c0392b" stroke-dasharray="5,4"/><text x="{:.1}" y="{:.1}" fill="#c0392b">{}</text>"##,
                TOP + ph,
                px + 4.0,
                TOP + 14.0,
                esc(label)
            );
        }
        // Lines.
        for s in &self.series {
            let mut run: Vec<String> = Vec::new();
            let flush = |run: &mut Vec<String>, o: &mut String| {
                if run.len() > 1 {
                    let _ = writeln!(
                        o,
                        r##"<polyline fill="none" stroke="{}" stroke-width="1.6" points="{}"/>"##,
                        s.color,
                        run.join(" ")
                    );
                } else if let Some(p) = run.first() {
                    let (cx, cy) = p.split_once(',').unwrap_or(("0", "0"));
                    let _ = writeln!(
                        o,
                        r##"<circle cx="{cx}" cy="{cy}" r="1.8" fill="{}"/>"##,
                        s.color
                    );
                }
                run.clear();
            };
            for &(x, y) in &s.points {
                if y.is_finite() && (!self.log_y || y > 0.0) {
                    run.push(format!("{:.1},{:.1}", sx(x), sy(y)));
                } else {
                    flush(&mut run, &mut o);
                }
            }
            flush(&mut run, &mut o);
        }
        if let Some(((fx0, fy0), (fx1, fy1), _)) = &self.fit {
            let _ = writeln!(
                o,
                r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#000000" stroke-width="1.4" stroke-dasharray="2,3"/>"##,
                sx(*fx0),
                sy(*fy0),
                sx(*fx1),
                sy(*fy1)
            );
        }
        // Legend, top left inside the plot.
        let mut entries: Vec<(String, String)> = self
            .series
            .iter()
            .map(|s| (s.color.to_owned(), s.name.clone()))
            .collect();
        if let Some((_, _, name)) = &self.fit {
            entries.push(("#000000".to_owned(), name.clone()));
        }
        let mut ly = TOP + 14.0;
        let lx = LEFT + 10.0;
        if !self.bands.is_empty() {
            let _ = writeln!(
                o,
                r##"<rect x="{lx:.1}" y="{:.1}" width="18" height="10" fill="#d9d9d9"/><text x="{:.1}" y="{ly:.1}">{}</text>"##,
                ly - 9.0,
                lx + 24.0,
                esc(&self.band_name)
            );
            ly += 16.0;
        }
        for (color, name) in entries {
            let _ = writeln!(
                o,
                r##"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="2.5"/><text x="{:.1}" y="{ly:.1}">{}</text>"##,
                ly - 4.0,
                lx + 18.0,
                ly - 4.0,
                lx + 24.0,
                esc(&name)
            );
            ly += 16.0;
        }
        o.push_str("</svg>\n");
        o
    }
}

/// Least-squares line through `points`: (slope, intercept).
pub(crate) fn linear_fit(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    Some((slope, my - slope * mx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_and_steps() {
        let (a, b) = linear_fit(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]).unwrap();
        assert!((a - 2.0).abs() < 1e-9 && (b - 1.0).abs() < 1e-9);
        assert_eq!(nice_step(100.0, 10.0), 10.0);
        assert_eq!(nice_step(7.0, 6.0), 2.0);
        assert_eq!(fmt_tick(20000.0, 5000.0), "20k");
    }

    #[test]
    fn a_chart_renders() {
        let c = Chart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![Series {
                name: "a".into(),
                color: "#1f77b4",
                points: vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 3.0), (3.0, 4.0)],
            }],
            bands: vec![(0.5, 1.5)],
            band_name: "offline".into(),
            markers: vec![(1.0, "restart".into())],
            fit: Some(((0.0, 1.0), (3.0, 4.0), "fit".into())),
            log_y: false,
            y_from_zero: true,
        };
        let svg = c.render();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert_eq!(svg.matches("<circle").count(), 1);
    }
}
