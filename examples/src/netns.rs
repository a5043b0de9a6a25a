//! Running a piece of code in another network namespace: sockets made there stay there.
//!
//! `setns(2)` changes only the calling thread's namespace, and a socket belongs to the
//! namespace it was made in, whichever thread uses it later. [`run_in`] makes the sockets
//! on a short-lived thread that entered the namespace, so the rest of the process (its
//! runtimes, its other threads) never changes namespace.

use std::io;
use std::thread;

/// Runs `f` on a thread inside the network namespace `/run/netns/NAME` (as `ip netns`
/// names them) and returns its result.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    if name.is_empty() || name.contains('/') || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad network namespace name {name:?}"),
        ));
    }
    let path = format!("/run/netns/{name}");
    let file = std::fs::File::open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("open {path}: {e}")))?;
    thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!("enter network namespace {path}: {e}"),
                )
            })?;
            f().map_err(|e| io::Error::new(e.kind(), format!("{e} (in network namespace {name})")))
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
    })
}

/// Raises this process's limit of open files to at least `want` (both the soft and, for
/// root, the hard limit), for test programs that hold thousands of connections. The limit
/// it ends with.
pub fn raise_open_files(want: u64) -> io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft >= want {
        return Ok(soft);
    }
    // Above the hard limit needs CAP_SYS_RESOURCE; without it, settle for the hard limit.
    if want > hard && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return Ok(want);
    }
    let got = want.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, got, hard).map_err(io::Error::from)?;
    Ok(got)
}
