//! `wire::Deframer` fed any bytes cut at any places: it never panics, what it emits is
//! exactly the bytes it was given (whole messages, in order), it never holds more
//! buffer than twice what it holds of the message (or 256 bytes), and every byte it
//! charged to its budgets is given back.
#![no_main]

use bytes::Bytes;
use infergate::wire::{Budget, Deframer, FrameError, HEADER_LEN};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

static PROCESS: Budget = Budget::new("max_buffered_request_bytes", usize::MAX);

fuzz_target!(|data: &[u8]| {
    let [a, b, c, rest @ ..] = data else { return };
    // The size limit, the connection's budget and the seed of the cuts come from the
    // first bytes.
    let limit = [0usize, 1, 5, 100, 4096, 1 << 20, u32::MAX as usize][*a as usize % 7];
    let connection = Arc::new(Budget::new(
        "max_buffered_request_bytes_per_connection",
        [usize::MAX, 0, 300, 5000][*b as usize % 4],
    ));
    let bytes = Bytes::copy_from_slice(rest);
    let mut seed = u32::from(*c) | 1;
    let mut deframer = Deframer::with_budgets(limit, &PROCESS, Some(Arc::clone(&connection)));
    let mut out = Vec::new();
    let mut at = 0;
    let mut failed = None;
    while at < bytes.len() {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let end = (at + 1 + seed as usize % 300).min(bytes.len());
        if let Err(e) = deframer.push(bytes.slice(at..end), &mut out) {
            failed = Some(e);
            break;
        }
        // Every byte given is either in a message out or held for the next one.
        let emitted: usize = out.iter().map(|m| m.wire_len()).sum();
        assert_eq!(emitted + deframer.pending(), end);
        // The buffer follows what it holds, not what a prefix announces.
        assert!(deframer.buffered() <= (2 * deframer.pending()).max(256));
        assert!(deframer.buffered() >= deframer.pending());
        assert_eq!(connection.used(), deframer.buffered());
        at = end;
    }
    let emitted: Vec<u8> = out.iter().flat_map(|m| m.framed().to_vec()).collect();
    assert_eq!(
        &emitted[..],
        &rest[..emitted.len()],
        "messages are the input, in order"
    );
    for m in &out {
        assert!(m.wire_len() >= HEADER_LEN && m.wire_len() - HEADER_LEN <= limit);
    }
    match failed {
        None => match deframer.finish() {
            Ok(()) => assert_eq!(emitted.len(), rest.len(), "a clean end used every byte"),
            Err(FrameError::Truncated { have, want }) => {
                assert!(have < want);
                assert_eq!(emitted.len() + have, rest.len());
            }
            Err(other) => panic!("finish can only report truncation: {other:?}"),
        },
        Some(FrameError::Truncated { .. }) => panic!("push never reports truncation"),
        Some(_) => {}
    }
    drop(deframer);
    assert_eq!(connection.used(), 0);
    assert_eq!(PROCESS.used(), 0);
});
