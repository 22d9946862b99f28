//! `dpllm serve`: an OpenAI-compatible HTTP server on one loaded model whose
//! operating point every request chooses: a DP-LLM target, uniform bits, or a
//! latency budget the server turns into the best plan that meets it, with no
//! weights moved.
//!
//! - [`scheduler`]: the engine side: a bounded queue, continuous batching of
//!   the running requests (one batched forward call a decode step, each token
//!   at its own request's precision), operating points and the latency profile.
//! - [`http`]: the HTTP side (axum): OpenAI routes, server-sent events, the API
//!   key, limits, `/health`, `/metrics`, the built-in web page.
//! - [`api`]: the OpenAI request and response bodies and their checks.
//! - [`loadgen`]: concurrent streaming clients for `dpllm bench serve`.
//!
//! The engine runs on a thread of the caller's (the CLI's main thread), the
//! HTTP side on a tokio runtime of its own; they meet only in the
//! [`scheduler::Scheduler`]'s channel.

pub mod api;
pub mod config;
pub mod error;
pub mod http;
pub mod loadgen;
pub mod metrics;
pub mod scheduler;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use dpllm_engine::tokenizer::TextTokenizer;
use dpllm_engine::{Backend, EngineError, ServedModel};

pub use config::{Limits, ServerConfig};
pub use error::ApiError;
pub use scheduler::OperatingPoint;

use http::AppState;
use metrics::Metrics;
use scheduler::{Engine, Scheduler};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Loading, profiling or a setting of the model.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The address could not be bound, or the runtime failed.
    #[error("{0}")]
    Io(String),
}

/// A server whose engine is ready (latency profiled) but not yet serving.
pub struct Server<B: Backend> {
    state: Arc<AppState>,
    engine: Engine<B>,
}

impl<B: Backend> Server<B> {
    /// Profile `served` and make its engine and HTTP state.
    pub fn new(
        served: ServedModel<B>,
        tok: TextTokenizer,
        cfg: ServerConfig,
    ) -> Result<Server<B>, ServeError> {
        let metrics = Arc::new(Metrics::default());
        let tok = Arc::new(tok);
        let (scheduler, engine) = Scheduler::new(served, tok.clone(), &cfg, metrics.clone())?;
        let state = Arc::new(AppState {
            scheduler: Arc::new(scheduler),
            tok,
            cfg,
            metrics,
            next_id: AtomicU64::new(1),
        });
        Ok(Server { state, engine })
    }

    /// The latency profile measured at start-up.
    pub fn profile(&self) -> Vec<scheduler::Latency> {
        self.state.scheduler.profile().alone()
    }

    /// Serve on `cfg.addr` until SIGINT or SIGTERM, the engine on this thread;
    /// then refuse new requests, finish (or after the grace period cancel) the
    /// running ones, and return. `on_listening` is told the bound address.
    pub fn serve_blocking(self, on_listening: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
        let rt = runtime()?;
        let (listener, bound) = bind(self.state.cfg.addr)?;
        on_listening(bound);
        let state = self.state.clone();
        let http = rt.spawn(async move {
            let listener = tokio_listener(listener)?;
            serve_http(listener, state, shutdown_signal()).await
        });
        drop(self.state);
        self.engine.run();
        rt.block_on(http)
            .map_err(|e| ServeError::Io(format!("the HTTP server failed: {e}")))?
    }

