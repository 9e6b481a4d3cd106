//! cargo-fuzz target: `esgz_nbd_fuzz::nbd_stream` on each input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    esgz_nbd_fuzz::nbd_stream(data);
});
