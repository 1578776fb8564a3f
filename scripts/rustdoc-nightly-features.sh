#!/usr/bin/env sh
# rustdoc with nightly features allowed (`doc_cfg`, as docs.rs's nightly rustdoc allows them), for
# `RUSTDOC=` of `cargo doc`. Only rustdoc sees RUSTC_BOOTSTRAP: build scripts that watch it
# (proc-macro2's) would otherwise rerun, and the whole tree be rebuilt, at every switch between a
# build and the docs.
RUSTC_BOOTSTRAP=1 exec rustdoc "$@"