    /// Serve with the engine on this thread (as `serve_blocking`) while
    /// `load` runs on another against the server's base URL; shut down when
    /// it returns: `dpllm bench serve`.
    pub fn drive<T: Send + 'static>(
        self,
        load: impl FnOnce(String) -> T + Send + 'static,
    ) -> Result<T, ServeError> {
        let rt = runtime()?;
        let (listener, bound) = bind(self.state.cfg.addr)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let state = self.state.clone();
        let http = rt.spawn(async move {
            serve_http(tokio_listener(listener)?, state, async {
                let _ = stopped.await;
            })
            .await
        });
        let scheduler = self.state.scheduler.clone();
        let driver = std::thread::spawn(move || {
            let out = load(format!("http://{bound}"));
            let _ = stop.send(());
            scheduler.shutdown();
            out
        });
        drop(self.state);
        self.engine.run();
        let out = driver
            .join()
            .map_err(|_| ServeError::Io("the load thread panicked".into()))?;
        rt.block_on(http)
            .map_err(|e| ServeError::Io(format!("the HTTP server failed: {e}")))??;
        Ok(out)
    }

    /// Serve on `cfg.addr` from threads of its own (tests, embedding): the
    /// handle's [`RunningServer::shutdown`] stops it.
    pub fn spawn(self) -> Result<RunningServer, ServeError> {
        let rt = runtime()?;
        let (listener, bound) = bind(self.state.cfg.addr)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let state = self.state.clone();
        let http = std::thread::spawn(move || {
            rt.block_on(async move {
                let listener = tokio_listener(listener)?;
                serve_http(listener, state, async {
                    let _ = stopped.await;
                })
                .await
            })
        });
        let engine = self.engine;
        let engine = std::thread::Builder::new()
            .name("dpllm-engine".into())
            .spawn(move || engine.run())
            .map_err(|e| ServeError::Io(format!("cannot start the engine thread: {e}")))?;
        Ok(RunningServer {
            addr: bound,
            scheduler: self.state.scheduler.clone(),
            stop: Some(stop),
            threads: Some((http, engine)),
        })
    }
}

/// Listen on `addr` (before any runtime runs, so a busy port is an error at once).
fn bind(addr: SocketAddr) -> Result<(std::net::TcpListener, SocketAddr), ServeError> {
    let l = std::net::TcpListener::bind(addr)
        .map_err(|e| ServeError::Io(format!("cannot listen on {addr}: {e}")))?;
    let bound = l.local_addr().map_err(|e| ServeError::Io(e.to_string()))?;
    l.set_nonblocking(true)
        .map_err(|e| ServeError::Io(e.to_string()))?;
    Ok((l, bound))
}

/// `l` on the current tokio runtime.
fn tokio_listener(l: std::net::TcpListener) -> Result<tokio::net::TcpListener, ServeError> {
    tokio::net::TcpListener::from_std(l).map_err(|e| ServeError::Io(e.to_string()))
}

/// The HTTP side's runtime: a few threads (the engine does the heavy work).
fn runtime() -> Result<tokio::runtime::Runtime, ServeError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("dpllm-http")
        .enable_all()
        .build()
        .map_err(|e| ServeError::Io(format!("cannot start the HTTP runtime: {e}")))
}

/// Serve `state` on `listener` until `stop`, then shut the scheduler and
/// wait for the open answers to end.
async fn serve_http(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let scheduler = state.scheduler.clone();
    let app = http::router(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            stop.await;
            tracing::info!("shutting down: finishing the requests in flight");
            scheduler.shutdown();
        })
        .await
        .map_err(|e| ServeError::Io(format!("the HTTP server failed: {e}")))
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// A server running on threads of its own.
pub struct RunningServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    scheduler: Arc<Scheduler>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The HTTP thread and the engine thread.
    threads: Option<(HttpThread, std::thread::JoinHandle<()>)>,
}

/// The thread serving HTTP until the server stops.
type HttpThread = std::thread::JoinHandle<Result<(), ServeError>>;

impl RunningServer {
    /// Requests waiting and running now.
    pub fn load(&self) -> (usize, usize) {
        self.scheduler.load()
    }

    /// Shut down as on SIGTERM and wait until both sides stopped.
    pub fn shutdown(mut self) -> Result<(), ServeError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), ServeError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.scheduler.shutdown();
        let Some((http, engine)) = self.threads.take() else {
            return Ok(());
        };
        let _ = engine.join();
        http.join()
            .map_err(|_| ServeError::Io("the HTTP thread panicked".into()))?
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}
