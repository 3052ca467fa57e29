//! A self-contained SVG chart of the train and eval loss curves.

use std::fmt::Write as _;
use std::path::Path;

use crate::error::{Result, TrainerError};

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const TRAIN_COLOR: &str = "#1f77b4";
const EVAL_COLOR: &str = "#d62728";

/// Writes a line chart of `train` and `eval` `(step, loss)` points to `path` (an SVG with
/// axes, ticks, a legend and a title), atomically: a temporary file renamed over `path`.
///
/// Non-finite losses are left out; empty series or a single point give a valid chart (an
/// empty frame, or a marker) with finite coordinates.
pub fn write_loss_svg(path: &Path, train: &[(u64, f32)], eval: &[(u64, f32)]) -> Result<()> {
    let svg = loss_svg(train, eval);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, svg).map_err(|e| TrainerError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        TrainerError::io(path, e)
    })
}

/// The SVG text of [`write_loss_svg`].
pub fn loss_svg(train: &[(u64, f32)], eval: &[(u64, f32)]) -> String {
    let finite = |s: &[(u64, f32)]| -> Vec<(f64, f64)> {
        s.iter()
            .filter(|(_, y)| y.is_finite())
            .map(|&(x, y)| (x as f64, f64::from(y)))
            .collect()
    };
    let (train, eval) = (finite(train), finite(eval));
    let all = || train.iter().chain(eval.iter());
    let (x_lo, x_hi) = span(all().map(|p| p.0), 0.0);
    let (y_lo, y_hi) = span(all().map(|p| p.1), 0.05);
    let x_ticks = ticks(x_lo, x_hi);
    let y_ticks = ticks(y_lo, y_hi);
    // Axis ranges cover the ticks so they sit inside the frame.
    let (x_lo, x_hi) = (
        x_lo.min(x_ticks[0]),
        x_hi.max(*x_ticks.last().unwrap_or(&x_hi)),
    );
    let (y_lo, y_hi) = (
        y_lo.min(y_ticks[0]),
        y_hi.max(*y_ticks.last().unwrap_or(&y_hi)),
    );
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let sx = |x: f64| LEFT + (x - x_lo) / (x_hi - x_lo) * plot_w;
    let sy = |y: f64| TOP + (y_hi - y) / (y_hi - y_lo) * plot_h;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="16">Loss</text>"#,
        WIDTH / 2.0
    );
    // Grid, ticks and labels.
    for &t in &x_ticks {
        let x = sx(t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.2}" y1="{TOP}" x2="{x:.2}" y2="{:.2}" stroke="#eee"/><text x="{x:.2}" y="{:.2}" text-anchor="middle">{}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 18.0,
            label(t)
        );
    }
    for &t in &y_ticks {
        let y = sy(t);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.2}" x2="{:.2}" y2="{y:.2}" stroke="#eee"/><text x="{:.2}" y="{:.2}" text-anchor="end">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0,
            label(t)
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.2}" y="{:.2}" text-anchor="middle">step</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 10.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.2}" text-anchor="middle" transform="rotate(-90 16 {:.2})">loss</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    if train.is_empty() && eval.is_empty() {
        let _ = writeln!(
            s,
            r##"<text x="{:.2}" y="{:.2}" text-anchor="middle" fill="#888">no data</text>"##,
            LEFT + plot_w / 2.0,
            TOP + plot_h / 2.0
        );
    }
    // Series: a polyline, and markers for eval (sparse) or a lone point.
    for (points, color, markers) in [(&train, TRAIN_COLOR, false), (&eval, EVAL_COLOR, true)] {
        if points.len() > 1 {
            let coords: Vec<String> = points
                .iter()
                .map(|&(x, y)| format!("{:.2},{:.2}", sx(x), sy(y)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
                coords.join(" ")
            );
        }
        if markers || points.len() == 1 {
            for &(x, y) in points.iter() {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{:.2}" cy="{:.2}" r="3" fill="{color}"/>"#,
                    sx(x),
                    sy(y)
                );
            }
        }
    }
    // Legend.
    let lx = LEFT + plot_w - 110.0;
    for (i, (name, color)) in [("train", TRAIN_COLOR), ("eval", EVAL_COLOR)]
        .into_iter()
        .enumerate()
    {
        let y = TOP + 16.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.2}" y1="{y:.2}" x2="{:.2}" y2="{y:.2}" stroke="{color}" stroke-width="2"/><text x="{:.2}" y="{:.2}">{name}</text>"#,
            lx + 24.0,
            lx + 30.0,
            y + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// `[lo, hi]` of the values with `pad` (fraction) margins; never empty or non-finite.
fn span(values: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        let d = (lo.abs() * 0.1).max(1.0);
        return (lo - d, hi + d);
    }
    let m = (hi - lo) * pad;
    (lo - m, hi + m)
}

/// 3-8 round tick values covering `[lo, hi]` (steps of 1, 2 or 5 times a power of ten).
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| raw <= *s)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).floor() * step;
    let mut out = Vec::new();
    let mut t = first;
    while t <= hi + step * 1e-9 && out.len() < 20 {
        out.push(t);
        t += step;
    }
    if out.last().is_some_and(|&l| l < hi) {
        out.push(t);
    }
    out
}

fn label(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e6).contains(&a) {
        format!("{v:.1e}")
    } else if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbers_are_finite(svg: &str) {
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    }

    #[test]
    fn writes_a_chart() {
        let dir = std::env::temp_dir().join(format!("kiln-plot-test-{}", std::process::id()));
        let path = dir.join("sub").join("loss.svg");
        let train: Vec<(u64, f32)> = (1..=300).map(|s| (s, 5.0 / (s as f32).sqrt())).collect();
        let eval = [(100, 0.9), (200, 0.6), (300, f32::NAN)];
        write_loss_svg(&path, &train, &eval).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 2);
        for part in [">Loss<", ">train<", ">eval<", ">step<", ">300<"] {
            assert!(svg.contains(part), "{part}");
        }
        numbers_are_finite(&svg);
        // Nothing left behind but the chart.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("loss.svg")]);
    }

    #[test]
    fn empty_and_single_point_series() {
        for (train, eval) in [
            (vec![], vec![]),
            (vec![(5, 2.0)], vec![]),
            (vec![], vec![(0, 0.0)]),
            (vec![(1, f32::NAN), (2, f32::INFINITY)], vec![]),
            (vec![(3, 1.0), (3, 1.0)], vec![(3, 1.0)]),
            (vec![(0, 1e-9), (1_000_000, 1e9)], vec![]),
        ] {
            let svg = loss_svg(&train, &eval);
            assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
            numbers_are_finite(&svg);
        }
        assert!(loss_svg(&[], &[]).contains("no data"));
        assert_eq!(loss_svg(&[(5, 2.0)], &[]).matches("<circle").count(), 1);
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(ticks(0.0, 10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = ticks(0.95, 2.3);
        assert!(
            t[0] <= 0.95 && *t.last().unwrap() >= 2.3 && t.len() <= 10,
            "{t:?}"
        );
        assert_eq!(label(2.0), "2");
        assert_eq!(label(0.25), "0.25");
    }
}
