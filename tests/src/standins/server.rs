//! The one harness every HTTP stand-in runs on: its routes (an axum router) served on
//! 127.0.0.1, a port of its own, on a thread and runtime of its own, so that sync and async
//! tests alike can use it and a test's runtime never serves its own cloud; stopped (bounded)
//! when dropped.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub struct StandinServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StandinServer {
    /// Serves on `listener` a stand-in that routes every request itself (`handle`, with
    /// `state`), as the stand-ins checked against a vendor's contract do.
    pub fn serve_handler<H, T, S>(
        name: &str,
        listener: std::net::TcpListener,
        handle: H,
        state: S,
    ) -> StandinServer
    where
        H: axum::handler::Handler<T, S>,
        T: 'static,
        S: Clone + Send + Sync + 'static,
    {
        let routes = axum::Router::new().fallback(handle).with_state(state);
        Self::serve(name, listener, routes)
    }

    /// Serves `routes` on a port of its own.
    pub fn start(name: &str, routes: axum::Router) -> StandinServer {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind the stand-in");
        Self::serve(name, listener, routes)
    }

    /// Serves `routes` on `listener` (bound by a stand-in that names its own address in its
    /// answers, and so needed it first).
    pub fn serve(
        name: &str,
        listener: std::net::TcpListener,
        routes: axum::Router,
    ) -> StandinServer {
        let addr = listener.local_addr().expect("stand-in address");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking stand-in socket");
        let (started, running) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-standin"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("stand-in runtime");
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("stand-in listener");
                    let _ = started.send(());
                    let _ = axum::serve(listener, routes)
                        .with_graceful_shutdown(async {
                            let _ = stop_rx.await;
                        })
                        .await;
                });
            })
            .expect("stand-in thread");
        running
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("the {name} stand-in did not start"));
        StandinServer {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for StandinServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // Bounded: a client holding a connection open must not hang the test.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}
