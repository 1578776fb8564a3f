//! An `azure_core` HTTP client that sends every request to the loopback mock, whatever host the
//! credential targets (`login.microsoftonline.com`, the IMDS address, ...). azure_identity insists
//! on an `https` authority, so this is how its real credential types are pointed at the emulator.

use azure_core::http::{AsyncRawResponse, HttpClient, Request};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Rewrites each request to `http://127.0.0.1:<mock port>` keeping path and query, then sends it.
#[derive(Debug)]
pub struct LoopbackTransport {
    target: SocketAddr,
    inner: Arc<dyn HttpClient>,
    original_hosts: Mutex<Vec<String>>,
}

impl LoopbackTransport {
    /// A transport that sends everything to `target`, which must be a loopback address.
    ///
    /// # Panics
    /// If `target` is not a loopback address: this type exists to keep tests on this machine.
    pub fn new(target: SocketAddr) -> Arc<Self> {
        assert!(
            target.ip().is_loopback(),
            "LoopbackTransport only sends to loopback, not {target}"
        );
        Arc::new(Self {
            target,
            inner: azure_core::http::new_http_client(None),
            original_hosts: Mutex::new(Vec::new()),
        })
    }

    /// The hosts the redirected requests were originally addressed to, in order.
    pub fn original_hosts(&self) -> Vec<String> {
        self.original_hosts.lock().expect("hosts lock").clone()
    }

    /// `azure_core` client options whose transport is this one, without azure_core's own retries
    /// (as the README recommends: the token cache's backoff is the one retry policy).
    pub fn client_options(self: &Arc<Self>) -> azure_core::http::ClientOptions {
        azure_core::http::ClientOptions {
            transport: Some(azure_core::http::Transport::new(self.clone())),
            retry: azure_core::http::RetryOptions::none(),
            ..Default::default()
        }
    }

    /// [`LoopbackTransport::client_options`] with azure_core's default retry policy, as a
    /// credential built with `None` options has.
    pub fn client_options_with_default_retries(
        self: &Arc<Self>,
    ) -> azure_core::http::ClientOptions {
        azure_core::http::ClientOptions {
            transport: Some(azure_core::http::Transport::new(self.clone())),
            ..Default::default()
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for LoopbackTransport {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let mut request = request.clone();
        let url = request.url_mut();
        self.original_hosts
            .lock()
            .expect("hosts lock")
            .push(url.host_str().unwrap_or_default().to_owned());
        let rewritten = url
            .set_scheme("http")
            .and_then(|()| url.set_ip_host(self.target.ip()))
            .and_then(|()| url.set_port(Some(self.target.port())));
        if rewritten.is_err() {
            return Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::Other,
                "LoopbackTransport could not rewrite the request URL",
            ));
        }
        self.inner.execute_request(&request).await
    }
}
