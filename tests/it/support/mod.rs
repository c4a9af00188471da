pub mod daemon;
pub mod rekey;
pub mod rvault;
pub mod util;
pub mod world;
