//! Shares and percentages as the state machines' messages print them ("failure rate
//! 62.5% over 16 calls"). A leaf.

/// `part / whole`, 0 for an empty whole.
pub fn ratio(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        0.0
    } else {
        f64::from(part) / f64::from(whole)
    }
}

/// `0.5` → `"50%"`, `0.125` → `"12.5%"`.
pub fn pct(fraction: f64) -> String {
    let p = fraction * 100.0;
    if (p - p.round()).abs() < 0.05 {
        format!("{p:.0}%")
    } else {
        format!("{p:.1}%")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_read_well() {
        assert_eq!(pct(0.5), "50%");
        assert_eq!(pct(0.125), "12.5%");
        assert_eq!(pct(2.0 / 3.0), "66.7%");
        assert_eq!(ratio(1, 0), 0.0);
        assert_eq!(ratio(1, 4), 0.25);
    }
}
