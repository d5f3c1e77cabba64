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
/// in between. The first call on a thread also notes it as a proxy thread, for
/// [`tidy_proxy_threads`].
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
        let previous = last.get();
        if previous.is_none() {
            note_proxy_thread();
        }
        let due = previous.is_none_or(|t| now.duration_since(t) >= EVERY);
        if due {
            last.set(Some(now));
        }
        due
    });
    if due {
        collect_thread_heap(false);
    }
}

/// Has mimalloc's heap of the calling thread take back the blocks other threads freed into its
/// pages and return its empty pages; `force` also returns the pages it keeps for reuse and
/// purges freed memory at once, for every thread (see [`release_free_memory`]). A thread that
/// allocates in bursts and then waits (the admission watchman) calls it after each round, or
/// the empty pages stay with it.
pub fn collect_thread_heap(force: bool) {
    // SAFETY: mi_collect takes no pointers and may be called at any time from any thread; it
    // works on the calling thread's heap (and, forced, purges every thread's freed pages).
    unsafe { libmimalloc_sys::mi_collect(force) }
}

/// The threads that end client connections (the proxy's workers), each with a handle to the
/// runtime it works for: noted by [`tidy_thread_heap`] on its first call on each thread.
static PROXY_THREADS: std::sync::Mutex<Vec<(std::thread::ThreadId, tokio::runtime::Handle)>> =
    std::sync::Mutex::new(Vec::new());

fn note_proxy_thread() {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        proxy_threads().push((std::thread::current().id(), handle));
    }
}

fn proxy_threads(
) -> std::sync::MutexGuard<'static, Vec<(std::thread::ThreadId, tokio::runtime::Handle)>> {
    PROXY_THREADS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Every proxy thread collects its heap, forced: on the release passes after client
/// connection ends have gone quiet (`app::BurstEnd::threads_due`). At a burst's end each proxy
/// thread's pages hold the blocks the other threads freed after its last collect (a
/// connection's task moves between threads), and a thread that then waits idle never collects
/// again: 30 s after 10,000 keep-alives closed, 3,400 such blocks kept 395 pages of the two
/// proxy threads' heaps (12.5 MiB more resident than before the burst).
/// Returns how many proxy threads collected; a thread whose runtime has gone is forgotten.
pub async fn tidy_proxy_threads() -> usize {
    let threads = proxy_threads().clone();
    let collected = collect_on_threads(&threads, std::time::Duration::from_millis(5)).await;
    proxy_threads().retain(|(id, _)| !collected.gone.contains(id));
    collected.done.len()
}

/// What [`collect_on_threads`] did: the threads that collected, and those whose runtime is gone.
#[derive(Debug, Default)]
pub struct Collected {
    pub done: std::collections::HashSet<std::thread::ThreadId>,
    pub gone: Vec<std::thread::ThreadId>,
}

/// Runs a forced heap collect on each of `threads`, through its runtime. A work-stealing
/// runtime runs a task on whichever worker takes it first, so each task holds its worker
/// (yielding the CPU) until every task has started or `within` has passed: then each runs on a
/// worker of its own. A thread is counted only if a task did run on it.
pub async fn collect_on_threads(
    threads: &[(std::thread::ThreadId, tokio::runtime::Handle)],
    within: std::time::Duration,
) -> Collected {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let wanted = threads.len();
    let started = std::sync::Arc::new(AtomicUsize::new(0));
    let until = std::time::Instant::now() + within;
    let tasks: Vec<_> = threads
        .iter()
        .map(|(id, handle)| {
            let started = started.clone();
            let task = handle.spawn(async move {
                started.fetch_add(1, Ordering::AcqRel);
                while started.load(Ordering::Acquire) < wanted && std::time::Instant::now() < until
                {
                    std::thread::yield_now();
                }
                collect_thread_heap(true);
                std::thread::current().id()
            });
            (*id, task)
        })
        .collect();
    let mut collected = Collected::default();
    for (id, task) in tasks {
        match task.await {
            Ok(ran_on) => {
                collected.done.insert(ran_on);
            }
            Err(_) => collected.gone.push(id),
        }
    }
    collected
        .done
        .retain(|ran_on| threads.iter().any(|(id, _)| id == ran_on));
    collected
}

