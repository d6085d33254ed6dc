//! The disk store's entry reader (`kv::store::decode_entry`, the byte-slice form of
//! what `DiskStore::get` does to a file): magic, version, header JSON, shape bounds,
//! length, payload, checksum, and the match against the request.
//!
//! Input: one flag byte, then the entry bytes. Flag bit 0 rewrites the trailing
//! checksum to the right one first, so mutations get past it to the header and payload
//! checks; bit 1 asks for no token ids instead of [1, 2, 3].
#![no_main]

use kvlink::kv::store::{decode_entry, encode_entry};
use kvlink::kv::{checksum64, Lookup};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let mut bytes = body.to_vec();
    if flags & 1 == 1 && bytes.len() >= 8 {
        let n = bytes.len() - 8;
        let sum = checksum64(&bytes[..n]);
        bytes[n..].copy_from_slice(&sum.to_le_bytes());
    }
    let ids: &[u32] = if flags & 2 == 0 { &[1, 2, 3] } else { &[] };
    if let Lookup::Hit(kv) = decode_entry(&bytes, "m", "t", ids) {
        kv.validate().expect("a hit is a consistent DocKv");
        assert_eq!(kv.n_tokens, ids.len());
        // What was read writes back to an entry that reads the same.
        let again = encode_entry("m", "t", ids, &kv, 0).expect("re-encode a hit");
        match decode_entry(&again, "m", "t", ids) {
            Lookup::Hit(kv2) => assert!(kv2.k == kv.k && kv2.v == kv.v),
            other => panic!("re-encoded entry does not read back: {other:?}"),
        }
    }
});
