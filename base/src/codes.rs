//! gRPC status codes by name: one parser with one set of rules for every code list in
//! the config (`failure_codes`, `retryable_codes`, ...) and the simulator's controls,
//! and [`CodeSet`], the bit set the request path tests codes against. A leaf: it
//! imports nothing from the crate.
//!
//! The rules: surrounding spaces are ignored, case is ignored (`unavailable` is
//! `UNAVAILABLE`), and a number is read as the code it is (`14`).
//!
//! ```
//! use infergate_base::codes::{parse, CodeSet};
//! use tonic::Code;
//! assert_eq!(parse(" unavailable "), Ok(Code::Unavailable));
//! assert_eq!(parse("4"), Ok(Code::DeadlineExceeded));
//! let set: CodeSet = serde_json::from_str(r#"["UNAVAILABLE", "internal"]"#).unwrap();
//! assert!(set.contains(Code::Internal) && !set.contains(Code::NotFound));
//! ```

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tonic::Code;

/// Every code, in numeric order (`OK` = 0 … `UNAUTHENTICATED` = 16).
pub const ALL: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

/// The canonical upper-case name (`UNAVAILABLE`), as the gRPC specification spells it.
pub fn name(code: Code) -> &'static str {
    infergate_proto::code_name(code)
}

/// Parses a code: its name in any case, or its number; spaces around it are ignored.
pub fn parse(text: &str) -> Result<Code, String> {
    let trimmed = text.trim();
    if let Ok(n) = trimmed.parse::<i32>() {
        return ALL
            .iter()
            .copied()
            .find(|c| *c as i32 == n)
            .ok_or_else(|| format!("unknown gRPC code {n} (codes are 0 to 16)"));
    }
    ALL.iter()
        .copied()
        .find(|c| name(*c).eq_ignore_ascii_case(trimmed))
        .ok_or_else(|| {
            let known: Vec<&str> = ALL.iter().map(|c| name(*c)).collect();
            format!(
                "unknown gRPC code `{text}` (expected one of {})",
                known.join(", ")
            )
        })
}

/// A set of gRPC codes, as a bit mask (a lookup costs one AND). In config files it is
/// a list of code names (or numbers), parsed while the file loads; `OK` is refused,
/// since every list of codes names ways to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CodeSet(u32);

impl CodeSet {
    /// The empty set.
    pub const EMPTY: CodeSet = CodeSet(0);

    /// A set of the given codes.
    pub fn of(codes: &[Code]) -> CodeSet {
        let mut set = CodeSet::EMPTY;
        for &code in codes {
            set.insert(code);
        }
        set
    }

    /// Parses a list of names; an error names the entry (`[2]: unknown gRPC code …`).
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<CodeSet, String> {
        let mut set = CodeSet::EMPTY;
        for (i, text) in names.iter().enumerate() {
            let code = parse(text.as_ref()).map_err(|e| format!("[{i}]: {e}"))?;
            if code == Code::Ok {
                return Err(format!("[{i}]: OK is a success, not a way to fail"));
            }
            set.insert(code);
        }
        Ok(set)
    }

    /// Adds `code`.
    pub fn insert(&mut self, code: Code) {
        if let Some(bit) = Self::bit(code) {
            self.0 |= bit;
        }
    }

    /// Whether `code` is in the set.
    pub fn contains(self, code: Code) -> bool {
        Self::bit(code).is_some_and(|bit| self.0 & bit != 0)
    }

    /// The names in the set, in code order.
    pub fn names(self) -> Vec<&'static str> {
        ALL.iter()
            .filter(|c| self.contains(**c))
            .map(|c| name(*c))
            .collect()
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn bit(code: Code) -> Option<u32> {
        let value = code as i32;
        (0..32).contains(&value).then(|| 1u32 << value)
    }
}

impl Serialize for CodeSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.names().serialize(s)
    }
}

impl<'de> Deserialize<'de> for CodeSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        CodeSet::parse(&names).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_set_of_rules_for_every_list() {
        assert_eq!(parse("UNAVAILABLE"), Ok(Code::Unavailable));
        assert_eq!(parse(" deadline_exceeded "), Ok(Code::DeadlineExceeded));
        assert_eq!(parse("14"), Ok(Code::Unavailable));
        assert!(parse("17").expect_err("out of range").contains("0 to 16"));
        let err = parse("TIMEOUT").expect_err("unknown");
        assert!(
            err.contains("`TIMEOUT`") && err.contains("UNAVAILABLE"),
            "{err}"
        );
        for code in ALL {
            assert_eq!(parse(name(code)), Ok(code));
            assert_eq!(parse(&(code as i32).to_string()), Ok(code));
        }
    }

    #[test]
    fn sets_parse_from_lists_and_refuse_ok() {
        let set = CodeSet::parse(&["unavailable", "DATA_LOSS"]).expect("codes");
        assert_eq!(set, CodeSet::of(&[Code::Unavailable, Code::DataLoss]));
        assert_eq!(set.names(), ["UNAVAILABLE", "DATA_LOSS"]);
        assert!(CodeSet::EMPTY.names().is_empty());
        let err = CodeSet::parse(&["UNAVAILABLE", "UNAVALABLE"]).expect_err("typo");
        assert!(
            err.starts_with("[1]: unknown gRPC code `UNAVALABLE`"),
            "{err}"
        );
        assert!(CodeSet::parse(&["OK"]).expect_err("OK").starts_with("[0]"));
        let json = serde_json::to_string(&set).expect("serializes");
        assert_eq!(json, r#"["UNAVAILABLE","DATA_LOSS"]"#);
        let back: CodeSet = serde_json::from_str(&json).expect("parses back");
        assert_eq!(back, set);
    }
}
