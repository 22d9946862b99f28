//! `dpllm report RESULTS.json... --out DIR`: a Markdown report with SVG plots
//! from the JSON results of `pipeline`, `perplexity` and `bench decode`, and
//! heat maps of plans' per-linear precisions.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use dpllm_eval::plots::{heat_map, line_chart, Series};
use dpllm_format::plan::Plan;
use dpllm_format::{check_output, OutputKind, StagingDir};
use serde_json::Value;

/// Arguments of `report`.
#[derive(clap::Args)]
pub struct Args {
    /// JSON results written with --json by `pipeline` (every row, by method),
    /// `perplexity` (one point, on the line of the method it ran) or `bench decode`.
    #[arg(required = true)]
    pub results: Vec<PathBuf>,
    /// Plan files (MODEL/plans/budget-M/target-*.json) to draw as heat maps of
    /// each linear's average precision (layer x projection).
    #[arg(long, value_delimiter = ',')]
    pub plans: Vec<PathBuf>,
    /// Output directory: report.md and its SVG plots.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace OUT if it is a report dpllm wrote.
    #[arg(long)]
    pub force: bool,
}

/// One evaluated configuration.
struct Point {
    source: String,
    method: String,
    target: Option<f64>,
    bits: Option<f64>,
    perplexity: f64,
    kl: Option<(f64, f64)>,
}

/// One decode benchmark.
struct Speed {
    source: String,
    weights: String,
    bits: Option<f64>,
    tokens_per_sec: f64,
}

fn file_stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A perplexity result object (`Perplexity` as JSON) as a point.
fn point(source: &str, method: String, target: Option<f64>, r: &Value) -> Option<Point> {
    Some(Point {
        source: source.to_string(),
        method,
        target,
        bits: r["effective_bits"].as_f64(),
        perplexity: r["perplexity"].as_f64()?,
        kl: r["fidelity"]["mean_kl"]
            .as_f64()
            .zip(r["fidelity"]["top1_agreement"].as_f64()),
    })
}

/// Read every results file into points and speeds.
fn collect(files: &[PathBuf]) -> anyhow::Result<(Vec<Point>, Vec<Speed>)> {
    let (mut points, mut speeds) = (Vec::new(), Vec::new());
    for f in files {
        let text = std::fs::read_to_string(f)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{} is not JSON: {e}", f.display()))?;
        let source = file_stem(f);
        if let Some(rows) = v["rows"].as_array() {
            for row in rows {
                let method = row["method"].as_str().unwrap_or("?").to_string();
                let p = point(&source, method, row["target"].as_f64(), &row["result"]);
                points.push(
                    p.ok_or_else(|| anyhow::anyhow!("{}: a row has no perplexity", f.display()))?,
                );
            }
        } else if v["perplexity"].is_number() {
            let mut method = v["method"]
                .as_str()
                .map_or_else(|| source.clone(), str::to_string);
            // Plans of several budgets: one line per method and budget.
            if let Some(b) = v["budget"].as_f64() {
                method = format!("{method}, budget {b}");
            }
            points.extend(point(&source, method, v["target"].as_f64(), &v));
        } else if let Some(tps) = v["decode_tokens_per_sec"].as_f64() {
            let weights = v["weights"].as_str().unwrap_or("").to_string();
            speeds.push(Speed {
                source,
                weights,
                bits: v["effective_bits"].as_f64(),
                tokens_per_sec: tps,
            });
        } else {
            anyhow::bail!(
                "{} is not a result of `pipeline`, `perplexity` or `bench decode` --json",
                f.display()
            );
        }
    }
    Ok((points, speeds))
}

/// One series per method, points at their effective bits (dense models have none and are left out).
fn series(points: &[Point], y: impl Fn(&Point) -> Option<f64>) -> Vec<Series> {
    let mut by: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for p in points {
        if let (Some(b), Some(v)) = (p.bits, y(p)) {
            by.entry(&p.method).or_default().push((b, v));
        }
    }
    by.into_iter()
        .map(|(label, points)| Series {
            label: label.to_string(),
            points,
        })
        .collect()
}

