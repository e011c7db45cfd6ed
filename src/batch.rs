//! Reads every element of a BPF hash map, many keys and values per syscall.
//!
//! libbpf-rs 0.27's `lookup_batch` iterator ends at the first batch shorter than asked for, but
//! the kernel returns short batches in the middle of a hash map too (it never splits a bucket
//! between batches): past a few thousand elements, the rest were silently skipped. Here only
//! ENOENT ends the walk.
use std::os::fd::AsRawFd;

use anyhow::{Result, bail};
use libbpf_rs::{MapCore, libbpf_sys};

/// Elements asked for per syscall at first.
const BATCH: usize = 4096;
/// A single bucket larger than this would be a broken map.
const MAX_BATCH: usize = 1 << 20;

/// Every (key, value) of `map`, as raw bytes.
pub fn read_all<M: MapCore>(map: &M) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let (ks, vs) = (map.key_size() as usize, map.value_size() as usize);
    let fd = map.as_fd().as_raw_fd();
    let mut batch = BATCH;
    let mut keys = vec![0u8; batch * ks];
    let mut values = vec![0u8; batch * vs];
    // The kernel's opaque position in the map (a bucket index for hash maps).
    let mut cursor: Option<[u8; 8]> = None;
    let mut next = [0u8; 8];
    let opts = libbpf_sys::bpf_map_batch_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_batch_opts>() as libbpf_sys::size_t,
        elem_flags: 0,
        flags: 0,
    };
    let mut out = Vec::new();
    loop {
        let mut count = batch as u32;
        // SAFETY: keys and values hold `batch` elements each, the cursors 8 bytes (the kernel
        // writes 4 for hash maps); count says how many elements fit.
        let ret = unsafe {
            libbpf_sys::bpf_map_lookup_batch(
                fd,
                cursor.as_mut().map_or(std::ptr::null_mut(), |c| c.as_mut_ptr().cast()),
                next.as_mut_ptr().cast(),
                keys.as_mut_ptr().cast(),
                values.as_mut_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        let err = if ret < 0 { -ret } else { 0 };
        match err {
            0 | libc::ENOENT => {
                let n = (count as usize).min(batch);
                out.extend(
                    keys[..n * ks]
                        .chunks_exact(ks)
                        .zip(values[..n * vs].chunks_exact(vs))
                        .map(|(k, v)| (k.to_vec(), v.to_vec())),
                );
                if err == libc::ENOENT {
                    return Ok(out);
                }
                cursor = Some(next);
            }
            libc::EINTR => {}
            // The next bucket alone holds more than a batch.
            libc::ENOSPC if batch < MAX_BATCH => {
                batch *= 2;
                keys.resize(batch * ks, 0);
                values.resize(batch * vs, 0);
            }
            e => bail!("reading the map {}: {}", map.name().to_string_lossy(), std::io::Error::from_raw_os_error(e)),
        }
    }
}
