//! The operator's allocator (src/controller/heap.rs), as `msgpipe::use_jemalloc!` sets it up
//! in a binary: jemalloc takes msgpipe's options, and a freed page goes back to the system
//! at once (jemalloc's own count of resident bytes) instead of staying for its default 10 s.

use tikv_jemalloc_ctl::{epoch, opt, raw, stats};

msgpipe::use_jemalloc!();

fn resident() -> usize {
    epoch::advance().expect("jemalloc epoch");
    stats::resident::read().expect("stats.resident")
}

#[test]
fn jemalloc_reads_msgpipes_options() {
    assert_eq!(opt::narenas::read().expect("opt.narenas"), 2);
    // SAFETY: both options are ssize_t.
    let dirty: isize = unsafe { raw::read(b"opt.dirty_decay_ms\0") }.expect("opt.dirty_decay_ms");
    let muzzy: isize = unsafe { raw::read(b"opt.muzzy_decay_ms\0") }.expect("opt.muzzy_decay_ms");
    assert_eq!((dirty, muzzy), (0, 0));
}

#[test]
fn freed_pages_leave_the_resident_set_at_once() {
    let before = resident();
    // 64 MiB in 64 KiB blocks (above the thread cache's sizes), every page written.
    let blocks: Vec<Vec<u8>> = (0..1024).map(|i| vec![i as u8; 64 * 1024]).collect();
    let held = resident();
    assert!(
        held >= before + 60 * 1024 * 1024,
        "64 MiB written, resident {before} -> {held}"
    );
    drop(blocks);
    let after = resident();
    assert!(
        after < before + 8 * 1024 * 1024,
        "64 MiB freed, yet resident stayed at {after} (was {before} before, {held} while held)"
    );
}
