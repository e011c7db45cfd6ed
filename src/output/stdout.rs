//! Standard output, written so that a reader that stops reading cannot hold memleak forever:
//! once a stop signal is waiting (memleak blocks them while it traces), output that cannot be
//! written within a second is given up, with an error, and memleak ends.
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// At most one pipe buffer per write: after poll said writable it never blocks.
const CHUNK: usize = 4096;
/// How long output may stay blocked once a stop signal is waiting.
const STOP_PATIENCE: Duration = Duration::from_secs(1);

/// Set once output was given up: every later write fails at once.
static LOST: AtomicBool = AtomicBool::new(false);
const LOST_MESSAGE: &str = "standard output is blocked (nobody reads it): output lost";

/// Writes `text` to stdout. A reader that went away (`| head`) ends memleak quietly.
pub fn write_out(text: &str) -> Result<()> {
    write_bytes(text.as_bytes())
}

/// [`write_out`] for bytes.
pub fn write_bytes(text: &[u8]) -> Result<()> {
    if LOST.load(Ordering::Relaxed) {
        bail!(LOST_MESSAGE);
    }
    let mut rest = text;
    while !rest.is_empty() {
        wait_writable()?;
        let len = chunk_len(rest);
        // SAFETY: writes `len` bytes of a live slice to fd 1.
        let n = unsafe { libc::write(1, rest.as_ptr().cast(), len) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                // The reader went away (| head): stop quietly.
                Some(libc::EPIPE) => std::process::exit(0),
                _ => return Err(anyhow::Error::new(e).context("writing the report")),
            }
        }
        rest = &rest[n as usize..];
    }
    Ok(())
}

/// The first chunk of `rest`: whole lines where they fit, so that other writers to the same
/// pipe (a -c command) do not cut a line of memleak's.
fn chunk_len(rest: &[u8]) -> usize {
    if rest.len() <= CHUNK {
        return rest.len();
    }
    rest[..CHUNK].iter().rposition(|&b| b == b'\n').map_or(CHUNK, |i| i + 1)
}

/// Waits until stdout takes a chunk; fails if it stays blocked for a second while a stop
/// signal is waiting.
fn wait_writable() -> Result<()> {
    let mut stop_seen: Option<Instant> = None;
    loop {
        let mut p = libc::pollfd { fd: 1, events: libc::POLLOUT, revents: 0 };
        // SAFETY: one live pollfd.
        let n = unsafe { libc::poll(&mut p, 1, 100) };
        // Writable, or an error or hang-up the write reports; poll failing is the write's too.
        if n != 0 {
            return Ok(());
        }
        if crate::signals::stop_requested() {
            let since = *stop_seen.get_or_insert_with(Instant::now);
            if since.elapsed() >= STOP_PATIENCE {
                LOST.store(true, Ordering::Relaxed);
                bail!(LOST_MESSAGE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_end_at_lines_and_fit_a_pipe_buffer() {
        assert_eq!(chunk_len(b"short\n"), 6);
        let mut text = "x".repeat(4000);
        text.push('\n');
        text.push_str(&"y".repeat(200));
        assert_eq!(chunk_len(text.as_bytes()), 4001);
        assert_eq!(chunk_len("z".repeat(10_000).as_bytes()), CHUNK);
    }
}
