//! Criterion benches live in `benches/`; they start the local emulator themselves.
