//! Guarded image decoding for every image a user sends: uploads that ingest analyses, A1111
//! init images and masks, search query images, training and captioning inputs.
//!
//! Before a pixel is decoded the header is read and checked: the encoded size, the format, the
//! width × height against a pixel limit (a decompression bomb is a few KiB on disk). The decoder
//! then runs with an allocation limit derived from the header, which also bounds what the PNG
//! decoder may inflate for ancillary chunks (an iCCP or zTXt bomb). Finally every decode draws its
//! estimated memory from one process-wide [`Budget`] and holds it for as long as the caller keeps
//! the [`Decoded`] image: however many hostile requests arrive at once, decoded pixels in this
//! process stay under the budget (`ATELIER_DECODE_BUDGET_MIB`, 1024 by default); the others wait.

mod budget;

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

pub use budget::{Budget, Held};

/// PIL's default bomb threshold (2 × 89,478,485 pixels), which our users' tools already apply.
pub const DEFAULT_MAX_PIXELS: u64 = 178_956_970;
/// Encoded bytes accepted for one image by default.
pub const DEFAULT_MAX_BYTES: usize = 256 << 20;

/// What a decoder may allocate beside the pixels: ICC profiles, EXIF, text chunks, its state.
const METADATA_ALLOC: u64 = 16 << 20;

/// What one decode may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Encoded size.
    pub max_bytes: usize,
    /// Width × height.
    pub max_pixels: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_BYTES,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

impl Limits {
    pub fn with_max_pixels(self, max_pixels: u64) -> Self {
        Self { max_pixels, ..self }
    }
}

/// Why bytes were not decoded. [`DecodeError::code`] is the stable machine-readable reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("the image is {bytes} bytes, over the limit of {limit}")]
    TooManyBytes { bytes: usize, limit: usize },
    #[error("not a JPEG, PNG, WebP, BMP, TIFF or GIF")]
    UnknownFormat,
    #[error("{width}x{height} = {pixels} pixels exceeds the limit of {limit}")]
    TooManyPixels {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error(
        "decoding {width}x{height} needs about {need_mib} MiB, more than this process's whole \
         decode budget of {budget_mib} MiB (ATELIER_DECODE_BUDGET_MIB)"
    )]
    OverBudget {
        width: u32,
        height: u32,
        need_mib: u64,
        budget_mib: u64,
    },
    #[error("not a readable image: {0}")]
    Corrupt(String),
}

impl DecodeError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooManyBytes { .. } => "image_too_large",
            Self::UnknownFormat => "bad_image",
            Self::TooManyPixels { .. } => "decompression_bomb",
            Self::OverBudget { .. } => "over_decode_budget",
            Self::Corrupt(_) => "bad_image",
        }
    }

    /// A limit was exceeded (as opposed to bytes that are not an image at all).
    pub fn is_limit(&self) -> bool {
        matches!(
            self,
            Self::TooManyBytes { .. } | Self::TooManyPixels { .. } | Self::OverBudget { .. }
        )
    }
}

/// What the header says, read without decoding pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
    /// Bytes per pixel of the decoded buffer.
    pub bytes_per_pixel: u8,
}

impl Header {
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }

    /// Memory a decode holds at its peak: the decoded buffer, the 8-bit RGB(A) copy callers
    /// usually make of it, and the encoded bytes.
    pub fn decode_cost(&self, encoded: usize) -> u64 {
        let decoded = self.pixels() * u64::from(self.bytes_per_pixel.max(1));
        let converted = self.pixels() * 4;
        decoded + converted + encoded as u64
    }
}

/// A decoded image that holds its share of the decode budget until dropped.
#[derive(Debug)]
pub struct Decoded {
    pub image: DynamicImage,
    _held: Held,
}

impl std::ops::Deref for Decoded {
    type Target = DynamicImage;
    fn deref(&self) -> &DynamicImage {
        &self.image
    }
}

impl Decoded {
    /// The image, giving its budget back (for callers that convert it at once).
    pub fn into_image(self) -> DynamicImage {
        self.image
    }
}

fn supported(f: ImageFormat) -> bool {
    matches!(
        f,
        ImageFormat::Jpeg
            | ImageFormat::Png
            | ImageFormat::WebP
            | ImageFormat::Bmp
            | ImageFormat::Tiff
            | ImageFormat::Gif
    )
}

