#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tower_lb_fuzz::retry_on_response(data));
