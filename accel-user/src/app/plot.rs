//! A migration's timeline as an SVG chart (`--plot FILE.svg`): per round, the pages sent and
//! the dirty pages found when it ended (top), the round's throughput and the rate at which
//! the guest dirtied memory during it (bottom); the title gives the total time, the
//! switchover and the downtime.
use std::time::Duration;

use plotters::prelude::*;

use crate::policy::RoundStats;
use crate::wire::frame::PAGE;

/// Series names, as the chart's legends show them.
pub const SERIES: [&str; 4] = ["pages sent", "dirty pages found", "throughput (MiB/s)", "guest dirtying (MiB/s)"];

/// The chart of `rounds` (precopy rounds, then the final round), as SVG text.
pub fn timeline(
    rounds: &[RoundStats],
    switchover: &str,
    total: Duration,
    downtime: Duration,
) -> Result<String, String> {
    let err = |e: &dyn std::fmt::Display| format!("plot: {e}");
    let n = rounds.len().max(1) as u32;
    let pages: Vec<(u32, u64)> = rounds.iter().enumerate().map(|(i, r)| (i as u32, r.pages)).collect();
    let dirty: Vec<(u32, u64)> = rounds.iter().enumerate().map(|(i, r)| (i as u32, r.dirty_after)).collect();
    let mib_s = |bytes: u64, d: Duration| {
        let s = d.as_secs_f64();
        if s > 0.0 {
            bytes as f64 / (1 << 20) as f64 / s
        } else {
            0.0
        }
    };
    let tput: Vec<(u32, f64)> = rounds.iter().enumerate().map(|(i, r)| (i as u32, mib_s(r.bytes, r.elapsed))).collect();
    let dirtying: Vec<(u32, f64)> =
        rounds.iter().enumerate().map(|(i, r)| (i as u32, mib_s(r.dirty_after * PAGE, r.elapsed))).collect();
    let top_max = pages.iter().chain(&dirty).map(|p| p.1).max().unwrap_or(0).max(1) * 11 / 10;
    let bottom_max = tput.iter().chain(&dirtying).map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let title = format!(
        "{} rounds, {:.1} ms in all; switchover: {switchover}; downtime {:.1} ms",
        rounds.len(),
        total.as_secs_f64() * 1e3,
        downtime.as_secs_f64() * 1e3
    );

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 640)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let root = root.titled(&title, ("sans-serif", 16)).map_err(|e| err(&e))?;
        let (top, bottom) = root.split_vertically(300);
        let colours = [BLUE, RED, GREEN, MAGENTA];

        let mut c = ChartBuilder::on(&top)
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0u32..n, 0u64..top_max)
            .map_err(|e| err(&e))?;
        c.configure_mesh().x_desc("round (the last is the final round)").y_desc("pages").draw().map_err(|e| err(&e))?;
        for (k, series) in [pages, dirty].into_iter().enumerate() {
            let col = colours[k];
            c.draw_series(LineSeries::new(series, col.stroke_width(2)).point_size(3))
                .map_err(|e| err(&e))?
                .label(SERIES[k])
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col));
        }
        c.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(|e| err(&e))?;

        let mut c = ChartBuilder::on(&bottom)
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0u32..n, 0f64..bottom_max)
            .map_err(|e| err(&e))?;
        c.configure_mesh().x_desc("round").y_desc("MiB/s").draw().map_err(|e| err(&e))?;
        for (k, series) in [tput, dirtying].into_iter().enumerate() {
            let col = colours[k + 2];
            c.draw_series(LineSeries::new(series, col.stroke_width(2)).point_size(3))
                .map_err(|e| err(&e))?
                .label(SERIES[k + 2])
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col));
        }
        c.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

/// One group of bars: its name and each series' value in it (NaN: no bar).
pub type Group = (String, Vec<(String, f64)>);

