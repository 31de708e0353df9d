//! Text the gateway and the simulator echo back to callers: a caller's name, cut short
//! enough that it cannot blow up a status message or a log line, and an error told with
//! its causes.

use std::borrow::Cow;

/// Longest a name echoed in a message ([`shown`]) is kept, in characters.
pub const SHOWN_CHARS: usize = 200;

/// `name` as it may be echoed in a status message or a log line: whole when short,
/// else its first [`SHOWN_CHARS`] characters, an ellipsis and its full length, so that
/// a caller's 100 KB model name cannot blow up the trailer that reports it.
pub fn shown(name: &str) -> Cow<'_, str> {
    match name.char_indices().nth(SHOWN_CHARS) {
        None => Cow::Borrowed(name),
        Some((cut, _)) => Cow::Owned(format!("{}… ({} bytes)", &name[..cut], name.len())),
    }
}

/// `text` followed by every error under `err` (its `source()` chain), each one that
/// `text` does not already say: a transport error's own message is often only
/// "transport error" or "connection error", and what happened (refused, reset, a
/// certificate no CA signed) is in its sources.
pub fn with_causes(mut text: String, err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err.source();
    while let Some(e) = cause {
        let line = e.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_cut_for_messages() {
        assert_eq!(shown("simple"), "simple");
        let exact = "m".repeat(SHOWN_CHARS);
        assert!(matches!(shown(&exact), Cow::Borrowed(_)));
        let long = "x".repeat(100 * 1024);
        let cut = shown(&long);
        assert!(cut.starts_with(&"x".repeat(SHOWN_CHARS)));
        assert!(cut.ends_with("… (102400 bytes)"), "{cut}");
        assert!(cut.len() < 240);
        // Cut on a character boundary, whatever the characters.
        let wide = "é".repeat(300);
        let cut = shown(&wide);
        assert!(cut.starts_with(&"é".repeat(SHOWN_CHARS)));
        assert!(cut.ends_with("(600 bytes)"), "{cut}");
    }
}
