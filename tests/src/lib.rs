//! End-to-end tests across the crates live in `tests/`; they run against the local emulator.
