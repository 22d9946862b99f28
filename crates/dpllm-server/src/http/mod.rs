//! The HTTP side (axum): routes, the API key check, the body limit, request
//! metrics, and JSON bodies parsed into OpenAI-style errors. Handlers talk to
//! the engine thread only through the [`Scheduler`].

mod generate;
mod info;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use dpllm_engine::tokenizer::TextTokenizer;
use serde::de::DeserializeOwned;

use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::scheduler::Scheduler;

/// What every handler sees.
pub struct AppState {
    /// The engine thread.
    pub scheduler: Arc<Scheduler>,
    /// The model's tokenizer and chat template.
    pub tok: Arc<TextTokenizer>,
    /// Settings.
    pub cfg: ServerConfig,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Number of the next answer (its id).
    pub next_id: AtomicU64,
}

/// Routes that answer without an API key: the health check and the web page
/// (static files holding no data; the page sends the key it is given).
const OPEN_ROUTES: [&str; 2] = ["/health", "/"];

/// The server's routes on `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.cfg.limits.max_body_bytes;
    Router::new()
        .route("/", get(info::index))
        .route("/health", get(info::health))
        .route("/metrics", get(info::metrics))
        .route("/v1/models", get(info::models))
        .route("/v1/chat/completions", post(generate::chat))
        .route("/v1/completions", post(generate::completions))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}

/// With an API key set, every route but [`OPEN_ROUTES`] needs
/// `Authorization: Bearer <key>`.
async fn authorize(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(key) = &st.cfg.api_key else {
        return next.run(req).await;
    };
    if OPEN_ROUTES.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "invalid API key").into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing API key: send Authorization: Bearer <key>",
        )
        .into_response(),
    }
}

/// Equal byte strings, compared in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Count every answered request by route and status.
async fn count(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |p| p.as_str())
        .to_string();
    let r = next.run(req).await;
    st.metrics.request(&route, r.status().as_u16());
    r
}

/// A request body parsed as a JSON object: a too-large body is a 413, bad
/// JSON a 400.
pub struct JsonBody(pub serde_json::Value);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
        if !v.is_object() {
            return Err(ApiError::bad_request(
                "invalid JSON body: expected an object",
            ));
        }
        Ok(JsonBody(v))
    }
}

/// `v` read as `T`; a field of the wrong type or a missing one is a 400 naming it.
pub fn from_value<T: DeserializeOwned>(v: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match path.as_str() {
            "." | "" => ApiError::bad_request(format!("invalid request: {inner}")),
            p => ApiError::invalid(p, format!("invalid request at {p}: {inner}")),
        }
    })
}