/// Grouped bars as SVG text: one group per entry of `groups` along x, one colour per series
/// (in order of first appearance), values on a common y axis described by `y_desc`. The
/// bench suite draws its comparison tables with it.
pub fn bars(title: &str, y_desc: &str, groups: &[Group]) -> Result<String, String> {
    let err = |e: &dyn std::fmt::Display| format!("plot: {e}");
    let mut series: Vec<&str> = Vec::new();
    for (_, vals) in groups {
        for (name, _) in vals {
            if !series.contains(&name.as_str()) {
                series.push(name);
            }
        }
    }
    let ymax = groups.iter().flat_map(|g| g.1.iter().map(|v| v.1)).filter(|v| v.is_finite()).fold(1.0, f64::max) * 1.1;
    let palette = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK, RGBColor(255, 140, 0), RGBColor(128, 0, 128)];
    let colour = |i: usize| {
        let c = palette[i % palette.len()];
        if i < palette.len() {
            c.mix(0.8)
        } else {
            c.mix(0.4)
        }
    };
    let n = groups.len().max(1);
    let width = (n * (series.len() + 1) * 14).max(900) as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut c = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..n as f64, 0f64..ymax)
            .map_err(|e| err(&e))?;
        let names: Vec<String> = groups.iter().map(|g| g.0.clone()).collect();
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| names.get(x.floor() as usize).cloned().unwrap_or_default())
            .y_desc(y_desc)
            .draw()
            .map_err(|e| err(&e))?;
        let w = 0.8 / series.len().max(1) as f64;
        for (k, name) in series.iter().enumerate() {
            let col = colour(k);
            let rects = groups.iter().enumerate().filter_map(|(g, (_, vals))| {
                let v = vals.iter().find(|(s, _)| s == name).map(|x| x.1).filter(|v| v.is_finite())?;
                let x0 = g as f64 + 0.1 + k as f64 * w;
                Some(Rectangle::new([(x0, 0.0), (x0 + w, v)], col.filled()))
            });
            c.draw_series(rects)
                .map_err(|e| err(&e))?
                .label(*name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], col.filled()));
        }
        c.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_hold_every_group_and_series() {
        let g =
            |name: &str, a: f64, b: f64| (name.to_string(), vec![("QEMU".to_string(), a), ("migaccel".to_string(), b)]);
        let groups =
            [g("1 GiB idle", 2400.0, 1200.0), g("1 GiB hot", 3100.0, f64::NAN), g("4 GiB idle", 9000.0, 4000.0)];
        let svg = bars("total time", "ms", &groups).unwrap();
        let doc = roxmltree::Document::parse(&svg).expect("well-formed SVG");
        let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).collect();
        for t in ["QEMU", "migaccel", "1 GiB idle", "4 GiB idle", "total time"] {
            assert!(texts.iter().any(|x| x.contains(t)), "{t:?} missing: {texts:?}");
        }
        // Five bars (the NaN draws none) and two legend swatches.
        let coloured = |n: &roxmltree::Node| !matches!(n.attribute("fill"), Some("#FFFFFF" | "none") | None);
        let filled = doc.descendants().filter(|n| n.has_tag_name("rect") && coloured(n)).count();
        assert_eq!(filled, 5 + 2, "{svg}");
    }

    #[test]
    fn the_svg_parses_and_holds_every_series() {
        let r = |round, pages, dirty_after, ms| RoundStats {
            round,
            pages,
            bytes: pages * PAGE,
            dirty_after,
            elapsed: Duration::from_millis(ms),
            ..Default::default()
        };
        let rounds = [r(0, 32768, 900, 120), r(1, 900, 300, 6), r(2, 300, 0, 2)];
        let svg = timeline(&rounds, "converged", Duration::from_millis(140), Duration::from_millis(9)).unwrap();
        let doc = roxmltree::Document::parse(&svg).expect("well-formed SVG");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).collect();
        for s in SERIES {
            assert!(texts.iter().any(|t| t.contains(s)), "legend {s:?} missing");
        }
        assert!(texts.iter().any(|t| t.contains("downtime 9.0 ms")), "{texts:?}");
        // One polyline per series, each through every round.
        let lines: Vec<_> = doc.descendants().filter(|n| n.has_tag_name("polyline")).collect();
        let through_all = lines
            .iter()
            .filter(|l| l.attribute("points").is_some_and(|p| p.split_whitespace().count() == rounds.len()))
            .count();
        assert!(through_all >= SERIES.len(), "{through_all} series lines of {} points", rounds.len());
    }
}
