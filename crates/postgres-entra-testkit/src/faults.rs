//! Per-endpoint request counters and switchable faults for the mock Entra endpoints.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A mock endpoint, for counting requests and injecting faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Endpoint {
    /// `POST /{tenant}/oauth2/v2.0/token` (client secret and client assertion).
    Token,
    /// The managed-identity endpoint (App Service `IDENTITY_ENDPOINT` and the IMDS path).
    ManagedIdentity,
    /// JWKS and OpenID discovery documents.
    Keys,
}

impl Endpoint {
    pub(crate) const ALL: [Endpoint; 3] =
        [Endpoint::Token, Endpoint::ManagedIdentity, Endpoint::Keys];

    fn index(self) -> usize {
        match self {
            Endpoint::Token => 0,
            Endpoint::ManagedIdentity => 1,
            Endpoint::Keys => 2,
        }
    }
}

/// A failure the mock serves instead of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// HTTP 500 with an Entra-style error body.
    ServerError,
    /// HTTP 429 with a `Retry-After` header of this many whole seconds.
    TooManyRequests {
        /// Value of the `Retry-After` header.
        retry_after: Duration,
    },
    /// HTTP 200 whose body is not valid JSON.
    MalformedBody,
    /// The connection is closed without a complete response.
    DropConnection,
}

#[derive(Debug, Default)]
struct Plan {
    fault: Option<Fault>,
    /// When set, the fault ends at this instant (an outage window).
    until: Option<Instant>,
    latency: Duration,
}

#[derive(Debug, Default)]
struct EndpointState {
    requests: AtomicU64,
    tokens: AtomicU64,
    faulted: AtomicU64,
    plan: Mutex<Plan>,
}

/// Counters and fault switches for all endpoints.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    endpoints: [EndpointState; 3],
}

/// What to do with a request that just arrived.
pub(crate) struct Verdict {
    pub(crate) latency: Duration,
    pub(crate) fault: Option<Fault>,
}

impl Faults {
    fn state(&self, endpoint: Endpoint) -> &EndpointState {
        &self.endpoints[endpoint.index()]
    }

    /// Counts a request and decides its fate.
    pub(crate) fn on_request(&self, endpoint: Endpoint) -> Verdict {
        let state = self.state(endpoint);
        state.requests.fetch_add(1, Ordering::SeqCst);
        let mut plan = state.plan.lock().expect("fault plan lock");
        if plan.until.is_some_and(|until| Instant::now() >= until) {
            plan.fault = None;
            plan.until = None;
        }
        if plan.fault.is_some() {
            state.faulted.fetch_add(1, Ordering::SeqCst);
        }
        Verdict {
            latency: plan.latency,
            fault: plan.fault,
        }
    }

    pub(crate) fn on_token_issued(&self, endpoint: Endpoint) {
        self.state(endpoint).tokens.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn requests(&self, endpoint: Endpoint) -> u64 {
        self.state(endpoint).requests.load(Ordering::SeqCst)
    }

    pub(crate) fn tokens_issued(&self, endpoint: Endpoint) -> u64 {
        self.state(endpoint).tokens.load(Ordering::SeqCst)
    }

    pub(crate) fn faulted(&self, endpoint: Endpoint) -> u64 {
        self.state(endpoint).faulted.load(Ordering::SeqCst)
    }

    pub(crate) fn set_fault(
        &self,
        endpoint: Endpoint,
        fault: Option<Fault>,
        for_: Option<Duration>,
    ) {
        let mut plan = self.state(endpoint).plan.lock().expect("fault plan lock");
        plan.fault = fault;
        plan.until = for_.map(|d| Instant::now() + d);
    }

    pub(crate) fn set_latency(&self, endpoint: Endpoint, latency: Duration) {
        self.state(endpoint)
            .plan
            .lock()
            .expect("fault plan lock")
            .latency = latency;
    }
}
