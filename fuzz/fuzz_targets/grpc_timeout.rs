//! `wire::parse_grpc_timeout` on any text (a caller's `grpc-timeout` header), and the
//! round trip through `wire::format_grpc_timeout`.
#![no_main]

use infergate::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(d) = wire::parse_grpc_timeout(&text) {
        let formatted = wire::format_grpc_timeout(d);
        assert!(formatted.len() <= 9, "{formatted}");
        let back = wire::parse_grpc_timeout(&formatted).expect("what is formatted parses");
        assert!(back <= d, "{d:?} -> {formatted} -> {back:?}");
    }
});
