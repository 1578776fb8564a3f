//! Switching the emulator's faults on and off, and reading what it recorded: requests per
//! endpoint, tokens issued, logins checked.

use std::time::Duration;

use super::Emulator;
use crate::faults::{Endpoint, Fault};
use crate::shared::LoginAttempt;

impl Emulator {
    /// Every access token issued so far, by any path (to search captured output for leaks).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.issued()
    }

    /// Every login the server checked so far.
    pub fn logins(&self) -> Vec<LoginAttempt> {
        self.shared.logins()
    }

    /// Makes the mock identity provider's clock run `behind` ours from now on: the `exp` of the
    /// tokens it issues, and the `expires_on` the managed-identity endpoints report, move that much
    /// earlier (a token whose lifetime is shorter than the skew arrives already expired).
    pub fn set_idp_clock_behind(&self, behind: Duration) {
        self.shared.set_idp_clock_behind(behind);
    }

    /// Lifetime of tokens issued from now on.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.shared.set_token_lifetime(lifetime);
    }

    /// Makes the managed-identity endpoints answer from a cache of their own, as the platform's
    /// do (Microsoft documents a back-end cache per resource and that a refresh cannot be forced,
    /// not when it renews): the token last issued for an identity and resource, until less than
    /// `renew_within` of its life is left. `None` (the default): a new token for every request.
    pub fn cache_managed_identity_tokens(&self, renew_within: Option<Duration>) {
        self.shared.set_platform_cache(renew_within);
    }

    /// Requests received by `endpoint` so far (served, faulted or refused).
    pub fn requests(&self, endpoint: Endpoint) -> u64 {
        self.shared.faults.requests(endpoint)
    }

    /// Tokens issued by `endpoint` so far.
    pub fn tokens_issued(&self, endpoint: Endpoint) -> u64 {
        self.shared.faults.tokens_issued(endpoint)
    }

    /// Requests `endpoint` answered with an injected fault so far.
    pub fn faulted_requests(&self, endpoint: Endpoint) -> u64 {
        self.shared.faults.faulted(endpoint)
    }

    /// Serves `fault` from `endpoint` until cleared.
    pub fn set_fault(&self, endpoint: Endpoint, fault: Fault) {
        self.shared.faults.set_fault(endpoint, Some(fault), None);
    }

    /// Serves `fault` from `endpoint` for `duration` (an outage window), then recovers by itself.
    pub fn set_fault_for(&self, endpoint: Endpoint, fault: Fault, duration: Duration) {
        self.shared
            .faults
            .set_fault(endpoint, Some(fault), Some(duration));
    }

    /// Stops injecting faults at `endpoint`.
    pub fn clear_fault(&self, endpoint: Endpoint) {
        self.shared.faults.set_fault(endpoint, None, None);
    }

    /// Delays every answer from `endpoint` by `latency` (zero: none).
    pub fn set_latency(&self, endpoint: Endpoint, latency: Duration) {
        self.shared.faults.set_latency(endpoint, latency);
    }

    /// Clears faults and latency at every endpoint.
    pub fn heal(&self) {
        for endpoint in Endpoint::ALL {
            self.clear_fault(endpoint);
            self.set_latency(endpoint, Duration::ZERO);
        }
    }
}
