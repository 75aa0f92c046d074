//! Synchronisation primitives, swapped for shuttle's under `--cfg shuttle` so that the
//! concurrency tests can explore interleavings of the real engine code.
//!
//! The engine locks only through [`lock`], [`try_lock`], [`wait`] and [`wait_timeout`], so
//! the two implementations can differ in API.

#[cfg(not(shuttle))]
pub(crate) use parking_lot::{Condvar, Mutex, MutexGuard};
#[cfg(not(shuttle))]
pub(crate) use std::sync::{
    Arc, Weak,
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
};
#[cfg(not(shuttle))]
pub(crate) use std::{thread, thread_local};

#[cfg(shuttle)]
pub(crate) use shuttle::sync::{
    Arc, Condvar, Mutex, MutexGuard, Weak,
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
};
#[cfg(shuttle)]
pub(crate) use shuttle::{thread, thread_local};

use std::time::Duration;

/// Locks `m`. Poisoning is ignored: no critical section in the engine runs code that can
/// panic while its data is inconsistent (sinks run under a lock, but behind `catch_unwind`).
#[cfg(not(shuttle))]
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock()
}

/// Locks `m` if it is free right now.
#[cfg(not(shuttle))]
pub(crate) fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    m.try_lock()
}

/// Waits on `cv`, releasing `guard` meanwhile.
#[cfg(not(shuttle))]
pub(crate) fn wait<'a, T>(cv: &Condvar, mut guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(&mut guard);
    guard
}

/// Waits on `cv` for at most `timeout`.
#[cfg(not(shuttle))]
pub(crate) fn wait_timeout<'a, T>(
    cv: &Condvar,
    mut guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> MutexGuard<'a, T> {
    cv.wait_for(&mut guard, timeout);
    guard
}

#[cfg(shuttle)]
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(shuttle)]
pub(crate) fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    m.try_lock().ok()
}

#[cfg(shuttle)]
pub(crate) fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(|e| e.into_inner())
}

#[cfg(shuttle)]
pub(crate) fn wait_timeout<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> MutexGuard<'a, T> {
    match cv.wait_timeout(guard, timeout) {
        Ok((g, _)) => g,
        Err(e) => e.into_inner().0,
    }
}
