//! The routes that describe the server: the web page, `/health`, `/metrics`
//! and `/v1/models` (with the operating points the model offers and their
//! measured latency).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::AppState;

/// The built-in chat page (one file, embedded in the binary).
const INDEX_HTML: &str = include_str!("../web/index.html");

/// `GET /`: the chat page.
pub async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

/// `GET /health`: liveness, and the queue.
pub async fn health(State(st): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let (queued, running) = st.scheduler.load();
    let status = if st.scheduler.is_shutting_down() {
        "shutting_down"
    } else {
        "ok"
    };
    Json(json!({"status": status, "queued": queued, "running": running}))
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.encode(),
    )
        .into_response()
}

/// `GET /v1/models`: the one model served, with dpllm's extension.
pub async fn models(State(st): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let info = st.scheduler.info();
    let profile = st.scheduler.profile();
    let (now, load) = profile.snapshot();
    let latency: Vec<_> = (now.iter().zip(profile.alone()))
        .map(|(l, a)| {
            json!({"operating_point": l.point.label(), "point": l.point,
            "ms_per_token": l.ms_per_token, "ms_per_token_alone": a.ms_per_token})
        })
        .collect();
    Json(json!({
        "object": "list",
        "data": [{
            "id": info.name,
            "object": "model",
            "created": 0,
            "owned_by": "dpllm",
            "dpllm": {
                "context": info.context,
                "budget_bits": info.budget,
                "bits": info.bits,
                "highest_bits": info.highest_bits,
                "targets": info.targets,
                "default": info.default,
                "latency_profile": latency,
                "load_factor": load,
            }
        }]
    }))
}
