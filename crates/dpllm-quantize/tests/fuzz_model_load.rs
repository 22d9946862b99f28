//! Property tests over loading a whole quantized model and its plans from
//! corrupt bytes: any small mutation of the any-precision weights file, the
//! config or a plan file gives `Ok` (and then a forward pass that returns `Ok`
//! or an error) or a clear error, never a panic.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use dpllm_engine::{LoadOptions, Model, Precision, RuntimePlan};
use dpllm_format::anyprec::ANYPREC_WEIGHTS;
use dpllm_format::plan::{EstimatorSpec, LinearPlan, Plan, PlanKind, PLAN_FORMAT, PLAN_VERSION};
use dpllm_quantize::model_quant::{quantize_model, QuantizeOptions};
use dpllm_testkit::{write_tiny_model, TinySpec};
use proptest::prelude::*;

/// A tiny quantized model, made once per test binary.
fn quantized() -> &'static (tempfile::TempDir, PathBuf) {
    static Q: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    Q.get_or_init(|| {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        write_tiny_model(
            &src,
            &TinySpec {
                layers: 1,
                ..TinySpec::default()
            },
            1,
        )
        .unwrap();
        let q = t.path().join("q");
        quantize_model(&src, &q, &QuantizeOptions::default()).unwrap();
        (t, q)
    })
}

/// A copy of the quantized model in a fresh directory.
fn copy_model(to: &Path) -> PathBuf {
    let (_, q) = quantized();
    let dst = to.join("q");
    std::fs::create_dir(&dst).unwrap();
    for e in std::fs::read_dir(q).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
    dst
}

fn mutate(path: &Path, edits: &[(usize, u8)], truncate: Option<usize>) {
    let mut b = std::fs::read(path).unwrap();
    let n = b.len();
    for &(i, v) in edits {
        b[i % n] = v;
    }
    if let Some(t) = truncate {
        b.truncate(t % (n + 1));
    }
    std::fs::write(path, b).unwrap();
}

/// Load and, when that works, run two tokens: Ok or Err, nothing else.
fn load_and_run(dir: &Path) {
    for opts in [
        LoadOptions::default(),
        LoadOptions {
            max_bits: Some(4),
            ..Default::default()
        },
    ] {
        if let Ok(m) = Model::load_with(dir, &opts) {
            let mut cache = m.new_cache(8);
            let _ = m.forward_all(&[1, 2], &mut cache);
        }
    }
}

/// A DP-LLM plan for the tiny model: every linear between 3 and 4 bits.
fn plan(model: &Model) -> Plan {
    Plan {
        format: PLAN_FORMAT.into(),
        version: PLAN_VERSION,
        kind: PlanKind::Dynamic,
        budget_bits: 4.0,
        target_bits: 3.5,
        min_bits: 3,
        max_bits: 4,
        async_estimation: true,
        calibration: Default::default(),
        linears: model
            .config
            .linears()
            .iter()
            .map(|s| LinearPlan {
                name: s.prefix.clone(),
                size: s.size(),
                max_bits: 4,
                avg_bits: 3.5,
                low_bits: 3,
                high_bits: 4,
                threshold: 0.5,
                estimator: EstimatorSpec::Linear {
                    a: 0.1,
                    c: 0.0,
                    r2: 0.9,
                },
            })
            .collect(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_weights_load_or_fail_cleanly(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        truncate in proptest::option::of(any::<usize>()),
    ) {
        let t = tempfile::tempdir().unwrap();
        let q = copy_model(t.path());
        mutate(&q.join(ANYPREC_WEIGHTS), &edits, truncate);
        load_and_run(&q);
    }

    #[test]
    fn mutated_weight_headers_load_or_fail_cleanly(edits in proptest::collection::vec((0usize..4096, b' '..=b'~'), 1..6)) {
        let t = tempfile::tempdir().unwrap();
        let q = copy_model(t.path());
        let w = q.join(ANYPREC_WEIGHTS);
        let header = u64::from_le_bytes(std::fs::read(&w).unwrap()[..8].try_into().unwrap()) as usize;
        let edits: Vec<(usize, u8)> = edits.into_iter().map(|(i, v)| (8 + i % header, v)).collect();
        mutate(&w, &edits, None);
        load_and_run(&q);
    }

    #[test]
    fn mutated_configs_load_or_fail_cleanly(edits in proptest::collection::vec((any::<usize>(), b' '..=b'~'), 1..6)) {
        let t = tempfile::tempdir().unwrap();
        let q = copy_model(t.path());
        mutate(&q.join("config.json"), &edits, None);
        load_and_run(&q);
    }

    #[test]
    fn mutated_plans_load_or_fail_cleanly(
        edits in proptest::collection::vec((any::<usize>(), b' '..=b'~'), 1..6),
        truncate in proptest::option::of(any::<usize>()),
    ) {
        let t = tempfile::tempdir().unwrap();
        let (_, q) = quantized();
        let model = Model::load_with(q, &LoadOptions { max_bits: Some(4), ..Default::default() }).unwrap();
        let p = t.path().join("target-3.50.json");
        plan(&model).save(&p).unwrap();
        mutate(&p, &edits, truncate);
        if let Ok(rp) = RuntimePlan::load(&p, &model) {
            let mut cache = model.new_cache(8);
            let _ = model.forward_hidden_with(&[1, 2, 3], &mut cache, Precision::Dynamic(&rp), None);
        }
    }
}
