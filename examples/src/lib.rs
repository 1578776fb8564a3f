//! Runnable examples live in `examples/`; run one with `cargo run -p postgres-entra-examples --example NAME`.