/// The heat map of plan `path`: layers x projections, each linear's average precision.
fn plan_map(path: &Path) -> anyhow::Result<String> {
    let plan = Plan::load(path)?;
    let mut cols: Vec<String> = Vec::new();
    let mut cells: BTreeMap<(usize, String), f64> = BTreeMap::new();
    for l in &plan.linears {
        let rest = l.name.strip_prefix("model.layers.").ok_or_else(|| {
            anyhow::anyhow!("{}: linear {} is not in a layer", path.display(), l.name)
        })?;
        let (layer, module) = rest.split_once('.').unwrap_or((rest, ""));
        let kind = module.rsplit('.').next().unwrap_or(module).to_string();
        if !cols.contains(&kind) {
            cols.push(kind.clone());
        }
        cells.insert((layer.parse()?, kind), l.avg_bits as f64);
    }
    let layers = cells.keys().map(|k| k.0).max().map_or(0, |m| m + 1);
    let rows: Vec<String> = (0..layers).map(|l| format!("layer {l}")).collect();
    let values: Vec<Vec<Option<f64>>> = (0..layers)
        .map(|l| {
            cols.iter()
                .map(|c| cells.get(&(l, c.clone())).copied())
                .collect()
        })
        .collect();
    let title = format!(
        "{:?} plan, target {:.2}, budget {:.2}",
        plan.kind, plan.target_bits, plan.budget_bits
    )
    .to_lowercase();
    heat_map(&title, &rows, &cols, &values)
}

/// Write the report.
pub fn run(a: Args) -> anyhow::Result<()> {
    let inputs: Vec<&Path> = a
        .results
        .iter()
        .chain(&a.plans)
        .map(PathBuf::as_path)
        .collect();
    check_output(&a.out, OutputKind::Report, &inputs, a.force)?;
    let (points, speeds) = collect(&a.results)?;
    let mut staging = StagingDir::new(&a.out, OutputKind::Report, a.force)?;
    let dir = staging.path().to_path_buf();
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text)
            .map_err(|e| anyhow::anyhow!("cannot write {name}: {e}"))
    };
    let mut md = format!(
        "# dpllm report\n\nFrom {}.\n",
        a.results
            .iter()
            .map(|p| format!("`{}`", p.display()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !points.is_empty() {
        let ppl = series(&points, |p| Some(p.perplexity));
        if !ppl.is_empty() {
            write(
                "perplexity.svg",
                &line_chart(
                    "Perplexity vs effective bits",
                    "effective bits",
                    "perplexity",
                    &ppl,
                )?,
            )?;
            md.push_str("\n## Perplexity\n\n![perplexity vs effective bits](perplexity.svg)\n");
        }
        let kl = series(&points, |p| p.kl.map(|k| k.0));
        if !kl.is_empty() {
            write(
                "kl.svg",
                &line_chart(
                    "KL divergence from the reference vs effective bits",
                    "effective bits",
                    "mean KL (nats)",
                    &kl,
                )?,
            )?;
            md.push_str("\n![KL divergence vs effective bits](kl.svg)\n");
        }
        md.push_str("\n| source | method | target | effective bits | perplexity | mean KL | top-1 agreement |\n|---|---|---|---|---|---|---|\n");
        for p in &points {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {:.4} | {} | {} |",
                p.source,
                p.method,
                p.target.map_or("-".into(), |t| format!("{t:.2}")),
                p.bits.map_or("full".into(), |b| format!("{b:.3}")),
                p.perplexity,
                p.kl.map_or("-".into(), |k| format!("{:.5}", k.0)),
                p.kl.map_or("-".into(), |k| format!("{:.2} %", 100.0 * k.1)),
            );
        }
    }
    if !a.plans.is_empty() {
        md.push_str("\n## Plans: average precision of each linear\n");
        for (i, p) in a.plans.iter().enumerate() {
            let name = format!("plan-{i}-{}.svg", file_stem(p));
            write(&name, &plan_map(p)?)?;
            let _ = write!(md, "\n`{}`\n\n![{name}]({name})\n", p.display());
        }
    }
    if !speeds.is_empty() {
        let s: Vec<Series> = vec![Series {
            label: "decode".into(),
            points: speeds
                .iter()
                .filter_map(|s| Some((s.bits?, s.tokens_per_sec)))
                .collect(),
        }];
        if !s[0].points.is_empty() {
            write(
                "speed.svg",
                &line_chart(
                    "Decode speed vs effective bits",
                    "effective bits",
                    "tokens/s",
                    &s,
                )?,
            )?;
            md.push_str("\n## Decode speed\n\n![tokens/s vs effective bits](speed.svg)\n");
        }
        md.push_str("\n| source | weights | effective bits | tokens/s |\n|---|---|---|---|\n");
        for s in &speeds {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.2} |",
                s.source,
                s.weights,
                s.bits.map_or("full".into(), |b| format!("{b:.3}")),
                s.tokens_per_sec
            );
        }
    }
    write("report.md", &md)?;
    staging.set_inputs(serde_json::json!({ "results": a.results, "plans": a.plans }));
    staging.publish()?;
    println!("report written to {}", a.out.join("report.md").display());
    Ok(())
}
