//! Portcullis: an authentication gateway for media servers. A Pingora proxy authenticates every
//! request in-process against an in-memory revocation view kept in sync with a store, and
//! forwards only live sessions to the unmodified upstream.
//!
//! `main.rs` parses the command line and dispatches to `cli`; everything else lives here so the
//! tests can reach it.

pub mod app;
pub mod auth;
pub mod backup;
pub mod cli;
pub mod config;
pub mod datadir;
pub mod healthcheck;
pub mod mediaserver;
pub mod metrics;
pub mod oidc;
pub mod paths;
pub mod probe;
pub mod proxy;
pub mod readiness;
pub mod revocation;
pub mod server;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod web;

/// Asks the allocator to hand memory freed by a large transient build (the revocation view
/// loaded from a snapshot) back to the operating system, so the resident size reflects what is
/// kept. The binary's global allocator is mimalloc; where it is not (tests of the library), this
/// only tidies mimalloc's own, unused heap.
pub fn release_free_memory() {
    // SAFETY: mi_collect takes no pointers and may be called at any time from any thread.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
