//! The daemons' tokio runtime, with adaptive polling before a worker sleeps.
//!
//! # Why poll
//!
//! On a virtual machine, waking a thread whose CPU went idle costs 20-30 us: the idle vCPU
//! halted, and the wake-up needs an inter-processor interrupt through the hypervisor
//! (measured on the 2-core CI machine: a 64-byte ping-pong between two tokio processes over
//! a Unix socket takes 45 us when both sides sleep between messages, 18 us when one side
//! polls, 4 us when both do). A request crosses several such sleeps on its way (the frontend
//! waits for the storage node, the node for the disk, each for the other's next message), so
//! at low queue depth the wake-ups, not the work, set the latency.
//!
//! So a worker that runs out of work first polls for up to a short *window* (at most
//! [`MAX_WINDOW`]) before it sleeps in the kernel: it checks, without taking them, whether the
//! runtime's event queue (its epoll instance) has events ready or another thread queued a
//! task, and yields its CPU to any other runnable thread between checks (so polling only uses
//! time that would otherwise be idle on that CPU). As soon as something is ready, the worker
//! goes back to work without a wake-up.
//!
//! The window adapts, as the Linux guest `haltpoll` governor's does: it grows when the worker
//! slept but was woken within [`MAX_WINDOW`] (a longer poll would have caught that event), and
//! shrinks when the sleep was longer (polling would have been wasted). An idle daemon's
//! window therefore falls to zero: polling costs nothing when there is nothing to do.
//!
//! # How the event queue is watched
//!
//! tokio does not expose its epoll descriptor. [`build`] notes the process's epoll
//! descriptors before and after building the runtime; the new one is the runtime's. It is
//! added to a second epoll instance of our own (epoll instances nest): that one reports the
//! runtime's instance readable while it holds ready events, without consuming them, so
//! tokio's own `epoll_wait` still gets every event. If the descriptor cannot be found (not
//! Linux, or an unexpected layout), the runtime runs without polling and says so in the log.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The longest a worker polls before it sleeps.
pub const MAX_WINDOW: Duration = Duration::from_micros(100);
/// The window's first step up from zero.
const GROW_FROM_ZERO_NS: u64 = 10_000;
/// Below this the window is zero.
const MIN_WINDOW_NS: u64 = 5_000;
/// The most saved-up polling time (see [`RuntimeOptions::poll_budget`]).
const BUDGET_MAX_NS: f64 = 10_000_000.0;

/// How a daemon's runtime is built.
#[derive(Clone, Copy, Debug)]
pub struct RuntimeOptions {
    /// Worker threads; `None`: one per CPU.
    pub worker_threads: Option<usize>,
    /// Poll before sleeping (see the module documentation).
    pub poll: bool,
    /// The share of one CPU (0.0-1.0) the process may spend polling, over time: polling
    /// draws on a budget that refills at this rate. Polling trades CPU for latency: at queue
    /// depth 1 a storage node spends up to a whole CPU on it (measured: 4 KiB writes, p50
    /// 177-205 us polling without limit, 212-243 us with half a CPU, 276-309 us without).
    pub poll_budget: f64,
}

/// The polling state shared by a runtime's workers.
struct Poller {
    /// Our epoll instance, holding the runtime's.
    outer: OwnedFd,
    handle: tokio::runtime::Handle,
    window_ns: AtomicU64,
    /// One worker polls at a time: on a small machine two polling workers would take both
    /// CPUs from the threads whose work they wait for.
    polling: AtomicBool,
    /// The polling budget: ns of polling left, and when it was last refilled; it refills at
    /// `rate` ns per ns ([`RuntimeOptions::poll_budget`]).
    budget: std::sync::Mutex<(f64, Instant)>,
    rate: f64,
    /// Time spent polling in all, and the longest single poll (for the tests).
    #[cfg(test)]
    polled_ns: AtomicU64,
    #[cfg(test)]
    longest_poll_ns: AtomicU64,
}

thread_local! {
    /// When this worker stopped polling, and whether polling found work; `None` if it did
    /// not poll (another worker was polling).
    static POLLED: std::cell::Cell<Option<(Instant, bool)>> =
        const { std::cell::Cell::new(None) };
}

/// Builds a multi-threaded runtime with all drivers enabled, polling before sleeping when
/// `opts.poll` is set. Call it before other threads open epoll instances (at start-up).
pub fn build(opts: RuntimeOptions) -> io::Result<tokio::runtime::Runtime> {
    build_polled(opts).map(|(rt, _)| rt)
}