fn reader(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>, DecodeError> {
    ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::Corrupt(e.to_string()))
}

/// Reads and checks the header: size, format and pixel limits. Decodes no pixel.
pub fn header(bytes: &[u8], limits: &Limits) -> Result<Header, DecodeError> {
    if bytes.len() > limits.max_bytes {
        return Err(DecodeError::TooManyBytes {
            bytes: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    let mut r = reader(bytes)?;
    // Reading the header reads every chunk before the pixels (ICC profiles, text): those get
    // metadata's allowance, not the default 512 MiB.
    let mut header_limits = image::Limits::default();
    header_limits.max_alloc = Some(METADATA_ALLOC);
    r.limits(header_limits);
    let format = r
        .format()
        .filter(|f| supported(*f))
        .ok_or(DecodeError::UnknownFormat)?;
    let decoder = r
        .into_decoder()
        .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    let (width, height) = decoder.dimensions();
    let header = Header {
        format,
        width,
        height,
        bytes_per_pixel: decoder.color_type().bytes_per_pixel(),
    };
    if header.pixels() > limits.max_pixels {
        return Err(DecodeError::TooManyPixels {
            width,
            height,
            pixels: header.pixels(),
            limit: limits.max_pixels,
        });
    }
    Ok(header)
}

/// Decodes pixels after [`header`] passed, with the decoder's allocations capped at what the
/// header justifies (ancillary chunks included). Applies the EXIF orientation when `orient`, and
/// returns it (1 when none or not applied).
fn decode_pixels(
    bytes: &[u8],
    h: &Header,
    orient: bool,
) -> Result<(DynamicImage, u8), DecodeError> {
    let mut r = reader(bytes)?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(h.width);
    limits.max_image_height = Some(h.height);
    // The decoded buffer plus room for metadata and the decoder's own state.
    limits.max_alloc = Some(h.pixels() * u64::from(h.bytes_per_pixel.max(1)) + METADATA_ALLOC);
    r.limits(limits);
    let mut decoder = r
        .into_decoder()
        .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    let orientation = if orient {
        decoder
            .orientation()
            .unwrap_or(image::metadata::Orientation::NoTransforms)
    } else {
        image::metadata::Orientation::NoTransforms
    };
    let mut img =
        DynamicImage::from_decoder(decoder).map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    img.apply_orientation(orientation);
    Ok((img, orientation.to_exif()))
}

/// Decodes bytes whose header already passed [`header`] (callers that check the header
/// themselves read it once), waiting for budget on the calling thread; applies the EXIF
/// orientation when `orient` and returns it (1 when none or not applied).
pub fn decode_checked(
    bytes: &[u8],
    h: &Header,
    orient: bool,
) -> Result<(Decoded, u8), DecodeError> {
    let held = futures::executor::block_on(Budget::global().hold(h, bytes.len()))?;
    let (image, orientation) = decode_pixels(bytes, h, orient)?;
    Ok((Decoded { image, _held: held }, orientation))
}

/// Decodes on the calling thread, waiting for budget. Call it where blocking is allowed (a
/// blocking thread, `spawn_blocking`, a CLI); from async code use [`decode_async`].
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Decoded, DecodeError> {
    decode_checked(bytes, &header(bytes, limits)?, false).map(|(d, _)| d)
}

/// [`decode`] with the EXIF orientation applied (what ingest records and trainers see).
pub fn decode_oriented(bytes: &[u8], limits: &Limits) -> Result<(Decoded, u8), DecodeError> {
    decode_checked(bytes, &header(bytes, limits)?, true)
}

/// Waits for budget without blocking the runtime, then decodes on a blocking thread.
pub async fn decode_async(
    bytes: impl AsRef<[u8]> + Send + 'static,
    limits: Limits,
) -> Result<Decoded, DecodeError> {
    let h = header(bytes.as_ref(), &limits)?;
    let held = Budget::global().hold(&h, bytes.as_ref().len()).await?;
    let (image, _) = tokio::task::spawn_blocking(move || decode_pixels(bytes.as_ref(), &h, false))
        .await
        .map_err(|e| DecodeError::Corrupt(format!("decoder stopped: {e}")))??;
    Ok(Decoded { image, _held: held })
}
