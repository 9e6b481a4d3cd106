//! cargo-fuzz target: `esgz_nbd_fuzz::manifest` on each input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    esgz_nbd_fuzz::manifest(data);
});
