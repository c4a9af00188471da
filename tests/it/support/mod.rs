pub mod daemon;
pub mod nspawn;
pub mod postgres;
pub mod rekey;
pub mod rvault;
pub mod util;
pub mod world;
