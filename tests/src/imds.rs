//! EC2's instance metadata service, the part an agent asks: IMDSv2 session tokens
//! (`PUT /latest/api/token` with a TTL header) and `spot/instance-action`, 404 until the
//! test posts a notice, refused (401) without a valid token. On a loopback port, on a thread
//! of its own, so that sync tests can use it too.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, put};

#[derive(Default)]
struct Inner {
    tokens: Vec<String>,
    action: Option<String>,
    /// Requests without a valid token, which IMDSv2 refuses.
    refused: usize,
}

pub struct Imds {
    pub address: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Imds {
    pub fn start() -> Imds {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        let state = inner.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the metadata stand-in");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind the metadata stand-in");
                let _ = address_tx.send(listener.local_addr().expect("its address"));
                let app = axum::Router::new()
                    .route("/latest/api/token", put(token))
                    .route(
                        "/latest/meta-data/spot/instance-action",
                        get(instance_action),
                    )
                    .with_state(state);
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        let address = address_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the metadata stand-in starts");
        Imds {
            address,
            inner,
            stop: Some(stop),
        }
    }

    /// From now on `spot/instance-action` answers this notice.
    pub fn post_instance_action(&self, action: &str, time: &str) {
        self.inner.lock().unwrap().action =
            Some(serde_json::json!({"action": action, "time": time}).to_string());
    }

    /// Session tokens handed out so far.
    pub fn tokens_issued(&self) -> usize {
        self.inner.lock().unwrap().tokens.len()
    }

    /// Requests refused for want of a valid token.
    pub fn refused(&self) -> usize {
        self.inner.lock().unwrap().refused
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

type Shared = Arc<Mutex<Inner>>;

async fn token(State(inner): State<Shared>, headers: HeaderMap) -> (StatusCode, String) {
    let ttl = headers
        .get("x-aws-ec2-metadata-token-ttl-seconds")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    match ttl {
        Some(1..=21_600) => {
            let mut inner = inner.lock().unwrap();
            let token = format!("AQAEA{:040}", inner.tokens.len() + 1);
            inner.tokens.push(token.clone());
            (StatusCode::OK, token)
        }
        _ => (StatusCode::BAD_REQUEST, String::new()),
    }
}

async fn instance_action(State(inner): State<Shared>, headers: HeaderMap) -> (StatusCode, String) {
    let mut inner = inner.lock().unwrap();
    let valid = headers
        .get("x-aws-ec2-metadata-token")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| inner.tokens.iter().any(|issued| issued == t));
    if !valid {
        inner.refused += 1;
        return (StatusCode::UNAUTHORIZED, String::new());
    }
    match &inner.action {
        Some(action) => (StatusCode::OK, action.clone()),
        None => (StatusCode::NOT_FOUND, String::new()),
    }
}
