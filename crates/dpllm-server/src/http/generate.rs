//! `/v1/chat/completions` and `/v1/completions`: check the request, build the
//! prompt, queue it, and answer whole or as server-sent events. A client that
//! goes away drops the event channel, which cancels its request.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use dpllm_engine::chat_template::ChatMessage;
use futures_util::stream::{self, Stream, StreamExt};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{from_value, AppState, JsonBody};
use crate::api::params::gen_params;
use crate::api::request::{
    ChatMessageIn, ChatRequest, CommonParams, CompletionRequest, Content, Prompt,
};
use crate::api::response::{Endpoint, Reply};
use crate::error::ApiError;
use crate::scheduler::{Event, GenParams, Job};

/// `POST /v1/chat/completions`: the messages through the model's chat template.
pub async fn chat(
    State(st): State<Arc<AppState>>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let req: ChatRequest = from_value(&body)?;
    let common: CommonParams = from_value(&body)?;
    let params = gen_params(&common, &st.cfg.limits)?;
    let messages = chat_messages(req.messages)?;
    let tok = st.tok.clone();
    let prompt = blocking(move || {
        let tpl = tok.chat_template().ok_or_else(|| {
            ApiError::bad_request("this model has no chat template: use /v1/completions")
        })?;
        let text = tpl.render(&messages, true)?;
        Ok(tok.encode(&text, false)?)
    })
    .await?;
    let job = (prompt, params, received);
    answer(&st, Endpoint::Chat, &common, job, "messages").await
}

/// `POST /v1/completions`: the prompt as given.
pub async fn completions(
    State(st): State<Arc<AppState>>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let req: CompletionRequest = from_value(&body)?;
    let common: CommonParams = from_value(&body)?;
    let params = gen_params(&common, &st.cfg.limits)?;
    let text = match req.prompt {
        Prompt::One(s) => s,
        Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Many(v) => {
            return Err(ApiError::invalid(
                "prompt",
                format!("one prompt per request, got {}", v.len()),
            ))
        }
    };
    let tok = st.tok.clone();
    let prompt = blocking(move || Ok(tok.encode(&text, true)?)).await?;
    let job = (prompt, params, received);
    answer(&st, Endpoint::Completion, &common, job, "prompt").await
}

/// The chat messages of a request (text content only).
fn chat_messages(msgs: Vec<ChatMessageIn>) -> Result<Vec<ChatMessage>, ApiError> {
    if msgs.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    msgs.into_iter()
        .enumerate()
        .map(|(i, m)| {
            if m.role.trim().is_empty() {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    "a message needs a role",
                ));
            }
            let content = match m.content {
                Content::Empty => String::new(),
                Content::Text(s) => s,
                Content::Parts(parts) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => s.push_str(&t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content"),
                                    format!("only text content is supported (got a {kind:?} part)"),
                                ))
                            }
                        }
                    }
                    s
                }
            };
            Ok(ChatMessage::new(m.role, content))
        })
        .collect()
}

/// `f` on a blocking thread (tokenizing and templating are CPU work).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("worker failed: {e}"),
        )
    })?
}

fn engine_stopped() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the engine stopped before the request finished",
    )
}

/// Queue the prompt and answer: whole, or streamed when `common.stream`.
/// Errors found before the first token (a plan that does not load, a full
/// queue) are HTTP errors; later ones end the stream with an error event.
async fn answer(
    st: &AppState,
    endpoint: Endpoint,
    common: &CommonParams,
    (prompt, mut params, received): (Vec<u32>, GenParams, Instant),
    prompt_field: &str,
) -> Result<Response, ApiError> {
    let sched = &st.scheduler;
    let info = sched.info();
    info.check(params.point, !sched.profile().is_empty())?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(prompt_field, "the prompt is empty"));
    }
    let limit = st
        .cfg
        .limits
        .max_prompt_tokens
        .min(info.context.saturating_sub(1));
    if prompt.len() > limit {
        return Err(ApiError::invalid(
            prompt_field,
            format!(
                "the prompt is {} tokens; this server takes at most {limit}",
                prompt.len()
            ),
        ));
    }
    if let Some(&(id, _)) = params
        .logit_bias
        .iter()
        .find(|(id, _)| *id as usize >= info.vocab)
    {
        return Err(ApiError::invalid(
            "logit_bias",
            format!("token {id} is not in the vocabulary of {}", info.vocab),
        ));
    }
    params.max_tokens = params.max_tokens.min(info.context - prompt.len());
    let (events, mut rx) = unbounded_channel();
    sched.submit(Job {
        prompt,
        params,
        events,
        received,
    })?;
    match rx.recv().await {
        Some(Event::Started) => {}
        Some(Event::Failed(e)) => return Err(e),
        _ => return Err(engine_stopped()),
    }
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let reply = Reply::new(endpoint, n, created, &st.cfg.model_name);
    if common.stream.unwrap_or(false) {
        let usage = common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        return Ok(stream_answer(reply, rx, usage).into_response());
    }
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Started => {}
            Event::Text(t) => text.push_str(&t),
            Event::Done(s) => return Ok(Json(reply.full(&text, &s)).into_response()),
            Event::Failed(e) => return Err(e),
        }
    }
    Err(engine_stopped())
}

/// `data: <json>`.
fn data(v: serde_json::Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

/// The server-sent events of an answer: chunks as the text comes, the finish
/// chunk (with dpllm's extension), the usage chunk when asked, `[DONE]`.
fn stream_answer(
    reply: Reply,
    rx: UnboundedReceiver<Event>,
    usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let head = stream::iter(reply.chunk_start().map(data));
    let body = UnboundedReceiverStream::new(rx).flat_map(move |ev| {
        let done = || SseEvent::default().data("[DONE]");
        let out = match ev {
            Event::Started => vec![],
            Event::Text(t) => vec![data(reply.chunk_text(&t))],
            Event::Done(s) => {
                let mut v = vec![data(reply.chunk_finish(&s))];
                if usage {
                    v.push(data(reply.chunk_usage(&s)));
                }
                v.push(done());
                v
            }
            Event::Failed(e) => vec![data(e.body()), done()],
        };
        stream::iter(out)
    });
    Sse::new(head.chain(body).map(Ok)).keep_alive(KeepAlive::default())
}
