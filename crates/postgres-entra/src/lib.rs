//! Microsoft Entra ID token login for PostgreSQL pools (core).
//!
//! Work in progress: the token source and shared cache, the Azure bridge, claims, scopes, TLS and
//! `connect` land here next (see the repository's README and ARCHITECTURE notes).
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
