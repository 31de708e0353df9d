//! `wire::peek_route`, `wire::peek_int_parameter` and `text::shown` on any bytes: they
//! read request payloads straight from callers, so they must never panic.
#![no_main]

use infergate::wire;
use infergate_base::text;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for with_id in [true, false] {
        if let Ok(key) = wire::peek_route(data, with_id) {
            // What is peeked is what a protobuf decoder would read: the fields exist.
            assert!(key.model.len() + key.version.len() + key.id.len() <= data.len());
        }
    }
    for name in ["timeout", "priority", ""] {
        let _ = wire::peek_int_parameter(data, name);
    }
    let text = String::from_utf8_lossy(data);
    let shown = text::shown(&text);
    assert!(shown.chars().count() <= text::SHOWN_CHARS + 32);
});
