//! rekey rotates the signing secrets of webhook subscriptions at SaaS providers and
//! publishes them to HashiCorp Vault so receivers always hold a secret that verifies.
//!
//! Imports run one way (docs/architecture.md; `scripts/check-layering` checks it): the
//! command line ([`cli`]) runs a command — the daemon ([`daemon`]) around its task loop
//! ([`scheduler`]), a one-shot run ([`once`]) or the demo against the provider
//! simulators ([`sandbox`]); each drives the [`engine`], which feeds the pure rotation
//! state machine ([`rotation`]) and acts through providers ([`provider`]), secret
//! stores ([`store`]) and durable state ([`state`]), per the configuration
//! ([`config`]) and its policy timing ([`policy_timing`]).

// Unsafe only where an allowance says why (`memory`: one FFI call).
#![deny(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod errors;
pub mod evidence;
pub mod exit;
pub mod failpoint;
pub mod http_body;
pub mod journal;
pub mod lock;
pub mod logging;
pub mod memory;
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
pub mod skew;
pub mod state;
pub mod status;
pub mod store;
