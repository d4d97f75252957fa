//! Logs (tracing) and metrics (Prometheus text on `/metrics`), plus `/healthz`.

pub mod csi_calls;
pub mod events;
pub mod jobs;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::metrics::{family::Family, gauge::Gauge};
use prometheus_client::registry::Registry;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// The crate version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit the binary was built from (set by `build.rs`).
pub const COMMIT: &str = env!("STOWAGE_GIT_COMMIT");
/// What `stowage --version` prints after the name.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("STOWAGE_GIT_COMMIT"),
    ")"
);

/// The registry a role serves on `/metrics`. It holds
/// `stowage_build_info{version,commit} 1`, whatever the role; the role adds
/// its own metrics under its prefix with
/// [`Registry::sub_registry_with_prefix`].
pub fn registry() -> Registry {
    let mut registry = Registry::default();
    let info = Family::<[(&'static str, &'static str); 2], Gauge>::default();
    info.get_or_create(&[("version", VERSION), ("commit", COMMIT)])
        .set(1);
    registry.register(
        "stowage_build_info",
        "The running stowage's version and git commit, always 1",
        info,
    );
    registry
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default filter.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,kube_runtime=warn,tower=warn,hyper=warn"));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        // Colour only for a person at a terminal: `kubectl logs` and log
        // collectors would show the escape codes as text.
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_target(false)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            )
            .init(),
    }
}

/// Resolves on SIGTERM or Ctrl-C: every role stops on it.
pub async fn shutdown_signal() {
    stop_signals()
        .expect("installing SIGTERM and SIGINT handlers")
        .await;
}

/// Installs the SIGTERM and SIGINT handlers before it returns, so that a
/// signal from then on is never the default "die at once"; the future
/// resolves on the first of them, with its name.
pub fn stop_signals() -> std::io::Result<impl Future<Output = &'static str> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

/// Answers whether the process can do its job; backs `/healthz`.
pub trait Health: Send + Sync + 'static {
    fn healthy(&self) -> Result<(), String>;
}

/// For processes whose liveness is simply that they answer.
pub struct AlwaysHealthy;

impl Health for AlwaysHealthy {
    fn healthy(&self) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Clone)]
struct HttpState {
    registry: Arc<Registry>,
    health: Arc<dyn Health>,
    readiness: Arc<dyn Health>,
}

/// Serves `/metrics`, `/healthz` (liveness: restart me if this fails) and
/// `/readyz` (readiness: I do my job here) until the process ends.
pub async fn serve_http(
    addr: SocketAddr,
    registry: Arc<Registry>,
    health: Arc<dyn Health>,
    readiness: Arc<dyn Health>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(HttpState {
            registry,
            health,
            readiness,
        });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "serving /metrics and /healthz");
    axum::serve(listener, app).await
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            e.to_string(),
        ),
    }
}

async fn healthz(State(state): State<HttpState>) -> impl IntoResponse {
    answer(state.health.as_ref())
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    answer(state.readiness.as_ref())
}

fn answer(check: &dyn Health) -> (StatusCode, String) {
    match check.healthy() {
        Ok(()) => (StatusCode::OK, "ok".to_string()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason),
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[test]
    fn build_info_is_unprefixed_beside_a_roles_metrics() {
        let mut root = registry();
        root.sub_registry_with_prefix("stowage_node").register(
            "things",
            "Things",
            Counter::<u64>::default(),
        );
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &root).unwrap();
        let info = format!("\nstowage_build_info{{version=\"{VERSION}\",commit=\"{COMMIT}\"}} 1\n");
        assert!(body.contains(&info), "{body}");
        assert!(body.contains("\nstowage_node_things_total 0\n"), "{body}");
        assert_eq!(body.matches("build_info").count(), 3, "{body}");
    }

    #[test]
    fn version_names_the_commit() {
        assert_eq!(LONG_VERSION, format!("{VERSION} (commit {COMMIT})"));
        assert!(!COMMIT.is_empty());
    }
}
