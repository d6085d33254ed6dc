//! Rewriting a disk store's entries in another K/V format ([`KvFormat`]): a store filled
//! in f16 shrinks to about 53% as q8 without recomputing any document (`kvlink store
//! convert`).

use super::store::{decode_entry, entry_header, DiskStore, Lookup};
use super::{DocKey, KvFormat};
use crate::Result;
use std::fs::File;

/// What [`convert_store`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConvertStats {
    /// Entries rewritten in the asked format.
    pub converted: usize,
    /// Their bytes before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Entries already in that format.
    pub unchanged: usize,
    /// Entries left in f16 because q8 cannot hold them (rows that are not whole q8
    /// blocks, or values that are not finite).
    pub kept_f16: usize,
    /// Entries left as they are: unreadable, corrupt, of another cache format version,
    /// or under a file name that is not their key (each reported on stderr), or gone
    /// while the conversion ran.
    pub skipped: usize,
}

/// Rewrites every intact entry of `store` that is not in `format` in `format`, under
/// the same key, keeping its last-use time (so the store's LRU order stays). Safe while
/// other processes use the store: each entry is replaced atomically, and a reader sees
/// the old entry or the new one. q8 to f16 gives back the dequantized values, not the
/// values before quantization. `progress` is called after each entry with (done,
/// total). Stops at the first entry that cannot be written (a full disk).
pub fn convert_store(
    store: &DiskStore,
    format: KvFormat,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ConvertStats> {
    let entries = store.entries()?;
    let mut st = ConvertStats::default();
    for (i, e) in entries.iter().enumerate() {
        if e.format == format {
            st.unchanged += 1;
            progress(i + 1, entries.len());
            continue;
        }
        let checked = std::fs::read(&e.path)
            .map_err(|err| err.to_string())
            // The header names the entry; decoding checks the payload and checksum.
            .and_then(|b| entry_header(&b).map(|h| (b, h)))
            .and_then(|(b, h)| {
                let key = DocKey::new(&h.model_fingerprint, &h.tokenizer_fingerprint, &h.token_ids);
                if key != e.key {
                    return Err(format!("the entry's header gives the key {key}"));
                }
                match decode_entry(
                    &b,
                    &h.model_fingerprint,
                    &h.tokenizer_fingerprint,
                    &h.token_ids,
                ) {
                    Lookup::Hit(kv) => Ok((b.len(), h, kv)),
                    other => Err(format!("{other:?}")),
                }
            });
        let (before, h, kv) = match checked {
            Ok(x) => x,
            Err(why) => {
                eprintln!("kvlink: skipping {}: {why}", e.path.display());
                st.skipped += 1;
                progress(i + 1, entries.len());
                continue;
            }
        };
        let written = store.put_as(
            &e.key,
            &h.model_fingerprint,
            &h.tokenizer_fingerprint,
            &h.token_ids,
            &kv,
            format,
        )?;
        let path = store.path_for(&e.key);
        // The rewrite is not a use: give the entry its last-use time back.
        let after = File::options()
            .write(true)
            .open(&path)
            .and_then(|f| {
                f.set_modified(e.modified)?;
                f.metadata()
            })
            .map_err(|err| crate::Error::io(&path, err))?;
        if written == format {
            st.converted += 1;
            st.bytes_before += before as u64;
            st.bytes_after += after.len();
        } else {
            st.kept_f16 += 1;
        }
        progress(i + 1, entries.len());
    }
    Ok(st)
}
