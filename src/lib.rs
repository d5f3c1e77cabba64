//! Portcullis: an authentication gateway for media servers. A Pingora proxy authenticates every
//! request in-process against an in-memory revocation view kept in sync with a store, and
//! forwards only live sessions to the unmodified upstream.
//!
//! `main.rs` parses the command line and dispatches to `cli`; everything else lives here so the
//! tests can reach it.

pub mod acme;
pub mod app;
pub mod auth;
pub mod backup;
pub mod cli;
pub mod config;
pub mod datadir;
pub mod directory;
pub mod healthcheck;
pub mod mail;
pub mod mediaserver;
pub mod metrics;
pub mod netaddr;
pub mod oidc;
pub mod paths;
pub mod probe;
pub mod proxy;
pub mod readiness;
pub mod revocation;
pub mod server;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod web;
pub mod webhook;

/// Lets this thread's allocator heap take back what other threads freed into it, at most every
/// 5 ms per thread, when a client connection has ended. mimalloc returns memory freed by
/// another thread than the one that allocated it only when the owning thread next collects;
/// a proxy thread that goes idle after a burst of connections (each allocated on one thread and
/// often freed on another: tasks move between threads) kept it all, 150 MiB after 4,000 idle
/// connections closed. Connection ends are rare next to requests, and the check costs nothing
/// in between.
pub fn tidy_thread_heap() {
    use std::cell::Cell;
    use std::time::{Duration, Instant};
    const EVERY: Duration = Duration::from_millis(5);
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    CONNECTIONS_ENDED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let now = Instant::now();
    let due = LAST.with(|last| {
        let due = last.get().is_none_or(|t| now.duration_since(t) >= EVERY);
        if due {
            last.set(Some(now));
        }
        due
    });
    if due {
        // SAFETY: mi_collect takes no pointers and may be called at any time from any thread; it
        // works on the calling thread's heap.
        unsafe { libmimalloc_sys::mi_collect(false) }
    }
}

static CONNECTIONS_ENDED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many client connections have ended since the process started (counted by
/// [`tidy_thread_heap`]): the sync loop releases memory soon after a burst of them.
pub fn connections_ended() -> u64 {
    CONNECTIONS_ENDED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Keeps the kernel from backing this process's memory with transparent huge pages. mimalloc
/// asks for them on its arenas (`MADV_HUGEPAGE`), and where the system allows them (`madvise`, the
/// default of Debian and Ubuntu, or `always`, that of Fedora and RHEL) khugepaged collapses every
/// 2 MiB region with at least one page in use into a whole huge page, a scan every 10 s: memory
/// a burst of connections had freed became resident again, 4-13 MiB a scan, so the resident size
/// after thousands of closed connections grew for a minute instead of falling (the figures are
/// in the README's Performance section). A proxy's heap is small and churns; it gains nothing
/// from huge pages. Called first thing in `main`; the flag covers the mappings made before too.
pub fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_THP_DISABLE takes integer arguments only and changes nothing but
    // the process's THP flag; an older kernel without it answers EINVAL, which changes nothing.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Asks the allocators to hand memory that is free but still held back to the operating system,
/// so the resident size reflects what is kept: after a large transient build (the revocation
/// view loaded from a snapshot), and periodically from the sync loop (see
/// `app::RELEASE_MEMORY_EVERY`). Two allocators hold such memory: mimalloc, the binary's global
/// allocator (where it is not — tests of the library — this only tidies its own, unused heap),
/// and the C library's malloc, which SQLite's C code uses and which keeps freed pages in each
/// thread's arena until trimmed.
pub fn release_free_memory() {
    // SAFETY: mi_collect takes no pointers and may be called at any time from any thread.
    unsafe { libmimalloc_sys::mi_collect(true) }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and may be called at any time from any thread (it
    // takes each arena's lock in turn). It returns whether memory was released, not an error.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Memory held by the process's allocators, in bytes: the figures behind the resident size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocatorUsage {
    /// Committed by mimalloc (the Rust heap): in use or free but not yet returned.
    pub mimalloc_committed: u64,
    /// Allocated through the C library's malloc (SQLite's C code) and in use.
    pub libc_in_use: u64,
    /// Free in the C library's arenas but still held by the process.
    pub libc_free: u64,
    /// In use by SQLite (its own count; part of `libc_in_use`).
    pub sqlite_in_use: u64,
}

/// What the allocators hold now (see [`AllocatorUsage`]); the C library's figures are zero
/// where it is not glibc.
pub fn allocator_usage() -> AllocatorUsage {
    let mut usage = AllocatorUsage::default();
    let (mut committed, mut ignored) = (0usize, [0usize; 7]);
    let [elapsed, user, system, rss, peak_rss, peak_commit, faults] = &mut ignored;
    // SAFETY: every argument points to a live, writable usize.
    unsafe {
        libmimalloc_sys::mi_process_info(
            elapsed,
            user,
            system,
            rss,
            peak_rss,
            &mut committed,
            peak_commit,
            faults,
        );
    }
    usage.mimalloc_committed = committed as u64;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no pointers and returns a plain struct.
        let info = unsafe { libc::mallinfo2() };
        usage.libc_in_use = (info.uordblks + info.hblkhd) as u64;
        usage.libc_free = info.fordblks as u64;
    }
    // SAFETY: sqlite3_memory_used takes no pointers and may be called from any thread.
    usage.sqlite_in_use = unsafe { libsqlite3_sys::sqlite3_memory_used() }.max(0) as u64;
    usage
}