/// Gives back a table's capacity once under a quarter of it is used, down to twice what is
/// left and at least `floor`: a map keeps the capacity a burst of connections grew it to (the
/// watchman's tables, 1 MB after 10,000 connections; the connection registry, 2.5 MiB after
/// 9,000 WebSockets). Halving whenever under a quarter is used costs, over a burst's end, about
/// one more pass over what the burst held.
pub fn shrink_after_burst<K, V, S>(map: &mut std::collections::HashMap<K, V, S>, floor: usize)
where
    K: Eq + std::hash::Hash,
    S: std::hash::BuildHasher,
{
    if map.capacity() > floor && map.len() < map.capacity() / 4 {
        map.shrink_to(floor.max(map.len() * 2));
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
    collect_thread_heap(true);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::thread::ThreadId;
    use std::time::Duration;

    /// A work-stealing runtime with `workers` workers, and their thread ids.
    fn runtime(workers: usize) -> (tokio::runtime::Runtime, Vec<ThreadId>) {
        let ids = Arc::new(Mutex::new(Vec::new()));
        let seen = ids.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .on_thread_start(move || seen.lock().unwrap().push(std::thread::current().id()))
            .build()
            .unwrap();
        // Workers start with the runtime; blocking threads (none here) only when asked for.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while ids.lock().unwrap().len() < workers && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let ids = ids.lock().unwrap().clone();
        assert_eq!(ids.len(), workers, "every worker started");
        (rt, ids)
    }

    #[test]
    fn every_worker_of_a_work_stealing_runtime_collects() {
        let (proxy, workers) = runtime(2);
        let threads: Vec<_> = workers
            .iter()
            .map(|id| (*id, proxy.handle().clone()))
            .collect();
        let caller = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Idle workers and busy ones: a task may be taken by either, yet each collects once.
        for round in 0..50 {
            if round % 2 == 1 {
                for _ in 0..4 {
                    proxy.spawn(async { std::thread::sleep(Duration::from_micros(300)) });
                }
            }
            let collected =
                caller.block_on(collect_on_threads(&threads, Duration::from_millis(200)));
            assert!(collected.gone.is_empty(), "round {round}");
            assert_eq!(
                collected.done,
                workers.iter().copied().collect(),
                "round {round}: one task ran on each worker"
            );
        }
    }

    #[test]
    fn a_thread_whose_runtime_has_gone_is_reported_without_waiting_long() {
        let (live, live_workers) = runtime(1);
        let (dead, dead_workers) = runtime(1);
        let handle = dead.handle().clone();
        dead.shutdown_timeout(Duration::from_secs(1));
        let threads = [
            (live_workers[0], live.handle().clone()),
            (dead_workers[0], handle),
        ];
        let caller = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let started = std::time::Instant::now();
        let collected = caller.block_on(collect_on_threads(&threads, Duration::from_millis(50)));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(collected.gone, vec![dead_workers[0]]);
        assert_eq!(collected.done, [live_workers[0]].into_iter().collect());
    }

    #[test]
    fn a_proxy_thread_is_noted_once_at_its_first_connection_end() {
        let (rt, workers) = runtime(1);
        let before = proxy_threads()
            .iter()
            .filter(|(id, _)| *id == workers[0])
            .count();
        assert_eq!(before, 0);
        rt.block_on(async {
            tokio::spawn(async {
                for _ in 0..3 {
                    tidy_thread_heap();
                }
            })
            .await
            .unwrap()
        });
        let noted = proxy_threads()
            .iter()
            .filter(|(id, _)| *id == workers[0])
            .count();
        assert_eq!(noted, 1, "noted once, on the worker that ended connections");
        let caller = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert!(caller.block_on(tidy_proxy_threads()) >= 1);
        drop(rt);
        // The runtime is gone: the next tidy forgets its thread.
        caller.block_on(tidy_proxy_threads());
        assert!(proxy_threads().iter().all(|(id, _)| *id != workers[0]));
    }
}
