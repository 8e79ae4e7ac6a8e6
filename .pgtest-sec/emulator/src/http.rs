//! The emulator on the wire: HTTP/1.1 with keep-alive, served by hyper on a tokio runtime of
//! its own. Every connection is served as soon as it is accepted, however many stay open
//! (tiny_http, used before, could leave a new connection unread behind idle keep-alive ones
//! until the client gave up: a 30 s "outage" in the middle of a benchmark).

use super::{Contract, Incoming, Reply};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;

pub(crate) struct Server {
    port: u16,
    /// Dropped (without waiting) with the emulator: the listener and every connection close.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Server {
    pub(crate) fn start(
        bind: &str,
        threads: usize,
        contract: Arc<Contract>,
    ) -> std::io::Result<Server> {
        // Bound here, before anything runs, so that a port in use is the caller's error.
        let listener = std::net::TcpListener::bind(bind)?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("certyo-emulator")
            .enable_io()
            .enable_time()
            .build()?;
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        runtime.spawn(accept(listener, contract));
        Ok(Server {
            port,
            runtime: Some(runtime),
        })
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Serve until the process ends.
    pub(crate) fn wait(self) {
        loop {
            std::thread::park();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn accept(listener: tokio::net::TcpListener, contract: Arc<Contract>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: say so and try again shortly.
                eprintln!("certyo-emulator: cannot accept a connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        // Small answers go out at once, not after a delayed ACK.
        let _ = stream.set_nodelay(true);
        let contract = contract.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let contract = contract.clone();
                async move { Ok::<_, Infallible>(answer(&contract, request).await) }
            });
            // A connection the client closes or breaks ends here; nothing to report.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    contract: &Contract,
    request: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    // A body that is not UTF-8 is no JSON either: the contract answers 400.
    let body = std::str::from_utf8(&body).unwrap_or_default();
    let incoming = Incoming {
        method: &parts.method,
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or_default(),
        api_key: parts.headers.get("X-API-Key").and_then(|v| v.to_str().ok()),
        body,
    };
    match contract.handle(&incoming) {
        Reply::Never => std::future::pending().await,
        Reply::Answer {
            status,
            body,
            retry_after,
            delay,
        } => {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
            *response.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let headers = response.headers_mut();
            headers.insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            if let Some(seconds) = retry_after {
                headers.insert(hyper::header::RETRY_AFTER, seconds.into());
            }
            response
        }
    }
}
