//! Reads a BPF hash map in batches (BPF_MAP_LOOKUP_BATCH): a syscall per few thousand
//! elements, no allocation per element, and every error reported: a partial read is never
//! passed off as the whole map.
use std::os::fd::AsRawFd;

use anyhow::{Result, bail};
use libbpf_rs::MapCore;

/// Elements per syscall to start with; doubled when a hash bucket holds more (ENOSPC).
const BATCH: usize = 4096;

/// Calls `f(key, value)` for every element of `map`; returns how many there were.
pub fn for_each<M: MapCore, F: FnMut(&[u8], &[u8])>(map: &M, mut f: F) -> Result<usize> {
    let (ks, vs) = (map.key_size() as usize, map.value_size() as usize);
    let mut cap = BATCH;
    let mut keys = vec![0u8; ks * cap];
    let mut values = vec![0u8; vs * cap];
    // The kernel's resume token: a bucket index for hash maps, a key for others.
    let token = ks.max(8);
    let mut in_batch: Option<Vec<u8>> = None;
    let mut out_batch = vec![0u8; token];
    let opts = libbpf_sys::bpf_map_batch_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_batch_opts>() as _,
        elem_flags: 0,
        flags: 0,
    };
    let mut total = 0;
    loop {
        let mut count = cap as u32;
        let in_ptr = in_batch.as_mut().map_or(std::ptr::null_mut(), |b| b.as_mut_ptr().cast());
        // SAFETY: keys/values hold `cap` elements, the batch tokens `token` bytes each.
        let r = unsafe {
            libbpf_sys::bpf_map_lookup_batch(
                map.as_fd().as_raw_fd(),
                in_ptr,
                out_batch.as_mut_ptr().cast(),
                keys.as_mut_ptr().cast(),
                values.as_mut_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        let err = if r < 0 { -r } else { 0 };
        match err {
            0 | libc::ENOENT => {}
            libc::EINTR => continue,
            libc::ENOSPC => {
                // A bucket holds more elements than fit: retry the same batch with room for more.
                cap *= 2;
                keys.resize(ks * cap, 0);
                values.resize(vs * cap, 0);
                continue;
            }
            e => bail!("reading BPF map {}: {}", map.name().to_string_lossy(), std::io::Error::from_raw_os_error(e)),
        }
        let n = count as usize;
        for i in 0..n {
            f(&keys[i * ks..(i + 1) * ks], &values[i * vs..(i + 1) * vs]);
        }
        total += n;
        if err == libc::ENOENT {
            return Ok(total);
        }
        in_batch = Some(out_batch.clone());
    }
}
