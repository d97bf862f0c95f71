//! A counting allocator (peak live bytes) and hand-built PNGs for the decode tests.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

/// Resets the peak to what is live now and returns that baseline.
pub fn reset_peak() -> usize {
    let live = LIVE.load(Ordering::SeqCst);
    PEAK.store(live, Ordering::SeqCst);
    live
}

pub fn peak() -> usize {
    PEAK.load(Ordering::SeqCst)
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut h = crc32fast::Hasher::new();
    h.update(kind);
    h.update(data);
    out.extend_from_slice(&h.finalize().to_be_bytes());
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(data).unwrap();
    z.finish().unwrap()
}

/// An RGB PNG of `w`×`h` grey pixels, with an iCCP chunk whose profile inflates to
/// `iccp_inflated` bytes (0: no iCCP chunk).
pub fn png(w: u32, h: u32, iccp_inflated: usize) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    if iccp_inflated > 0 {
        let mut iccp = b"bomb\0\0".to_vec();
        // Compressed in pieces: a 1 GiB run of zeros is about 1 MiB of deflate.
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        let block = vec![0u8; 1 << 20];
        let mut left = iccp_inflated;
        while left > 0 {
            let n = left.min(block.len());
            z.write_all(&block[..n]).unwrap();
            left -= n;
        }
        iccp.extend_from_slice(&z.finish().unwrap());
        chunk(&mut out, b"iCCP", &iccp);
    }
    let row = 1 + 3 * w as usize;
    let mut raw = vec![128u8; row * h as usize];
    for y in 0..h as usize {
        raw[y * row] = 0;
    }
    chunk(&mut out, b"IDAT", &zlib(&raw));
    chunk(&mut out, b"IEND", &[]);
    out
}
