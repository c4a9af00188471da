//! rekey's integration tests: one test binary (each extra binary costs link time),
//! grouped by feature. Each test starts what it needs — a real RustyVault server, the
//! simulated provider (Fintoro, Monite or Storno), a verifying receiver — and runs
//! the real `rekey` binary.

mod config_errors;
mod fintoro;
mod mixed;
mod monite;
mod rvault_smoke;
mod sandbox;
mod storno;
mod support;
