//! Handing freed memory back to the system.
//!
//! glibc's allocator returns freed memory only from the top of its heap. Loading a
//! large config is a burst: the TOML parser's tokens and tables for a fleet of 10,000
//! subscriptions peak at about 30 MB and are all freed a moment later, but the config
//! kept from them sits between the freed pages, so without a trim the daemon stays
//! resident at that peak for its whole life (BENCHMARKS.md, idle RSS).

/// Asks the allocator to return the pages it holds free (glibc's `malloc_trim`);
/// elsewhere (musl, other systems) nothing, as those allocators return memory
/// themselves. Call at a quiet moment, after a burst: glibc locks each arena in
/// turn while it walks it. Returns whether anything was given back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_freed() -> bool {
    // SAFETY: malloc_trim takes no pointers and touches only glibc's own free lists,
    // under the same locks as every other allocator call.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_freed() -> bool {
    false
}
