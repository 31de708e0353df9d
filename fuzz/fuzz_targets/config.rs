//! `Config::parse` and `Config::validate` on any text (a config file, or a reload sent
//! through the admin API): errors, never panics, and an error names its source.
#![no_main]

use infergate::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, "fuzz.toml") {
        Ok(config) => {
            if let Err(e) = config.validate("fuzz.toml") {
                assert_eq!(e.source, "fuzz.toml");
            }
        }
        Err(e) => assert_eq!(e.source, "fuzz.toml"),
    }
});
