//! A PNG whose iCCP profile inflates to 1 GiB: the decoder must not inflate it.

mod common;

#[global_allocator]
static ALLOC: common::Counting = common::Counting;

#[test]
fn an_iccp_bomb_is_not_inflated() {
    let bomb = common::png(64, 64, 1 << 30);
    assert!(bomb.len() < 4 << 20, "the bomb is small on disk");
    let base = common::reset_peak();
    let res = atelier_decode::decode(&bomb, &atelier_decode::Limits::default());
    let grew = common::peak() - base;
    eprintln!(
        "iCCP bomb: {:?}, peak growth {} KiB",
        res.as_ref().map(|d| d.width()),
        grew >> 10
    );
    assert!(
        grew < 64 << 20,
        "decoding a 64x64 PNG allocated {} MiB for its iCCP chunk",
        grew >> 20
    );
    // Either refused with a reason or decoded without the profile.
    if let Ok(img) = res {
        assert_eq!((img.width(), img.height()), (64, 64));
    }
    // The same through the path that also reads the EXIF orientation (ingest's).
    let base = common::reset_peak();
    let res = atelier_decode::decode_oriented(&bomb, &atelier_decode::Limits::default());
    let grew = common::peak() - base;
    assert!(
        grew < 64 << 20,
        "decode_oriented allocated {} MiB for the iCCP chunk",
        grew >> 20
    );
    if let Ok((img, orientation)) = res {
        assert_eq!((img.width(), orientation), (64, 1));
    }
}
