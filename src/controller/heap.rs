//! How the operator uses glibc's malloc. Measured by `make bench-operator` (1,000 pipelines
//! in one vhost): the heap in use after the first sync was 16 MiB, but malloc held 38 MiB,
//! and the RSS stayed there once the fleet was converged. Each vhost snapshot read allocates
//! megabytes for a moment (the JSON lists, their rows); glibc raises its mmap threshold to
//! the size of the largest block freed, so from the second read on those blocks come from
//! the arenas, which a free rarely shrinks, one arena per thread that ever allocated.

/// Fixes the mmap threshold at 128 KiB (blocks above it are mapped and unmapped on free;
/// no dynamic raise) and allows two arenas. Call once, at start, before other threads run.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets malloc's parameters; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Hands the heap pages malloc holds free back to the system. Called when a vhost snapshot
/// is forgotten, i.e. some seconds after the last read of a vhost.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks malloc's own free lists; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}
