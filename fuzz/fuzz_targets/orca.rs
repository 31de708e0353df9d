//! ORCA load reports as backends send them: the binary `OrcaLoadReport` read in place
//! (`load_report::reduce_bytes`), and the `endpoint-load-metrics(-bin)` headers
//! (`load_report::from_headers`: base64 protobuf, `TEXT` and `JSON`), reduced with the
//! default and a custom field selection.
#![no_main]

use base64::Engine;
use http::{HeaderMap, HeaderValue};
use infergate::config::LoadConfig;
use infergate::load_report;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let default = LoadConfig::default();
    let mut custom = LoadConfig::default();
    custom.utilization_fields = vec!["kv".into(), "cpu_utilization".into(), String::new()];
    custom.queue_field = "q".into();
    custom.running_field = "r".into();
    for cfg in [&default, &custom] {
        if let Some(load) = load_report::reduce_bytes(rest, cfg) {
            assert!(load.utilization.is_finite() && load.queue_depth.is_finite());
        }
    }
    let mut headers = HeaderMap::new();
    let value = match mode % 4 {
        0 => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(rest);
            headers.insert(
                "endpoint-load-metrics-bin",
                HeaderValue::from_str(&encoded).expect("base64 is a header value"),
            );
            None
        }
        1 => Some([b"TEXT ", rest].concat()),
        2 => Some([b"JSON ", rest].concat()),
        _ => Some(rest.to_vec()),
    };
    if let Some(value) = value {
        let Ok(value) = HeaderValue::from_bytes(&value) else {
            return;
        };
        let name = if mode % 8 < 4 {
            "endpoint-load-metrics"
        } else {
            "endpoint-load-metrics-bin"
        };
        headers.insert(name, value);
    }
    if let Some((report, _source)) = load_report::from_headers(&headers) {
        for cfg in [&default, &custom] {
            let load = load_report::reduce(&report, cfg);
            assert!(load.utilization.is_finite() && load.queue_depth.is_finite());
        }
    }
});
