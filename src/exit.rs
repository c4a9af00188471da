//! Exit codes (sysexits where one fits): one table for every command, so the command
//! line, the daemon, one-shot runs and the sandbox agree on what a code means. The
//! `rekey --help` text lists the same codes.

pub const OK: u8 = 0;
/// A rotation failed or is held, or a subscription drifted.
pub const FAILED: u8 = 1;
pub const USAGE: u8 = 64;
pub const SOFTWARE: u8 = 70;
/// Another rekey holds the state directory.
pub const TEMPFAIL: u8 = 75;
pub const CONFIG: u8 = 78;
