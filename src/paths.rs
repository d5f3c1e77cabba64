//! The gateway's own URL paths, shared by the pages (`web`), the proxy that routes to them and
//! the account logic that redirects to them (`app`). They live at the bottom of the module
//! layering so that every layer may name them.

/// The reserved path prefix of the gateway's own pages.
pub const PREFIX: &str = "/_portcullis";
pub const LOGIN_PATH: &str = "/_portcullis/login";
pub const ACCOUNT_PATH: &str = "/_portcullis/account";
/// Where a session that lacks a factor an access rule needs is sent.
pub const STEP_UP_PATH: &str = "/_portcullis/step-up";
/// The forward-auth endpoint, answered by the proxy itself.
pub const VERIFY_PATH: &str = "/_portcullis/verify";
