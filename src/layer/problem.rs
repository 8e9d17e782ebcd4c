//! Problem details (RFC 9457) as JSON, written by hand: a handful of string
//! and number members do not need a JSON library.

use std::fmt::Write as _;

/// Where the problem types are described: every `type` is this address with
/// the type's anchor (`...#lock-held`).
pub(crate) const TYPE_BASE: &str =
    "https://docs.rs/tower-lease-lock/latest/tower_lease_lock/layer/enum.RejectionFormat.html#";

/// One `application/problem+json` document.
pub(crate) struct Problem<'a> {
    /// The anchor of the type under [`TYPE_BASE`].
    pub(crate) kind: &'a str,
    pub(crate) title: &'a str,
    pub(crate) status: u16,
    pub(crate) detail: &'a str,
    /// Extension member `lock`: the lock name, when known.
    pub(crate) lock: Option<&'a str>,
    /// Extension member `retry_after`: whole seconds, as in `Retry-After`.
    pub(crate) retry_after: Option<u64>,
}

impl Problem<'_> {
    /// The JSON text, ending with a newline.
    pub(crate) fn to_json(&self) -> String {
        let mut out = String::with_capacity(256);
        out.push_str("{\"type\":\"");
        escape_into(&mut out, TYPE_BASE);
        escape_into(&mut out, self.kind);
        out.push_str("\",\"title\":\"");
        escape_into(&mut out, self.title);
        let _ = write!(out, "\",\"status\":{},\"detail\":\"", self.status);
        escape_into(&mut out, self.detail);
        out.push('"');
        if let Some(lock) = self.lock {
            out.push_str(",\"lock\":\"");
            escape_into(&mut out, lock);
            out.push('"');
        }
        if let Some(secs) = self.retry_after {
            let _ = write!(out, ",\"retry_after\":{secs}");
        }
        out.push_str("}\n");
        out
    }
}

/// Appends `s` as the inside of a JSON string (RFC 8259 section 7): quote,
/// backslash and the control characters U+0000 to U+001F are escaped;
/// everything else, non-ASCII included, is valid as it is.
pub(crate) fn escape_into(out: &mut String, s: &str) {
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(s: &str) -> String {
        let mut out = String::new();
        escape_into(&mut out, s);
        out
    }

    #[test]
    fn escapes_quotes_backslashes_and_control_characters() {
        assert_eq!(escaped(r#"say "hi""#), r#"say \"hi\""#);
        assert_eq!(escaped(r"C:\dir\"), r"C:\\dir\\");
        assert_eq!(escaped("a\nb\rc\td"), r"a\nb\rc\td");
        assert_eq!(escaped("\u{08}\u{0c}"), r"\b\f");
        assert_eq!(escaped("\u{0}\u{1}\u{1f}"), r"\u0000\u0001\u001f");
        // DEL, non-ASCII and the line separators are valid in JSON strings.
        assert_eq!(escaped("\u{7f}é\u{2028}/"), "\u{7f}é\u{2028}/");
    }

    /// Every string from U+0000 to U+00FF, and some beyond, round-trips
    /// through a real JSON parser.
    #[test]
    fn a_json_parser_reads_back_what_was_written() {
        let mut all: String = (0u32..=0xff).filter_map(char::from_u32).collect();
        all.push_str("\"\\\u{2028}\u{1F512}");
        let problem = Problem {
            kind: "lock-held",
            title: "Lock held",
            status: 423,
            detail: &all,
            lock: Some("tenant:\"acme\"\\"),
            retry_after: Some(7),
        };
        let json = problem.to_json();
        assert!(json.ends_with("}\n"), "{json:?}");
        let value: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(value["detail"], all.as_str());
        assert_eq!(value["lock"], "tenant:\"acme\"\\");
        assert_eq!(value["retry_after"], 7);
        assert_eq!(value["status"], 423);
        assert_eq!(value["title"], "Lock held");
        assert_eq!(value["type"], format!("{TYPE_BASE}lock-held"));

        let bare = Problem {
            lock: None,
            retry_after: None,
            ..problem
        };
        let value: serde_json::Value = serde_json::from_str(&bare.to_json()).expect("valid JSON");
        let members: Vec<&str> = value
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(members, ["detail", "status", "title", "type"]);
    }
}
