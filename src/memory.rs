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

/// How many malloc arenas glibc may keep. By default it opens up to eight per core,
/// one for each thread that allocates while another holds an arena, and each keeps
/// its own freed pages; a daemon whose work is a few async workers and short
/// blocking calls gains nothing from more than two, and keeps every other arena's
/// free pages resident for its whole life.
const ARENAS: i32 = 2;

/// Caps glibc's malloc arenas at [`ARENAS`]; call first thing in `main`, before any
/// thread starts. Elsewhere nothing.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn limit_arenas() {
    // SAFETY: mallopt takes two integers and only sets an allocator parameter;
    // called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn limit_arenas() {}
