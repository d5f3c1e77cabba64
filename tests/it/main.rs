//! Integration tests: the real `portcullis` binary in front of a real recording upstream, with a
//! real SQLite file, on ephemeral loopback ports.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;
mod plex_standin;
pub mod soft_authenticator;
mod standin;
mod upstream;

mod account;
mod ambiguous;
mod atk_brute_force;
mod atk_carriers;
mod atk_credentials;
mod atk_csrf;
mod atk_headers;
mod atk_passwords;
mod atk_paths;
mod atk_redirects;
mod atk_replicas;
pub(crate) mod atk_revocation;
mod atk_second_factor;
mod atk_websocket;
mod backup;
mod bad_input;
mod browser;
mod cli;
mod container;
mod failures;
mod first_scrape;
mod forward_auth;
mod fuzz_corpus;
pub(crate) mod jellyfin;
mod jellyfin_clients;
mod jwt;
mod layers;
mod ldap;
mod login;
mod logs;
mod mail;
mod media_accounts;
mod observability;
mod oidc;
pub(crate) mod passkeys;
mod pg;
mod plex;
mod plex_fidelity;
mod probe;
mod proxy;
mod reload;
mod replicas;
mod revocation;
mod rules;
mod slapd;
mod slowloris;
mod smtpd;
mod smuggling;
mod soak;
pub(crate) mod standin_fidelity;
mod startup;
mod streaming;
mod systemd;
mod tls;
mod trusted_proxies;
pub(crate) mod upgrade;
mod webhook;
