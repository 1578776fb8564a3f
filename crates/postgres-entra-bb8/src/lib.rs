//! Entra ID token login for bb8 pools.
//!
//! Work in progress: built on the `postgres-entra` core once it lands.
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
