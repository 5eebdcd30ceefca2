//! Helpers for the tests that check the hex test vectors of `protocols/*.md`.

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a hex string; whitespace is ignored.
pub(crate) fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digits"))
        .collect()
}

/// The bytes of the first fenced hex block after `marker` in a spec.
pub(crate) fn vector_after(spec: &str, marker: &str) -> Vec<u8> {
    let after = spec
        .split(marker)
        .nth(1)
        .unwrap_or_else(|| panic!("no {marker:?} in the spec"));
    let block = after
        .split("```")
        .nth(1)
        .expect("a fenced block after the marker");
    unhex(block.trim_start_matches("hex"))
}
