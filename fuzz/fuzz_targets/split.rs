// Shared by the targets that take several files: they are joined by SEP in one input.
pub const SEP: &[u8] = b"\n#kvlink-fuzz-next-file#\n";

/// Split `data` at each SEP.
pub fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(SEP.len()).position(|w| w == SEP) {
        parts.push(&rest[..i]);
        rest = &rest[i + SEP.len()..];
    }
    parts.push(rest);
    parts
}
