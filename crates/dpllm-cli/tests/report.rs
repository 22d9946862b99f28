//! `dpllm report`: a Markdown report with SVG plots from the JSON results of
//! real runs (perplexity with --compare-to, bench decode) and a plan file.

mod common;

use common::{fails, ok, s};
use dpllm_format::plan::{EstimatorSpec, LinearPlan, Plan, PlanKind, PLAN_FORMAT, PLAN_VERSION};
use dpllm_format::ModelConfig;

fn svg_ok(p: &std::path::Path) -> String {
    let t = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(
        t.starts_with("<svg") && t.trim_end().ends_with("</svg>") && t.len() > 1000,
        "{} is not a plot",
        p.display()
    );
    t
}

#[test]
fn report_plots_perplexity_kl_plans_and_speed() {
    let common::Quantized {
        dir: t,
        model: m,
        text,
        q,
    } = common::tiny_quantized(21);
    let mut results = Vec::new();
    for bits in ["3", "5", "8"] {
        let json = t.path().join(format!("uniform-{bits}.json"));
        ok(&[
            "perplexity",
            s(&q),
            "--bits",
            bits,
            "--compare-to",
            s(&m),
            "--text",
            s(&text),
            "--ctx",
            "32",
            "--max-chunks",
            "2",
            "--json",
            s(&json),
        ]);
        results.push(json);
    }
    let bench = t.path().join("bench.json");
    ok(&[
        "bench",
        "decode",
        s(&q),
        "--bits",
        "4",
        "--tokens",
        "2",
        "--prompt-tokens",
        "4",
        "--bandwidth-mib",
        "8",
        "--json",
        s(&bench),
    ]);
    results.push(bench);
    // A plan for the tiny model: every linear at 3.5 bits on average.
    let cfg = ModelConfig::from_dir(&q).unwrap();
    let linears = cfg
        .linears()
        .iter()
        .enumerate()
        .map(|(i, l)| LinearPlan {
            name: l.prefix.clone(),
            size: l.size(),
            max_bits: 5,
            avg_bits: 3.0 + (i % 3) as f32 * 0.5,
            low_bits: 3,
            high_bits: 4,
            threshold: 0.5,
            estimator: EstimatorSpec::Linear {
                a: 0.1,
                c: 0.0,
                r2: 0.9,
            },
        })
        .collect();
    let plan = Plan {
        format: PLAN_FORMAT.into(),
        version: PLAN_VERSION,
        kind: PlanKind::Dynamic,
        budget_bits: 5.0,
        target_bits: 3.5,
        min_bits: 3,
        max_bits: 5,
        async_estimation: true,
        calibration: Default::default(),
        linears,
    };
    let plan_file = t.path().join("target-3.50.json");
    plan.save(&plan_file).unwrap();

    let out = t.path().join("report");
    let mut args: Vec<&str> = vec!["report"];
    args.extend(results.iter().map(|p| s(p)));
    args.extend(["--plans", s(&plan_file), "--out", s(&out)]);
    let (stdout, _) = ok(&args);
    assert!(stdout.contains("report.md"), "{stdout}");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for want in [
        "perplexity.svg",
        "kl.svg",
        "speed.svg",
        "plan-0-target-3.50.svg",
        "uniform-3",
        "top-1 agreement",
    ] {
        assert!(md.contains(want), "report.md lacks {want}:\n{md}");
    }
    let ppl = svg_ok(&out.join("perplexity.svg"));
    assert_eq!(
        ppl.matches("<circle").count(),
        3,
        "one marker per perplexity result"
    );
    let labels: Vec<&str> = ppl.lines().map(str::trim).collect();
    assert!(
        labels.contains(&"uniform") && !labels.contains(&"uniform-3"),
        "the three runs form one 'uniform' line"
    );
    svg_ok(&out.join("kl.svg"));
    svg_ok(&out.join("speed.svg"));
    let heat = svg_ok(&out.join("plan-0-target-3.50.svg"));
    assert!(
        heat.contains("down_proj") && heat.contains("layer 1"),
        "heat map labels"
    );
    // The report directory is dpllm's: replaced with --force only; inputs that are not results are errors.
    fails(&args, &["already exists", "--force"]);
    args.push("--force");
    ok(&args);
    fails(
        &["report", s(&text), "--out", s(&t.path().join("r2"))],
        &["text.txt", "not JSON"],
    );
    std::fs::write(t.path().join("other.json"), "{\"x\": 1}").unwrap();
    fails(
        &[
            "report",
            s(&t.path().join("other.json")),
            "--out",
            s(&t.path().join("r2")),
        ],
        &["other.json", "not a result"],
    );
}

#[test]
fn plans_of_two_budgets_draw_two_lines_per_method() {
    let t = tempfile::tempdir().unwrap();
    let mut args = vec!["report".to_string()];
    for (i, (budget, target, bits, ppl)) in [
        (5.0, 3.5, 3.49, 21.0),
        (5.0, 4.0, 4.01, 20.5),
        (4.0, 3.5, 3.5, 21.5),
        (4.0, 3.75, 3.74, 21.2),
    ]
    .into_iter()
    .enumerate()
    {
        let f = t.path().join(format!("r{i}.json"));
        let v = serde_json::json!({"perplexity": ppl, "effective_bits": bits, "method": "dp-llm", "target": target, "budget": budget});
        std::fs::write(&f, v.to_string()).unwrap();
        args.push(f.display().to_string());
    }
    let out = t.path().join("report");
    args.extend(["--out".to_string(), out.display().to_string()]);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let ppl = svg_ok(&out.join("perplexity.svg"));
    assert!(
        ppl.contains("dp-llm, budget 5") && ppl.contains("dp-llm, budget 4"),
        "one line per budget"
    );
}