/// [`build`], and the poller if the runtime polls.
fn build_polled(
    opts: RuntimeOptions,
) -> io::Result<(tokio::runtime::Runtime, Option<Arc<Poller>>)> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all();
    if let Some(n) = opts.worker_threads {
        b.worker_threads(n.max(1));
    }
    if !opts.poll || opts.poll_budget <= 0.0 {
        return Ok((b.build()?, None));
    }
    let before = epoll_fds();
    let poller: Arc<OnceLock<Arc<Poller>>> = Arc::new(OnceLock::new());
    let p1 = poller.clone();
    let p2 = poller.clone();
    b.on_thread_park(move || {
        if let Some(p) = p1.get() {
            p.before_park();
        }
    });
    b.on_thread_unpark(move || {
        if let Some(p) = p2.get() {
            p.after_unpark();
        }
    });
    let rt = b.build()?;
    let new: Vec<RawFd> = epoll_fds().into_iter().filter(|fd| !before.contains(fd)).collect();
    match one_instance(&new) {
        Some(fd) => match Poller::watching(fd, rt.handle(), opts.poll_budget.clamp(0.0, 1.0)) {
            Ok(p) => {
                let _ = poller.set(Arc::new(p));
            }
            Err(e) => tracing::warn!(%e, "no polling before sleep: cannot watch the runtime"),
        },
        None => tracing::warn!(
            found = new.len(),
            "no polling before sleep: the runtime's event queue was not found"
        ),
    }
    let p = poller.get().cloned();
    Ok((rt, p))
}

impl Poller {
    fn watching(
        runtime_epoll: RawFd,
        handle: &tokio::runtime::Handle,
        rate: f64,
    ) -> io::Result<Self> {
        // SAFETY: epoll_create1 returns a new descriptor or -1 (checked).
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let outer = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: 0 };
        // SAFETY: both descriptors are open; `ev` outlives the call.
        if unsafe { libc::epoll_ctl(raw, libc::EPOLL_CTL_ADD, runtime_epoll, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            outer,
            handle: handle.clone(),
            window_ns: AtomicU64::new(0),
            polling: AtomicBool::new(false),
            budget: std::sync::Mutex::new((BUDGET_MAX_NS, Instant::now())),
            rate,
            #[cfg(test)]
            polled_ns: AtomicU64::new(0),
            #[cfg(test)]
            longest_poll_ns: AtomicU64::new(0),
        })
    }

    /// Whether the runtime has something to do: events in its queue, or tasks another thread
    /// queued (those wake a sleeping worker without an event).
    fn ready(&self) -> bool {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: `outer` is open and `ev` has room for the one event asked for.
        let n = unsafe { libc::epoll_wait(self.outer.as_raw_fd(), &mut ev, 1, 0) };
        n > 0 || self.handle.metrics().global_queue_depth() > 0
    }

    fn before_park(&self) {
        POLLED.with(|s| s.set(None));
        let window = Duration::from_nanos(self.window_ns.load(Ordering::Relaxed));
        if self.polling.swap(true, Ordering::Acquire) {
            return;
        }
        let start = Instant::now();
        // No more than the budget allows: under steady low-depth load polling would
        // otherwise keep a CPU busy all the time.
        let window = {
            let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
            let refill = start.duration_since(b.1).as_nanos() as f64 * self.rate;
            *b = ((b.0 + refill).min(BUDGET_MAX_NS), start);
            window.min(Duration::from_nanos(b.0.max(0.0) as u64))
        };
        let found = loop {
            if self.ready() {
                break true;
            }
            if start.elapsed() >= window {
                break false;
            }
            // Let any other runnable thread on this CPU go first: polling takes idle time only.
            std::thread::yield_now();
        };
        let spent = start.elapsed().as_nanos() as u64;
        self.budget.lock().unwrap_or_else(|e| e.into_inner()).0 -= spent as f64;
        #[cfg(test)]
        {
            self.polled_ns.fetch_add(spent, Ordering::Relaxed);
            self.longest_poll_ns.fetch_max(spent, Ordering::Relaxed);
        }
        self.polling.store(false, Ordering::Release);
        POLLED.with(|s| s.set(Some((Instant::now(), found))));
    }

    fn after_unpark(&self) {
        let Some((polled, found)) = POLLED.with(|s| s.take()) else { return };
        let idle = polled.elapsed();
        let w = self.window_ns.load(Ordering::Relaxed);
        let next = if idle > MAX_WINDOW {
            // A long sleep (also after an event that turned out to need no work, such as a
            // timer's registration waking the driver): polling would have been wasted.
            if w / 2 < MIN_WINDOW_NS {
                0
            } else {
                w / 2
            }
        } else if !found {
            // Woken soon after it slept: a longer poll would have caught it.
            if w == 0 {
                GROW_FROM_ZERO_NS
            } else {
                (w * 2).min(MAX_WINDOW.as_nanos() as u64)
            }
        } else {
            w
        };
        self.window_ns.store(next, Ordering::Relaxed);
    }
}

