//! Sixteen decodes at once stay within the process's decode budget.

mod common;

use std::sync::Arc;

use atelier_decode::{Budget, DecodeError, Limits};

#[global_allocator]
static ALLOC: common::Counting = common::Counting;

const BUDGET_MIB: usize = 64;

#[test]
fn sixteen_decodes_at_once_stay_within_the_budget() {
    // SAFETY: the only test in this binary; set before any thread reads it.
    unsafe { std::env::set_var("ATELIER_DECODE_BUDGET_MIB", BUDGET_MIB.to_string()) };
    assert_eq!(Budget::global().total_mib() as usize, BUDGET_MIB);
    // 2000×2000 RGB: 12 MB decoded, about 27 MiB of budget with the RGBA copy callers make.
    let img: Arc<[u8]> = common::png(2000, 2000, 0).into();
    let base = common::reset_peak();
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let img = img.clone();
            std::thread::spawn(move || {
                let d = atelier_decode::decode(&img, &Limits::default()).unwrap();
                // Held while the caller works on it.
                let rgba = d.to_rgba8();
                std::thread::sleep(std::time::Duration::from_millis(20));
                rgba.len()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 2000 * 2000 * 4);
    }
    let blocking = common::peak() - base;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let base = common::reset_peak();
    rt.block_on(async {
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let img = img.clone();
                tokio::spawn(async move {
                    let d = atelier_decode::decode_async(img, Limits::default())
                        .await
                        .unwrap();
                    let rgba = d.to_rgba8();
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    rgba.len()
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), 2000 * 2000 * 4);
        }
    });
    let nonblocking = common::peak() - base;
    eprintln!(
        "16 decodes of 2000x2000 at once, budget {BUDGET_MIB} MiB: peak growth {} MiB (threads), {} MiB (async)",
        blocking >> 20,
        nonblocking >> 20
    );
    // Unbudgeted, 16 decodes hold 16 × 28 MB = 448 MB at once.
    for grew in [blocking, nonblocking] {
        assert!(
            grew < (BUDGET_MIB + 24) << 20,
            "peak grew {} MiB over a {BUDGET_MIB} MiB budget",
            grew >> 20
        );
    }
    assert_eq!(Budget::global().available_mib() as usize, BUDGET_MIB);

    // An image that could never fit is refused at once, naming the budget.
    let huge = common::png(6000, 6000, 0);
    let e = atelier_decode::decode(&huge, &Limits::default()).unwrap_err();
    assert!(matches!(e, DecodeError::OverBudget { .. }), "{e}");
    assert!(e.to_string().contains("ATELIER_DECODE_BUDGET_MIB"), "{e}");
    // And a header over the pixel limit before anything is decoded.
    let e =
        atelier_decode::decode(&huge, &Limits::default().with_max_pixels(1_000_000)).unwrap_err();
    assert_eq!(e.code(), "decompression_bomb");
}
