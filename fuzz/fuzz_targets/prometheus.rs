//! `load_report::parse_prometheus` on any text (a backend's `/metrics` page).
#![no_main]

use infergate::load_report;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // The names the scrape presets read, and one taken from the input itself.
    let own = text.split(['{', ' ', '\n']).next().unwrap_or_default();
    let names = [
        "nv_gpu_utilization",
        "nv_inference_pending_request_count",
        "vllm:num_requests_waiting",
        "vllm:gpu_cache_usage_perc",
        own,
    ];
    for (name, agg) in load_report::parse_prometheus(&text, &names) {
        assert!(names.contains(&name));
        assert!(!agg.sum.is_nan(), "{name}: {agg:?}");
        assert!(!agg.max.is_nan(), "{name}: {agg:?}");
    }
});