/// The one epoll instance behind `fds` (mio duplicates its descriptor for its registry, so
/// a runtime holds two descriptors of one instance), or `None` if they are not exactly one.
fn one_instance(fds: &[RawFd]) -> Option<RawFd> {
    // An instance's fdinfo lists what it watches; duplicates show the same list.
    let watched = |fd: RawFd| {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        Some(info.lines().filter(|l| l.starts_with("tfd:")).map(str::to_owned).collect::<Vec<_>>())
    };
    let (&first, rest) = fds.split_first()?;
    let w = watched(first)?;
    rest.iter().all(|&fd| watched(fd).as_ref() == Some(&w)).then_some(first)
}

/// The process's open epoll descriptors.
fn epoll_fds() -> Vec<RawFd> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return Vec::new() };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let fd: RawFd = e.file_name().to_str()?.parse().ok()?;
        let target = std::fs::read_link(e.path()).ok()?;
        (target.to_str()? == "anon_inode:[eventpoll]").then_some(fd)
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn window(p: &Poller) -> u64 {
        p.window_ns.load(Ordering::Relaxed)
    }

    /// The window opens while replies come back quickly, and closes again when the runtime
    /// idles; tasks woken from other threads still run; without polling nothing is set up.
    #[test]
    fn the_window_follows_the_traffic() {
        let (rt, none) =
            build_polled(RuntimeOptions { worker_threads: Some(1), poll: false, poll_budget: 1.0 })
                .unwrap();
        assert!(none.is_none());
        drop(rt);

        let (rt, p) =
            build_polled(RuntimeOptions { worker_threads: Some(1), poll: true, poll_budget: 1.0 })
                .unwrap();
        let p = p.expect("the runtime's event queue is found on Linux");
        assert_eq!(window(&p), 0);
        // An echo peer on a plain thread: each reply comes within microseconds.
        let (mut mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut b = [0u8; 8];
            while mine.read_exact(&mut b).is_ok() {
                mine.write_all(&b).unwrap();
            }
        });
        // Tasks run on the workers (block_on's own future runs on the calling thread).
        rt.block_on(rt.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            theirs.set_nonblocking(true).unwrap();
            let mut s = tokio::net::UnixStream::from_std(theirs).unwrap();
            let mut b = [7u8; 8];
            for _ in 0..2000 {
                s.write_all(&b).await.unwrap();
                s.read_exact(&mut b).await.unwrap();
            }
        }))
        .unwrap();
        assert!(window(&p) > 0, "replies within {MAX_WINDOW:?} open the window");
        assert!(window(&p) <= MAX_WINDOW.as_nanos() as u64);
        rt.block_on(rt.spawn(async {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }))
        .unwrap();
        assert_eq!(window(&p), 0, "long sleeps close the window");
        // A task woken from another thread (no event in the runtime's queue) runs.
        let v = rt
            .block_on(rt.spawn(async {
                let (tx, rx) = tokio::sync::oneshot::channel();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(5));
                    tx.send(7).unwrap();
                });
                rx.await.unwrap()
            }))
            .unwrap();
        assert_eq!(v, 7);
    }

    /// Polling never takes more than its budget of CPU time (plus the saved-up maximum).
    #[test]
    fn polling_stays_within_its_budget() {
        let opts = RuntimeOptions { worker_threads: Some(1), poll: true, poll_budget: 0.05 };
        let (rt, p) = build_polled(opts).unwrap();
        let p = p.expect("the runtime's event queue is found on Linux");
        let start = Instant::now();
        // A reply 50 us after each request: every wait is one a poll could catch.
        rt.block_on(rt.spawn(async {
            for _ in 0..3000 {
                let (tx, rx) = tokio::sync::oneshot::channel();
                std::thread::spawn(move || {
                    let t = Instant::now();
                    while t.elapsed() < Duration::from_micros(50) {
                        std::hint::spin_loop();
                    }
                    let _ = tx.send(());
                });
                rx.await.unwrap();
            }
        }))
        .unwrap();
        let wall = start.elapsed().as_nanos() as f64;
        let polled = p.polled_ns.load(Ordering::Relaxed) as f64;
        // A poll may overrun its window by a check and a yield (a whole time slice of another
        // thread on a busy machine); the overrun is repaid from later budget, all but the
        // last: at most one poll's worth.
        let longest = p.longest_poll_ns.load(Ordering::Relaxed) as f64;
        assert!(
            polled <= wall * 0.05 + BUDGET_MAX_NS + longest,
            "polled {polled} ns in {wall} ns (longest poll {longest} ns)"
        );
        assert!(polled > 0.0, "it polled at all");
    }
}
