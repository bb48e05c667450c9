#![no_main]
#[allow(dead_code)] // each target uses one of its functions
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = harness::safetensors(data);
});
