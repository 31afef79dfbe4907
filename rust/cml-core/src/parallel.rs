//! Thread pools sized by the caller, safe across `fork`.
//!
//! Each thread count gets one rayon pool, built on first use and then reused;
//! only the [`CACHED_POOLS`] most recently used are kept, so a caller cycling
//! through thread counts does not pile up idle threads (a dropped pool's
//! threads end once its last task has). rayon's global pool is never touched,
//! so `num_threads` is honoured exactly, up to [`MAX_THREADS`]. A pool remembers the process id it was built in: after a `fork`
//! (torch DataLoader workers) the child finds the id changed, and since its
//! copy of the pool has no threads behind it, it builds fresh pools and leaks
//! the dead ones (dropping them would signal threads that do not exist).
//! Results never depend on the pool size: callers seed per unit of work.

use crate::error::{CoreError, Result};
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::sync::{Arc, Mutex, OnceLock};

/// The most threads a call may ask for; more is a mistake, not a machine.
pub const MAX_THREADS: usize = 1024;
/// Pools kept for reuse, most recently used first.
pub const CACHED_POOLS: usize = 4;

/// Checks a user-facing thread count: 0 (all cores) up to [`MAX_THREADS`].
pub fn check_threads(num_threads: usize) -> Result<usize> {
    if num_threads > MAX_THREADS {
        return Err(CoreError::invalid(format!(
            "num_threads must be at most {MAX_THREADS} (0 means all cores), got {num_threads}"
        )));
    }
    Ok(num_threads)
}

/// Resolves the user-facing thread count: 0 means all available cores.
pub fn resolve_threads(num_threads: usize) -> usize {
    if num_threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        num_threads.min(MAX_THREADS)
    }
}

struct PoolCache {
    pid: u32,
    /// (threads, pool), most recently used first.
    pools: Vec<(usize, Arc<ThreadPool>)>,
}

fn cache() -> &'static Mutex<PoolCache> {
    static CACHE: OnceLock<Mutex<PoolCache>> = OnceLock::new();
    CACHE.get_or_init(|| {
        Mutex::new(PoolCache {
            pid: std::process::id(),
            pools: Vec::new(),
        })
    })
}

/// The shared pool with `resolve_threads(num_threads)` workers.
pub fn pool(num_threads: usize) -> Arc<ThreadPool> {
    let threads = resolve_threads(num_threads);
    // A panic while holding this lock cannot leave the map inconsistent, so a
    // poisoned lock is still usable.
    let mut cache = cache().lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    if cache.pid != pid {
        let dead = std::mem::take(&mut cache.pools);
        std::mem::forget(dead);
        cache.pid = pid;
    }
    let pool = match cache.pools.iter().position(|(n, _)| *n == threads) {
        Some(at) => cache.pools.remove(at).1,
        None => Arc::new(
            ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("cml-rs-{i}"))
                .build()
                .expect("the OS refused to start worker threads"),
        ),
    };
    cache.pools.insert(0, (threads, Arc::clone(&pool)));
    cache.pools.truncate(CACHED_POOLS);
    pool
}

/// Maps `f` over task indices `0..n_tasks`, in the pool for `num_threads`, or
/// on the calling thread when `serial` (work too small to be worth waking
/// workers for) or when one thread is asked for. Output order is task order.
pub fn map_tasks<T, F>(num_threads: usize, serial: bool, n_tasks: usize, f: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize) -> T + Sync + Send,
{
    if serial || n_tasks <= 1 || resolve_threads(num_threads) == 1 {
        (0..n_tasks).map(f).collect()
    } else {
        use rayon::prelude::*;
        pool(num_threads).install(|| (0..n_tasks).into_par_iter().map(f).collect())
    }
}

/// Calls `f(chunk_index, chunk)` on consecutive chunks of `data` of `chunk_len`
/// elements, in parallel unless `serial` (see [`map_tasks`]).
pub fn for_each_chunk_mut<T, F>(
    num_threads: usize,
    serial: bool,
    data: &mut [T],
    chunk_len: usize,
    f: F,
) where
    T: Send,
    F: Fn(usize, &mut [T]) + Sync + Send,
{
    let chunk_len = chunk_len.max(1);
    if serial || data.len() <= chunk_len || resolve_threads(num_threads) == 1 {
        data.chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        use rayon::prelude::*;
        pool(num_threads).install(|| {
            data.par_chunks_mut(chunk_len)
                .enumerate()
                .for_each(|(i, c)| f(i, c));
        });
    }
}

/// The message a panic carried, for reports of a failed worker.
pub fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without message".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_counts_are_bounded_and_pools_are_not_hoarded() {
        assert!(check_threads(MAX_THREADS + 1)
            .unwrap_err()
            .to_string()
            .contains("num_threads must be at most 1024"));
        for threads in 1..=10 {
            assert_eq!(pool(threads).current_num_threads(), threads);
        }
        let cache = cache().lock().unwrap();
        assert_eq!(cache.pools.len(), CACHED_POOLS);
        assert_eq!(cache.pools[0].0, 10, "most recent first");
    }
}
