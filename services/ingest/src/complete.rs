//! Whether an image file's bytes run to the format's end: decoders fill a cut-off JPEG with grey
//! and stop reading a PNG once its pixels are in, so a file truncated in transfer would decode
//! "fine". These checks read the container to its end marker instead.

/// `None` when the bytes of `format` (as [`crate::analyze::ImageInfo::format`] names it) reach
/// the format's end; else why not.
pub fn incomplete(bytes: &[u8], format: &str) -> Option<String> {
    match format {
        "jpeg" => jpeg(bytes),
        "png" => png(bytes),
        "gif" => (bytes.last() != Some(&0x3B))
            .then(|| "truncated GIF: no trailer (0x3B) at the end".to_string()),
        "webp" => webp(bytes),
        _ => None,
    }
}

/// Walks the marker segments up to the first scan, then the entropy-coded data (where `FF` is
/// followed by `00` stuffing, restart markers or another segment) until EOI.
fn jpeg(b: &[u8]) -> Option<String> {
    let cut = |what: &str| Some(format!("truncated JPEG: {what}"));
    let mut i = 2; // after SOI
    loop {
        // Segment headers: FF, marker, 2-byte length (which counts itself).
        while b.get(i) == Some(&0xFF) && b.get(i + 1) == Some(&0xFF) {
            i += 1; // fill bytes
        }
        match (b.get(i), b.get(i + 1)) {
            (Some(0xFF), Some(0xD9)) => return None,
            (Some(0xFF), Some(&m)) => {
                let len = match (b.get(i + 2), b.get(i + 3)) {
                    (Some(&h), Some(&l)) => usize::from(h) << 8 | usize::from(l),
                    _ => return cut("a segment header is cut off"),
                };
                i += 2 + len;
                if i > b.len() {
                    return cut("a segment runs past the end of the file");
                }
                if m == 0xDA {
                    i = match scan_end(b, i) {
                        Some(next) => next,
                        None => return cut("the image data ends before the end-of-image marker"),
                    };
                }
            }
            _ => return cut("no end-of-image marker"),
        }
    }
}

/// The index of the marker that ends the entropy-coded data starting at `i`.
fn scan_end(b: &[u8], mut i: usize) -> Option<usize> {
    while i + 1 < b.len() {
        if b[i] == 0xFF {
            match b[i + 1] {
                0x00 | 0xD0..=0xD7 | 0xFF => {}
                _ => return Some(i),
            }
        }
        i += 1;
    }
    None
}

/// Walks the chunks (length, type, data, CRC) to IEND.
fn png(b: &[u8]) -> Option<String> {
    let mut i = 8; // signature
    while i + 8 <= b.len() {
        let len = u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as usize;
        let kind = &b[i + 4..i + 8];
        let end = i.checked_add(12)?.checked_add(len)?;
        if end > b.len() {
            return Some(format!(
                "truncated PNG: the {} chunk runs past the end of the file",
                String::from_utf8_lossy(kind)
            ));
        }
        if kind == b"IEND" {
            return None;
        }
        i = end;
    }
    Some("truncated PNG: no IEND chunk".into())
}

/// The RIFF header's size against the file's.
fn webp(b: &[u8]) -> Option<String> {
    let size = u32::from_le_bytes(b.get(4..8)?.try_into().ok()?) as usize;
    (b.len() < size.saturating_add(8)).then(|| {
        format!(
            "truncated WebP: {} bytes of the {} its header declares",
            b.len(),
            size + 8
        )
    })
}
