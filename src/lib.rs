//! rekey rotates the signing secrets of webhook subscriptions at SaaS providers and
//! publishes them to HashiCorp Vault so receivers always hold a secret that verifies.
//!
//! The pieces, each in one file: the pure rotation state machine ([`rotation`]), its
//! driver ([`engine`]), durable state ([`state`]), secret stores ([`store`]), providers
//! ([`provider`]), policy timing ([`policy_timing`]), configuration ([`config`]), the command
//! line ([`cli`]), the long-running daemon ([`scheduler`], [`daemon`]), one-shot runs
//! ([`once`]) and the in-process provider simulators ([`sandbox`]).

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod errors;
pub mod exit;
pub mod failpoint;
pub mod http_body;
pub mod journal;
pub mod lock;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod once;
pub mod policy_timing;
pub mod provider;
pub mod rotation;
pub mod sandbox;
pub mod scheduler;
pub mod secret;
pub mod signals;
pub mod state;
pub mod status;
pub mod store;
