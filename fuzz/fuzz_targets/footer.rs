//! cargo-fuzz target: `esgz_nbd_fuzz::footer` on each input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    esgz_nbd_fuzz::footer(data);
});
