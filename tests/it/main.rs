//! rekey's integration tests: one test binary (each extra binary costs link time),
//! grouped by feature. Each test starts what it needs — a real RustyVault server, the
//! simulated Fintoro, a verifying receiver — and runs the real `rekey` binary.

mod config_errors;
mod daemon;
mod fintoro;
mod rvault_smoke;
mod support;
