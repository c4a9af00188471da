pub mod daemon;
pub mod nspawn;
pub mod rekey;
pub mod rvault;
pub mod util;
pub mod world;
