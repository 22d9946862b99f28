//! The server on a GPU (`--device cuda`): concurrent requests at different
//! operating points, decoded in shared batched steps, get what each gets
//! alone (there, single steps replay as CUDA graphs with the precision
//! decided inside the GEMV), a request with a logit bias among them; and
//! what the CPU gives. Skips without a GPU.

mod common;

use common::{answer_text, greedy, Client};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_the_gpu_batched_requests_get_what_each_gets_alone() {
    if dpllm_engine::backend::cuda::test_device(0).is_none() {
        return;
    }
    let f = common::quantized();
    let backend = dpllm_engine::backend::cuda::CudaBackend::new(0).unwrap();
    let gpu = common::start_on(backend, &f.model, Some(common::BUDGET), common::config());
    let cpu = common::start(&f.model, Some(common::BUDGET), common::config());
    let (g, c) = (Client::new(&gpu), Client::new(&cpu));
    let points = [
        json!({"target_bits": 3.5}),
        json!({"target_bits": 4.5}),
        json!({"bits": 3}),
        json!({"target_bits": 3.5}),
    ];
    // Requests 1 and 3 keep `greedy`'s logit bias (EOS banned): their rows'
    // logits come back to the host while 0 and 2 (no bias, may stop at EOS)
    // have their tokens chosen on the device, in the same batched steps.
    let body = |i: usize| {
        let mut b = json!({"prompt": format!("request {i}"), "dpllm": points[i]});
        if i.is_multiple_of(2) {
            b["logit_bias"] = json!({});
        }
        greedy(96, b)
    };
    let (mut alone, mut on_cpu) = (Vec::new(), Vec::new());
    for i in 0..points.len() {
        let v = g.post("/v1/completions", &body(i)).await.body;
        alone.push((answer_text(&v), v["dpllm"]["effective_bits"].clone()));
        let v = c.post("/v1/completions", &body(i)).await.body;
        on_cpu.push((answer_text(&v), v["dpllm"]["effective_bits"].clone()));
    }
    let together = futures_util::future::join_all((0..points.len()).map(|i| {
        let g = &g;
        async move { g.post("/v1/completions", &body(i)).await.body }
    }))
    .await;
    let steps = g.metric("dpllm_batch_size_count").await;
    let rows = g.metric("dpllm_batch_size_sum").await;
    eprintln!("GPU: {rows} request-steps in {steps} steps");
    let same_as_cpu = alone.iter().zip(&on_cpu).filter(|(a, b)| a == b).count();
    eprintln!(
        "GPU alone equal to the CPU: {same_as_cpu} of {}",
        alone.len()
    );
    for (i, v) in together.iter().enumerate() {
        assert_eq!(
            (answer_text(v), v["dpllm"]["effective_bits"].clone()),
            alone[i],
            "request {i} batched on the GPU must get what it gets alone"
        );
    }
    gpu.shutdown().unwrap();
    cpu.shutdown().unwrap();
}
