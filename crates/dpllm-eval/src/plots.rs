//! SVG plots for reports (drawn with `plotters`' SVG backend: no fonts or
//! native libraries needed): lines of (x, y) points per series, and heat maps.

use plotters::prelude::*;

/// One named line of points.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points, drawn in x order.
    pub points: Vec<(f64, f64)>,
}

/// Colors of successive series.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("cannot draw the plot: {e}")
}

/// Range of `values` padded by 5 % (a unit range when they are all equal).
fn range(values: impl Iterator<Item = f64>) -> anyhow::Result<std::ops::Range<f64>> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        anyhow::bail!("no finite values to plot");
    }
    let pad = if hi > lo { 0.05 * (hi - lo) } else { 0.5 };
    Ok(lo - pad..hi + pad)
}

/// A line chart of `series` as an SVG document.
pub fn line_chart(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> anyhow::Result<String> {
    let xs = range(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)))?;
    let ys = range(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)))?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 440)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(xs, ys)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()
            .map_err(err)?;
        for (i, s) in series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let mut pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// A heat map of `values[row][col]` (None: no cell) with row and column labels, as an SVG document.
pub fn heat_map(
    title: &str,
    rows: &[String],
    cols: &[String],
    values: &[Vec<Option<f64>>],
) -> anyhow::Result<String> {
    let (lo, hi) = values
        .iter()
        .flatten()
        .flatten()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        anyhow::bail!("no values for the heat map");
    }
    let span = (hi - lo).max(1e-9);
    let mut svg = String::new();
    {
        let height = (80 + 22 * rows.len()).max(200) as u32;
        let root = SVGBackend::with_string(&mut svg, (140 + 90 * cols.len() as u32, height))
            .into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("{title} ({lo:.2}..{hi:.2} bits)"),
                ("sans-serif", 16),
            )
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(
                (0..cols.len().saturating_sub(1)).into_segmented(),
                (0..rows.len().saturating_sub(1)).into_segmented(),
            )
            .map_err(err)?;
        // Labels at the centre of each cell.
        let label = |names: &[String], v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(cols.len() + 1)
            .y_labels(rows.len() + 1)
            .x_label_formatter(&|v| label(cols, v))
            .y_label_formatter(&|v| label(rows, v))
            .draw()
            .map_err(err)?;
        let cells = values.iter().enumerate().flat_map(|(r, row)| {
            row.iter().enumerate().filter_map(move |(c, v)| {
                let t = (v.as_ref()? - lo) / span;
                let color = HSLColor(0.66 * (1.0 - t), 0.8, 0.5);
                Some(Rectangle::new(
                    [
                        (SegmentValue::Exact(c), SegmentValue::Exact(r)),
                        (SegmentValue::Exact(c + 1), SegmentValue::Exact(r + 1)),
                    ],
                    color.filled(),
                ))
            })
        });
        chart.draw_series(cells).map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_svg(s: &str) {
        assert!(
            s.starts_with("<svg") && s.trim_end().ends_with("</svg>"),
            "not an SVG document"
        );
        assert!(s.len() > 1000, "suspiciously small: {} bytes", s.len());
    }

    #[test]
    fn line_chart_draws_every_series_with_labels() {
        let series = vec![
            Series {
                label: "uniform".into(),
                points: vec![(3.0, 42.9), (4.0, 28.9), (8.0, 25.2)],
            },
            Series {
                label: "dp-llm".into(),
                points: vec![(3.5, 30.0), (4.5, 26.0)],
            },
        ];
        let svg = line_chart("perplexity", "effective bits", "perplexity", &series).unwrap();
        valid_svg(&svg);
        assert!(
            svg.contains("uniform") && svg.contains("dp-llm") && svg.contains("effective bits")
        );
        assert_eq!(svg.matches("<circle").count(), 5, "one marker per point");
        assert!(line_chart(
            "x",
            "x",
            "y",
            &[Series {
                label: "nan".into(),
                points: vec![(f64::NAN, 1.0)]
            }]
        )
        .is_err());
    }

    #[test]
    fn heat_map_draws_one_cell_per_value() {
        let rows = vec!["layer 0".to_string(), "layer 1".to_string()];
        let cols = vec!["q_proj".to_string(), "down_proj".to_string()];
        let svg = heat_map(
            "plan",
            &rows,
            &cols,
            &[vec![Some(3.0), Some(4.5)], vec![None, Some(6.0)]],
        )
        .unwrap();
        valid_svg(&svg);
        assert!(svg.contains("down_proj") && svg.contains("layer 1") && svg.contains("3.00..6.00"));
        assert!(heat_map("p", &rows, &cols, &[vec![None, None]]).is_err());
    }
}
