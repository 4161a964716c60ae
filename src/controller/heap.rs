//! The operator's allocator: jemalloc, purging freed pages at once.
//!
//! Measured by `make bench-operator` (1,000 pipelines in one vhost, release build): each vhost
//! snapshot read allocates megabytes for a moment (the JSON lists, their rows) between the
//! long-lived objects of the controller's cache. With glibc's malloc, even tuned (mmap
//! threshold fixed at 128 KiB, two arenas, `malloc_trim` after each snapshot), the heap held
//! 32.8 MiB for 9.1 MiB in use in steady state: the freed space lay in pages that still held
//! a live block, so nothing could hand them back, and the RSS stayed at 38.3 MiB (44.8 MiB
//! after the first sync). jemalloc keeps blocks of one size together. Measured the same way,
//! with its default decay (freed pages kept 10 s) it gave 28.4 MiB steady and 40.1 MiB after
//! the first sync; with the options below, which return a freed page run at once, 25.8 /
//! 31.6 MiB.
//!
//! Only binaries choose an allocator (the operator's `main.rs`, the benchmark), with
//! [`use_jemalloc!`](crate::use_jemalloc); the library and the client library do not.

use std::ffi::{CStr, c_char};

pub use tikv_jemallocator;

/// jemalloc's options: no delay before a dirty or muzzy page is returned (the default keeps
/// freed pages 10 s, which is what the RSS showed after every snapshot read), so the thread
/// that frees a page run returns it at once and no background purging thread is needed; two
/// arenas for the operator's few threads (the default is four per core).
pub const MALLOC_CONF: &CStr = c"narenas:2,dirty_decay_ms:0,muzzy_decay_ms:0";

/// The C string pointer jemalloc reads its options from (`malloc_conf`, which the prefixed
/// jemalloc of `tikv-jemalloc-sys` names `_rjem_malloc_conf`).
#[repr(transparent)]
pub struct MallocConf(pub *const c_char);

// SAFETY: the pointer is to a static, immutable C string.
unsafe impl Sync for MallocConf {}

/// Makes jemalloc, with [`MALLOC_CONF`], the global allocator of the binary it is used in.
/// Use once, at the top level of a binary crate.
#[macro_export]
macro_rules! use_jemalloc {
    () => {
        #[global_allocator]
        static ALLOCATOR: $crate::controller::heap::tikv_jemallocator::Jemalloc =
            $crate::controller::heap::tikv_jemallocator::Jemalloc;

        // jemalloc reads this symbol at its first allocation; a binary's own definition
        // takes the place of the library's empty default.
        #[unsafe(export_name = "_rjem_malloc_conf")]
        static MALLOC_CONF: $crate::controller::heap::MallocConf =
            $crate::controller::heap::MallocConf($crate::controller::heap::MALLOC_CONF.as_ptr());
    };
}
