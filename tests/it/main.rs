//! rekey's integration tests: one test binary (each extra binary costs link time),
//! grouped by feature. Each test starts what it needs — a real RustyVault server, the
//! simulated provider (Fintoro, Monite or Storno), a verifying receiver — and runs
//! the real `rekey` binary.

mod config_errors;
mod contrib;
mod crash_matrix;
mod credentials;
mod daemon;
mod evidence;
mod faults;
mod fintoro;
mod first_start;
mod history;
mod mixed;
mod monite;
mod once;
mod package;
mod poll_writes;
mod postgres_ha;
mod postgres_state;
mod provider_faults;
mod real_systemd;
mod rvault_smoke;
mod sandbox;
mod sim;
mod state_backends;
mod state_damage;
mod storno;
mod support;
mod vault_auth;
