//! End-to-end tests across the crates live in `tests/`; they run against the local emulator.
//! The repository README's examples are compiled here as doctests.

#[doc = include_str!("../../README.md")]
mod readme {}
