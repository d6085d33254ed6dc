//! On-disk document KV store: one file per entry, `<dir>/<first 2 hex of key>/<key>.kvc`.
//!
//! File layout (all integers little-endian):
//! ```text
//! b"KVLC" | format version u32 | header length u32 | header JSON (EntryHeader)
//!         | payload: K of layers 0..n_layers, then V of layers 0..n_layers
//!         | XXH64 (seed 0) of every byte before it, u64 (see `super::checksum64`)
//! ```
//! The payload's parts are f16 bytes (format version 1, header `dtype` "f16") or the
//! 8-bit parts of [`super::quant`] (format version [`Q8_ENTRY_VERSION`], `dtype` "q8",
//! written by [`DiskStore::put_as`] with [`KvFormat::Q8`]); both are read, whatever the
//! caller writes. Builds that know only version 1 take a q8 entry for a mismatch (and
//! leave it alone), not for a corrupt file.
//! Writes go to a unique temp file in the same directory, are fsynced and then renamed
//! over the final name, so readers see either the old complete file or the new complete
//! file, never a torn one; concurrent writers of one key are fine (the last rename wins).
//! Reads never panic and never trust a file: magic, version, length and checksum are
//! checked, and the stored model/tokenizer fingerprints and token ids must equal the
//! caller's.
//!
//! Lifecycle: the store has a size cap ([`DiskStore::max_bytes`], default
//! [`DEFAULT_MAX_BYTES`]). Opening it runs [`DiskStore::prune`] (cap, moved-aside
//! corrupt files, temp files of dead writers) unless a prune finished less than
//! [`PRUNE_AT_OPEN_AFTER`] ago, by any process (the marker file `<dir>/.last-prune`:
//! its mtime, and the bytes of entries that prune left, which then stand for a scan);
//! so that starting a process does not scan a large store every time. After that, a
//! `put` prunes again whenever this process's estimate of the total (the last scan plus
//! what it wrote since) passes the cap (then down to 90% of it, so that the next puts
//! need no scan), or the last scan is older than [`RESCAN_AFTER`] (other processes
//! write too).
//! Eviction is least recently used: a hit refreshes the entry file's mtime; a use that
//! does not read the file ([`DiskStore::touch`], a hit in the GPU-resident cache)
//! refreshes it at most every [`TOUCH_AFTER`] per entry and process, so that the LRU
//! order is right to within that, and a hot document costs no file system call per
//! request. Only one process prunes at a time (an advisory lock on `<dir>/.prune.lock`, released by the OS
//! if the process dies); the others skip. Removing an entry another process is reading
//! is safe (an open file outlives its name), and one that is being replaced can only be
//! lost (a later miss), never torn.

use super::quant::{self, KvFormat};
use super::{DocKey, DocKv, Xxh64, CACHE_FORMAT_VERSION, DTYPE_BYTES};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use web_time::Instant;

/// File magic.
pub const MAGIC: &[u8; 4] = b"KVLC";
/// Entry file extension.
pub const ENTRY_EXT: &str = "kvc";
/// The format version of q8 entries (f16 entries keep [`CACHE_FORMAT_VERSION`], so
/// that older builds still read them; the key derivation does not change).
pub const Q8_ENTRY_VERSION: u32 = 2;
/// Bytes before the header JSON: magic, version, header length.
const PREFIX_BYTES: u64 = 12;
/// Trailing checksum bytes.
const CHECKSUM_BYTES: u64 = 8;
/// Sanity bounds applied before anything is allocated from header values.
const MAX_LAYERS: usize = 1 << 16;
const MAX_KV_DIM: usize = 1 << 24;
/// Temp files older than this are removed by [`DiskStore::prune`], whoever wrote them.
/// A live writer keeps its temp file's mtime fresh (it writes, then renames at once),
/// so only a writer stalled this long could lose its file (its `put` then fails; no
/// entry is ever torn).
pub const STALE_TMP: Duration = Duration::from_secs(3600);
/// Temp files older than this whose writer (the pid in the file name) no longer runs on
/// this machine are removed too (Linux; elsewhere only [`STALE_TMP`] applies).
pub const DEAD_WRITER_TMP: Duration = Duration::from_secs(60);
/// The default size cap: 20 GB.
pub const DEFAULT_MAX_BYTES: u64 = 20_000_000_000;
/// A `put` rescans the store (and prunes to the cap) at least this often, so that what
/// other processes wrote counts too.
pub const RESCAN_AFTER: Duration = Duration::from_secs(60);
/// A `put` that finds the store over its cap prunes it to `cap - cap / PRUNE_SLACK`.
const PRUNE_SLACK: u64 = 10;
/// Opening a store prunes it unless a prune (by any process) finished less than this
/// long ago and left it under the new cap.
pub const PRUNE_AT_OPEN_AFTER: Duration = Duration::from_secs(600);
/// [`DiskStore::touch`] refreshes an entry's mtime at most this often (per process).
pub const TOUCH_AFTER: Duration = Duration::from_secs(300);
/// The marker of the last prune: mtime = when it finished, content = the entry bytes
/// it left (decimal).
pub const PRUNE_MARKER: &str = ".last-prune";
/// Entries whose last touch this process remembers, at most (older ones are forgotten
/// first; a forgotten entry is only touched once more than needed).
const MAX_TOUCHED: usize = 1 << 16;
/// The lock file that serializes pruning across processes.
const PRUNE_LOCK: &str = ".prune.lock";

/// The JSON header of an entry file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryHeader {
    pub format_version: u32,
    pub model_fingerprint: String,
    pub tokenizer_fingerprint: String,
    pub n_tokens: usize,
    pub n_layers: usize,
    pub kv_dim: usize,
    pub dtype: String,
    /// Milliseconds since the Unix epoch when the entry was written.
    pub created_unix_ms: u64,
    pub token_ids: Vec<u32>,
}

impl EntryHeader {
    /// How the payload's parts are stored (checked when the header is read).
    pub fn format(&self) -> KvFormat {
        KvFormat::from_dtype(&self.dtype).unwrap_or_default()
    }
}

/// Result of [`DiskStore::get`] (a [`DocKv`]) and [`DiskStore::get_with`] (what the
/// caller's [`PayloadSink`] made of the payload).
#[derive(Debug)]
pub enum Lookup<T = DocKv> {
    /// A verified entry for exactly the requested model, tokenizer and tokens.
    Hit(T),
    /// No entry under this key.
    Miss,
    /// An intact entry exists under this key but is not for this request (different
    /// model or tokenizer fingerprint, different token ids: a stale entry or a hash
    /// collision; or another format version). Treat as a miss; the string says why, for
    /// the caller to report. The file is left alone (a later `put` replaces it).
    Mismatch(String),
    /// The entry failed magic/length/checksum/header checks. It has been moved aside
    /// (`<key>.kvc.corrupt`, or deleted) so the next `get` is a `Miss`. Treat as a miss.
    Corrupt(String),
}

impl<T> Lookup<T> {
    pub fn is_hit(&self) -> bool {
        matches!(self, Lookup::Hit(_))
    }

    /// The cache on a hit, `None` for every kind of miss.
    pub fn into_hit(self) -> Option<T> {
        match self {
            Lookup::Hit(kv) => Some(kv),
            _ => None,
        }
    }
}

/// Where [`DiskStore::get_with`] puts an entry's payload while it reads and checksums it,
/// so that the bytes go from the file to their destination (e.g. GPU staging memory) in
/// one pass, through a small buffer that stays in the CPU cache.
pub trait PayloadSink {
    type Output;
    /// The next `bytes` of payload part `part` (K of layer `part` for `part < n_layers`,
    /// then V of layer `part - n_layers`), `offset` bytes into the part. Parts arrive in
    /// order, each from offset 0 to its end. The bytes are not verified yet: a sink must
    /// not act on them before [`PayloadSink::finish`].
    fn write(&mut self, part: usize, offset: usize, bytes: &[u8]);
    /// Host memory (cached, readable) to read the next `len` bytes of `part` at `offset`
    /// into directly, if the sink keeps the payload there; then `write` is not called for
    /// them. The default, `None`, has them read into a small buffer and `write`n.
    fn read_into(&mut self, _part: usize, _offset: usize, _len: usize) -> Option<&mut [u8]> {
        None
    }
    /// Called once the whole entry verified; never for a corrupt or mismatched entry
    /// (the sink is dropped instead).
    fn finish(self) -> Result<Self::Output>;
}

/// The payload as a [`DocKv`] in host memory (q8 parts: dequantized when verified).
struct DocKvSink {
    kv: DocKv,
    /// The q8 parts as read (K of every layer, then V), for a q8 entry.
    q8: Option<Vec<Vec<u8>>>,
}

impl DocKvSink {
    fn part(&mut self, part: usize) -> &mut Vec<u8> {
        if let Some(q8) = &mut self.q8 {
            return &mut q8[part];
        }
        let kv = &mut self.kv;
        if part < kv.n_layers {
            &mut kv.k[part]
        } else {
            &mut kv.v[part - kv.n_layers]
        }
    }
}

impl PayloadSink for DocKvSink {
    type Output = DocKv;
    fn write(&mut self, part: usize, offset: usize, bytes: &[u8]) {
        self.part(part)[offset..offset + bytes.len()].copy_from_slice(bytes);
    }
    fn read_into(&mut self, part: usize, offset: usize, len: usize) -> Option<&mut [u8]> {
        Some(&mut self.part(part)[offset..offset + len])
    }
    fn finish(self) -> Result<DocKv> {
        let DocKvSink { mut kv, q8 } = self;
        if let Some(q8) = q8 {
            let n = kv.n_tokens * kv.kv_dim;
            for (dst, src) in kv.k.iter_mut().chain(kv.v.iter_mut()).zip(&q8) {
                quant::dequantize(src, n, dst)?;
            }
        }
        Ok(kv)
    }
}

fn doc_kv_sink(h: &EntryHeader) -> Result<DocKvSink> {
    // The length check has passed: the file holds this many bytes.
    let lb = h.n_tokens * h.kv_dim * DTYPE_BYTES;
    let layers = || (0..h.n_layers).map(|_| vec![0u8; lb]).collect();
    let q8 = (h.format() == KvFormat::Q8).then(|| {
        let pb = KvFormat::Q8.part_bytes(h.n_tokens * h.kv_dim);
        vec![vec![0u8; pb]; 2 * h.n_layers]
    });
    Ok(DocKvSink {
        kv: DocKv {
            n_tokens: h.n_tokens,
            n_layers: h.n_layers,
            kv_dim: h.kv_dim,
            k: layers(),
            v: layers(),
        },
        q8,
    })
}

/// What the caller asks an entry to be for.
struct Want<'a> {
    model_fingerprint: &'a str,
    tokenizer_fingerprint: &'a str,
    token_ids: &'a [u32],
}

/// Bytes read (and hashed, and handed to the sink) at a time: small enough to stay in
/// L2 between the read, the hash and the sink's copy.
const READ_CHUNK: usize = 256 << 10;

/// Where the time of disk-store reads went (sums over the entries read, on whatever
/// threads): for profiles of the disk tier (`kvlink bench ttft`). JSON: milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ReadTimes {
    /// Entries read (hits or not).
    pub entries: usize,
    /// Payload bytes read.
    pub bytes: u64,
    /// Opening the file, reading and checking its header.
    #[serde(with = "super::serde_ms")]
    pub open: Duration,
    /// The sink's setup (`make`: e.g. GPU rows and staging memory for the payload).
    #[serde(with = "super::serde_ms")]
    pub setup: Duration,
    /// Reading the payload from the file.
    #[serde(with = "super::serde_ms")]
    pub read: Duration,
    /// Its checksum.
    #[serde(with = "super::serde_ms")]
    pub hash: Duration,
    /// Handing it to the sink (e.g. a copy into mapped staging memory).
    #[serde(with = "super::serde_ms")]
    pub copy: Duration,
    /// The sink's finish (e.g. queueing the GPU copies) and the hit's mtime refresh.
    #[serde(with = "super::serde_ms")]
    pub finish: Duration,
}

impl ReadTimes {
    pub fn add(&mut self, o: &ReadTimes) {
        self.entries += o.entries;
        self.bytes += o.bytes;
        self.open += o.open;
        self.setup += o.setup;
        self.read += o.read;
        self.hash += o.hash;
        self.copy += o.copy;
        self.finish += o.finish;
    }
}

/// One entry as listed by [`DiskStore::entries`].
#[derive(Clone, Debug)]
pub struct EntryInfo {
    pub key: DocKey,
    pub path: PathBuf,
    pub n_tokens: usize,
    pub n_layers: usize,
    pub kv_dim: usize,
    /// File size in bytes.
    pub bytes: u64,
    pub model_fingerprint: String,
    pub tokenizer_fingerprint: String,
    pub created_unix_ms: u64,
    /// Last write or last hit.
    pub modified: SystemTime,
    /// How its K/V are stored.
    pub format: KvFormat,
}

/// What [`DiskStore::prune`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneStats {
    /// Entry files removed.
    pub removed_entries: usize,
    /// Moved-aside corrupt files removed.
    pub removed_corrupt: usize,
    /// Temp files of dead or long-stalled writers removed.
    pub removed_tmp: usize,
    /// Bytes freed, including moved-aside corrupt files and stale temp files.
    pub freed_bytes: u64,
    /// Bytes of entry files left.
    pub remaining_bytes: u64,
    /// Another process was pruning; nothing was done (the counts are zero).
    pub skipped_busy: bool,
}

/// What is in a store ([`DiskStore::stats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub entries: usize,
    pub entry_bytes: u64,
    /// Moved-aside corrupt files (removed by the next prune).
    pub corrupt_files: usize,
    pub corrupt_bytes: u64,
    /// Temp files: writes in progress, or left by writers that died.
    pub tmp_files: usize,
    pub tmp_bytes: u64,
    /// Of those, how many the next prune removes.
    pub stale_tmp_files: usize,
    /// Oldest and newest entry mtime (last write or hit).
    pub oldest: Option<SystemTime>,
    pub newest: Option<SystemTime>,
}

/// This process's view of how full the store is (shared by clones).
#[derive(Debug)]
struct Usage {
    /// Entry bytes at the last scan.
    scanned: AtomicU64,
    /// Bytes this process wrote since.
    added: AtomicU64,
    /// When the last scan was.
    last_scan: std::sync::Mutex<Instant>,
    /// When this process last refreshed each entry's mtime (touch, hit, put).
    touched: std::sync::Mutex<HashMap<DocKey, Instant>>,
}

/// The on-disk store. Cheap to clone; many instances (and processes) may share a directory.
#[derive(Clone, Debug)]
pub struct DiskStore {
    dir: PathBuf,
    max_bytes: u64,
    touch_after: Duration,
    usage: std::sync::Arc<Usage>,
}

enum ReadErr {
    Corrupt(String),
    Version(u32),
    Io(io::Error),
    /// The payload sink failed (not the file's fault).
    Sink(Error),
}

impl From<io::Error> for ReadErr {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ReadErr::Corrupt("truncated (unexpected end of file)".into())
        } else {
            ReadErr::Io(e)
        }
    }
}

#[derive(PartialEq, Eq)]
enum FileKind {
    Entry,
    Corrupt,
    Tmp,
}

struct FileRec {
    path: PathBuf,
    kind: FileKind,
    size: u64,
    mtime: SystemTime,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn thread_tag() -> String {
    let s = format!("{:?}", std::thread::current().id());
    let d: String = s.chars().filter(|c| c.is_ascii_digit()).collect();
    if d.is_empty() {
        "0".into()
    } else {
        d
    }
}

impl DiskStore {
    /// `crate::paths::cache_dir()/kv`.
    pub fn default_dir() -> PathBuf {
        crate::paths::cache_dir().join("kv")
    }

    /// Opens the store at [`DiskStore::default_dir`] with the default cap.
    pub fn open_default() -> Result<DiskStore> {
        Self::open(Self::default_dir())
    }

    /// Opens (creating if needed) the store at `dir` with the default cap
    /// ([`DEFAULT_MAX_BYTES`]).
    pub fn open(dir: impl Into<PathBuf>) -> Result<DiskStore> {
        Self::open_with_cap(dir, DEFAULT_MAX_BYTES)
    }

    /// Opens (creating if needed) the store at `dir`, keeping its entries under
    /// `max_bytes` in total (least recently used go first). Prunes now unless the last
    /// prune is recent (see the module docs); a failure to prune is not an error here
    /// (a read-only store can still be read), the next `put` or `prune` tries again.
    pub fn open_with_cap(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<DiskStore> {
        let dir = dir.into();
        if dir.exists() && !dir.is_dir() {
            return Err(Error::Input(format!(
                "kv store {} is not a directory (pass a directory, or --no-store)",
                dir.display()
            )));
        }
        fs::create_dir_all(&dir).map_err(|e| {
            Error::Input(format!(
                "cannot create the kv store directory {}: {e}",
                dir.display()
            ))
        })?;
        let store = DiskStore {
            max_bytes,
            ..DiskStore::inspect(dir)
        };
        match store.last_prune() {
            // Recent, and under this cap: what it left stands for a scan, as old as it is.
            Some((bytes, age)) if bytes <= max_bytes => {
                let u = &store.usage;
                u.scanned.store(bytes, Ordering::Relaxed);
                if let Ok(mut t) = u.last_scan.lock() {
                    let now = Instant::now();
                    *t = now.checked_sub(age).unwrap_or(now);
                }
            }
            _ => {
                let _ = store.prune(max_bytes);
            }
        }
        Ok(store)
    }

    /// The last prune's bytes left and age, if it finished less than
    /// [`PRUNE_AT_OPEN_AFTER`] ago (and its marker reads back).
    fn last_prune(&self) -> Option<(u64, Duration)> {
        let p = self.dir.join(PRUNE_MARKER);
        let mtime = fs::metadata(&p).and_then(|m| m.modified()).ok()?;
        // A marker from the future (clock changes) is not trusted.
        let age = SystemTime::now().duration_since(mtime).ok()?;
        if age >= PRUNE_AT_OPEN_AFTER {
            return None;
        }
        let bytes = fs::read_to_string(&p).ok()?.trim().parse().ok()?;
        Some((bytes, age))
    }

    /// The same store, refreshing entries on [`DiskStore::touch`] at most every `every`
    /// (default [`TOUCH_AFTER`]; zero: on every touch).
    pub fn with_touch_after(mut self, every: Duration) -> DiskStore {
        self.touch_after = every;
        self
    }

    /// The store at `dir` as it is: nothing created, nothing pruned (for looking at a
    /// store, e.g. `kvlink store stats`). Default cap.
    pub fn inspect(dir: impl Into<PathBuf>) -> DiskStore {
        DiskStore {
            dir: dir.into(),
            max_bytes: DEFAULT_MAX_BYTES,
            touch_after: TOUCH_AFTER,
            usage: std::sync::Arc::new(Usage {
                scanned: AtomicU64::new(0),
                added: AtomicU64::new(0),
                last_scan: std::sync::Mutex::new(Instant::now()),
                touched: std::sync::Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The size cap in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// After a `put` of `bytes`: prune if this process's estimate passes the cap or the
    /// last scan is old.
    fn note_written(&self, bytes: u64) {
        let u = &self.usage;
        let added = u.added.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let over = u.scanned.load(Ordering::Relaxed).saturating_add(added) > self.max_bytes;
        let old = u
            .last_scan
            .lock()
            .map(|t| t.elapsed() > RESCAN_AFTER)
            .unwrap_or(true);
        if over {
            // Down to a low-water mark, so that the next puts do not each rescan.
            let _ = self.prune(self.max_bytes - self.max_bytes / PRUNE_SLACK);
        } else if old {
            let _ = self.prune(self.max_bytes);
        }
    }

    /// Where the entry for `key` lives.
    pub fn path_for(&self, key: &DocKey) -> PathBuf {
        let k = key.as_str();
        let shard = k.get(..2).unwrap_or("00");
        self.dir.join(shard).join(format!("{k}.{ENTRY_EXT}"))
    }

    /// Marks the entry for `key` as just used (its mtime, which eviction orders by), for
    /// a use that did not read it from disk (e.g. a hit in the GPU-resident cache). Only
    /// if this process has not refreshed it (touch, hit or put) in the last
    /// [`TOUCH_AFTER`]: otherwise nothing, not even a file system call. Best effort:
    /// `true` if the mtime was set now; `false` if it was not due, or there is no such
    /// entry, or it cannot be touched.
    pub fn touch(&self, key: &DocKey) -> bool {
        if !self.touch_due(key) {
            return false;
        }
        let ok =
            File::open(self.path_for(key)).is_ok_and(|f| f.set_modified(SystemTime::now()).is_ok());
        if ok {
            self.note_touched(key);
        }
        ok
    }

    fn touch_due(&self, key: &DocKey) -> bool {
        let Ok(t) = self.usage.touched.lock() else {
            return true;
        };
        t.get(key).is_none_or(|at| at.elapsed() >= self.touch_after)
    }

    /// This process has just set the entry's mtime.
    fn note_touched(&self, key: &DocKey) {
        let Ok(mut t) = self.usage.touched.lock() else {
            return;
        };
        if t.len() >= MAX_TOUCHED && !t.contains_key(key) {
            // Those not due anyway go first; if all are recent, forget them all (each
            // costs one early touch at most).
            let every = self.touch_after;
            t.retain(|_, at| at.elapsed() < every);
            if t.len() >= MAX_TOUCHED {
                t.clear();
            }
        }
        t.insert(key.clone(), Instant::now());
    }

    pub fn contains(&self, key: &DocKey) -> bool {
        self.path_for(key).is_file()
    }

    /// Removes the entry; `Ok(false)` if there was none.
    pub fn remove(&self, key: &DocKey) -> Result<bool> {
        let p = self.path_for(key);
        match fs::remove_file(&p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(p, e)),
        }
    }

    /// Stores `kv` under `key`, atomically replacing any previous entry. `key` must be
    /// `DocKey::new(model_fingerprint, tokenizer_fingerprint, token_ids)` and
    /// `token_ids.len()` must equal `kv.n_tokens`.
    pub fn put(
        &self,
        key: &DocKey,
        model_fingerprint: &str,
        tokenizer_fingerprint: &str,
        token_ids: &[u32],
        kv: &DocKv,
    ) -> Result<()> {
        self.put_as(
            key,
            model_fingerprint,
            tokenizer_fingerprint,
            token_ids,
            kv,
            KvFormat::F16,
        )
        .map(|_| ())
    }

    /// [`DiskStore::put`] in `format`: [`KvFormat::Q8`] stores about 53% of the bytes
    /// ([`super::quant`]); a cache whose rows are not whole q8 blocks, or that holds a
    /// value that is not finite, is stored as f16. Returns the format written.
    pub fn put_as(
        &self,
        key: &DocKey,
        model_fingerprint: &str,
        tokenizer_fingerprint: &str,
        token_ids: &[u32],
        kv: &DocKv,
        format: KvFormat,
    ) -> Result<KvFormat> {
        kv.validate()?;
        if token_ids.len() != kv.n_tokens {
            return Err(Error::Input(format!(
                "kv store put: {} token ids for a DocKv of {} tokens",
                token_ids.len(),
                kv.n_tokens
            )));
        }
        let want = DocKey::new(model_fingerprint, tokenizer_fingerprint, token_ids);
        if &want != key {
            return Err(Error::Input(format!(
                "kv store put: key {key} does not match its fields (expected {want})"
            )));
        }
        let payload = Payload::new(kv, format);
        let json = header_json(
            model_fingerprint,
            tokenizer_fingerprint,
            token_ids,
            kv,
            payload.format(),
            now_unix_ms(),
        )?;

        let entry_bytes = PREFIX_BYTES + json.len() as u64 + payload.bytes() + CHECKSUM_BYTES;
        self.write_file(key, entry_bytes, |w| write_entry(w, &json, &payload))?;
        Ok(payload.format())
    }

    /// [`DiskStore::put`] of an entry's bytes as they are: an entry [`encode_entry_as`]
    /// made, or one read from a shared tier (so that it keeps its format and creation
    /// time, and a cache is quantized once for both tiers). The bytes must be an intact
    /// entry (magic, version, lengths, checksum: [`check_entry`]) whose header gives
    /// `key`; anything else is refused, and nothing is written.
    pub fn put_entry(&self, key: &DocKey, entry: &[u8]) -> Result<()> {
        let h = check_entry(entry).map_err(|why| {
            Error::Input(format!("kv store put: not an intact cache entry ({why})"))
        })?;
        let want = DocKey::new(&h.model_fingerprint, &h.tokenizer_fingerprint, &h.token_ids);
        if &want != key {
            return Err(Error::Input(format!(
                "kv store put: key {key} does not match the entry's header (expected {want})"
            )));
        }
        self.write_file(key, entry.len() as u64, |w| w.write_all(entry))
    }

    /// Writes `key`'s entry file atomically (a temporary file, synced, then renamed over
    /// any previous entry) with `emit`, which writes `entry_bytes` bytes; refuses an
    /// entry over the store's cap.
    fn write_file(
        &self,
        key: &DocKey,
        entry_bytes: u64,
        emit: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
    ) -> Result<()> {
        if entry_bytes > self.max_bytes {
            return Err(Error::Input(format!(
                "kv store: an entry of {entry_bytes} bytes does not fit the store's cap of {} \
                 bytes (raise the cap, e.g. --store-max-gb)",
                self.max_bytes
            )));
        }
        let final_path = self.path_for(key);
        let shard = final_path
            .parent()
            .expect("entry path has a parent")
            .to_path_buf();
        fs::create_dir_all(&shard).map_err(|e| Error::io(&shard, e))?;
        let (tmp_path, file) = self.create_tmp(&shard, key)?;

        let write = || -> io::Result<()> {
            let mut w = BufWriter::with_capacity(1 << 20, file);
            emit(&mut w)?;
            let file = w.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            drop(file);
            fs::rename(&tmp_path, &final_path)?;
            Ok(())
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp_path);
            return Err(Error::io(&final_path, e));
        }
        sync_dir(&shard);
        self.note_touched(key);
        self.note_written(entry_bytes);
        Ok(())
    }

    fn create_tmp(&self, shard: &Path, key: &DocKey) -> Result<(PathBuf, File)> {
        let pid = std::process::id();
        let tid = thread_tag();
        loop {
            let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let p = shard.join(format!(".{key}.{pid}.{tid}.{n}.tmp"));
            match OpenOptions::new().write(true).create_new(true).open(&p) {
                Ok(f) => return Ok((p, f)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(p, e)),
            }
        }
    }

    /// Looks up `key` and returns the cache only if the stored entry is intact and was
    /// computed for exactly this model fingerprint, tokenizer fingerprint and token ids.
    /// `Err` only for I/O failures other than a missing file (e.g. permissions).
    pub fn get(
        &self,
        key: &DocKey,
        model_fingerprint: &str,
        tokenizer_fingerprint: &str,
        token_ids: &[u32],
    ) -> Result<Lookup> {
        self.get_with(
            key,
            model_fingerprint,
            tokenizer_fingerprint,
            token_ids,
            doc_kv_sink,
            &mut ReadTimes::default(),
        )
    }

    /// [`DiskStore::get`], but the payload goes to the sink that `make` builds for the
    /// entry's (checked) header, in one pass with the checksum: no copy of the whole
    /// entry in host memory. The same checks, in the same order, decide the result; the
    /// sink is only finished (and its output returned) on a `Hit`. `Err` also when
    /// `make` or the sink fails. Where the time went is added to `times`.
    pub fn get_with<S: PayloadSink>(
        &self,
        key: &DocKey,
        model_fingerprint: &str,
        tokenizer_fingerprint: &str,
        token_ids: &[u32],
        make: impl FnOnce(&EntryHeader) -> Result<S>,
        times: &mut ReadTimes,
    ) -> Result<Lookup<S::Output>> {
        let want = Want {
            model_fingerprint,
            tokenizer_fingerprint,
            token_ids,
        };
        let t0 = Instant::now();
        let path = self.path_for(key);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Lookup::Miss),
            Err(e) => return Err(Error::io(path, e)),
        };
        times.entries += 1;
        times.open += t0.elapsed();
        let read = file
            .metadata()
            .map_err(ReadErr::from)
            .and_then(|md| read_entry_into(&mut file, md.len(), &want, make, times));
        match read {
            Ok(found) => {
                if found.is_hit() {
                    let t = Instant::now();
                    // Best effort: a hit refreshes the mtime so prune() evicts least
                    // recently used.
                    if file.set_modified(SystemTime::now()).is_ok() {
                        self.note_touched(key);
                    }
                    times.finish += t.elapsed();
                }
                Ok(found)
            }
            Err(ReadErr::Io(e)) => Err(Error::io(path, e)),
            Err(ReadErr::Sink(e)) => Err(e),
            Err(ReadErr::Version(v)) => Ok(Lookup::Mismatch(version_mismatch(v))),
            Err(ReadErr::Corrupt(reason)) => {
                move_aside(&path, &file);
                Ok(Lookup::Corrupt(reason))
            }
        }
    }

    fn scan(&self) -> Result<Vec<FileRec>> {
        let mut out = Vec::new();
        let top = match fs::read_dir(&self.dir) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io(&self.dir, e)),
        };
        for shard in top {
            let shard = shard.map_err(|e| Error::io(&self.dir, e))?;
            let sp = shard.path();
            let name = shard.file_name();
            let name = name.to_string_lossy();
            if name.len() != 2 || !sp.is_dir() {
                continue;
            }
            let rd = match fs::read_dir(&sp) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&sp, e)),
            };
            for f in rd {
                let Ok(f) = f else { continue };
                let fname = f.file_name().to_string_lossy().into_owned();
                let kind = if fname.starts_with('.') && fname.ends_with(".tmp") {
                    FileKind::Tmp
                } else if fname.ends_with(".kvc.corrupt") {
                    FileKind::Corrupt
                } else if fname.ends_with(".kvc") {
                    FileKind::Entry
                } else {
                    continue;
                };
                // Files can vanish under concurrent prune/put: skip them.
                let Ok(md) = f.metadata() else { continue };
                if !md.is_file() {
                    continue;
                }
                out.push(FileRec {
                    path: f.path(),
                    kind,
                    size: md.len(),
                    mtime: md.modified().unwrap_or(UNIX_EPOCH),
                });
            }
        }
        Ok(out)
    }

    /// All readable entries (files whose header cannot be read are left out here but
    /// still count in [`DiskStore::total_bytes`] and are removed by `get`/`prune`).
    pub fn entries(&self) -> Result<Vec<EntryInfo>> {
        let mut out = Vec::new();
        for r in self.scan()? {
            if r.kind != FileKind::Entry {
                continue;
            }
            let Some(stem) = r.path.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
                continue;
            };
            let Some(key) = DocKey::from_hex(&stem) else {
                continue;
            };
            let Ok(mut f) = File::open(&r.path) else {
                continue;
            };
            let Ok(h) = read_header(&mut f, r.size) else {
                continue;
            };
            let format = h.format();
            out.push(EntryInfo {
                key,
                path: r.path,
                n_tokens: h.n_tokens,
                n_layers: h.n_layers,
                kv_dim: h.kv_dim,
                bytes: r.size,
                model_fingerprint: h.model_fingerprint,
                tokenizer_fingerprint: h.tokenizer_fingerprint,
                created_unix_ms: h.created_unix_ms,
                modified: r.mtime,
                format,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Total size of all entry files.
    pub fn total_bytes(&self) -> Result<u64> {
        Ok(self
            .scan()?
            .iter()
            .filter(|r| r.kind == FileKind::Entry)
            .map(|r| r.size)
            .sum())
    }

    /// What is in the store now (one directory scan).
    pub fn stats(&self) -> Result<StoreStats> {
        let now = SystemTime::now();
        let mut st = StoreStats::default();
        for r in self.scan()? {
            match r.kind {
                FileKind::Entry => {
                    st.entries += 1;
                    st.entry_bytes += r.size;
                    st.oldest = Some(st.oldest.map_or(r.mtime, |o| o.min(r.mtime)));
                    st.newest = Some(st.newest.map_or(r.mtime, |o| o.max(r.mtime)));
                }
                FileKind::Corrupt => {
                    st.corrupt_files += 1;
                    st.corrupt_bytes += r.size;
                }
                FileKind::Tmp => {
                    st.tmp_files += 1;
                    st.tmp_bytes += r.size;
                    if tmp_is_stale(&r.path, r.mtime, now) {
                        st.stale_tmp_files += 1;
                    }
                }
            }
        }
        Ok(st)
    }

    /// Removes moved-aside corrupt files and temp files of dead writers (see
    /// [`STALE_TMP`], [`DEAD_WRITER_TMP`]), then entries, oldest mtime (last write or
    /// hit) first, until the entries total at most `max_bytes`. If another process is
    /// pruning the same store right now, returns at once with `skipped_busy` set.
    pub fn prune(&self, max_bytes: u64) -> Result<PruneStats> {
        let mut st = PruneStats::default();
        let lock_path = self.dir.join(PRUNE_LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                st.skipped_busy = true;
                return Ok(st);
            }
            Err(fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path, e)),
        }
        let now = SystemTime::now();
        let mut entries = Vec::new();
        for r in self.scan()? {
            match r.kind {
                FileKind::Entry => entries.push(r),
                FileKind::Corrupt => {
                    if fs::remove_file(&r.path).is_ok() {
                        st.removed_corrupt += 1;
                        st.freed_bytes += r.size;
                    }
                }
                FileKind::Tmp => {
                    if tmp_is_stale(&r.path, r.mtime, now) && fs::remove_file(&r.path).is_ok() {
                        st.removed_tmp += 1;
                        st.freed_bytes += r.size;
                    }
                }
            }
        }
        entries.sort_by(|a, b| a.mtime.cmp(&b.mtime).then_with(|| a.path.cmp(&b.path)));
        let mut total: u64 = entries.iter().map(|r| r.size).sum();
        for r in &entries {
            if total <= max_bytes {
                break;
            }
            match fs::remove_file(&r.path) {
                Ok(()) => {
                    st.removed_entries += 1;
                    st.freed_bytes += r.size;
                    total -= r.size;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => total -= r.size,
                Err(e) => return Err(Error::io(&r.path, e)),
            }
        }
        st.remaining_bytes = total;
        // For the next opens (best effort: without it they prune again).
        let _ = fs::write(self.dir.join(PRUNE_MARKER), format!("{total}\n"));
        self.usage.scanned.store(total, Ordering::Relaxed);
        self.usage.added.store(0, Ordering::Relaxed);
        if let Ok(mut t) = self.usage.last_scan.lock() {
            *t = Instant::now();
        }
        drop(lock);
        Ok(st)
    }
}

/// Whether a temp file can no longer belong to a live writer: older than [`STALE_TMP`],
/// or older than [`DEAD_WRITER_TMP`] with its writer's pid (from the name
/// `.<key>.<pid>.<thread>.<n>.tmp`) not running on this machine.
fn tmp_is_stale(path: &Path, mtime: SystemTime, now: SystemTime) -> bool {
    let age = now.duration_since(mtime).unwrap_or(Duration::ZERO);
    if age > STALE_TMP {
        return true;
    }
    if age <= DEAD_WRITER_TMP {
        return false;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let pid = name
        .as_deref()
        .and_then(|n| n.split('.').nth(2))
        .and_then(|p| p.parse::<u32>().ok());
    match pid {
        Some(pid) => !pid_alive(pid),
        None => false,
    }
}

/// Whether a process with this id runs on this machine (Linux: `/proc/<pid>`). Where
/// that cannot be told, every pid counts as alive.
fn pid_alive(pid: u32) -> bool {
    let proc_dir = Path::new("/proc");
    if cfg!(target_os = "linux") && proc_dir.join("self").exists() {
        proc_dir.join(pid.to_string()).exists()
    } else {
        true
    }
}

/// The JSON header of a new entry.
fn header_json(
    model_fingerprint: &str,
    tokenizer_fingerprint: &str,
    token_ids: &[u32],
    kv: &DocKv,
    format: KvFormat,
    created_unix_ms: u64,
) -> Result<Vec<u8>> {
    let header = EntryHeader {
        format_version: entry_version(format),
        model_fingerprint: model_fingerprint.to_string(),
        tokenizer_fingerprint: tokenizer_fingerprint.to_string(),
        n_tokens: kv.n_tokens,
        n_layers: kv.n_layers,
        kv_dim: kv.kv_dim,
        dtype: format.dtype().into(),
        created_unix_ms,
        token_ids: token_ids.to_vec(),
    };
    let json = serde_json::to_vec(&header)
        .map_err(|e| Error::Input(format!("kv store: header encoding: {e}")))?;
    u32::try_from(json.len()).map_err(|_| Error::Input("kv store: header too large".into()))?;
    Ok(json)
}

/// The prefix (and header) format version of an entry in `format`.
fn entry_version(format: KvFormat) -> u32 {
    match format {
        KvFormat::F16 => CACHE_FORMAT_VERSION,
        KvFormat::Q8 => Q8_ENTRY_VERSION,
    }
}

/// An entry's payload: the cache's f16 parts, or their q8 form.
enum Payload<'a> {
    F16(&'a DocKv),
    Q8(Vec<Vec<u8>>),
}

impl<'a> Payload<'a> {
    /// `kv` in `format` where it can be (else f16: see [`DiskStore::put_as`]).
    fn new(kv: &'a DocKv, format: KvFormat) -> Payload<'a> {
        if format == KvFormat::Q8 && format.fits(kv.kv_dim) {
            let parts: Vec<&Vec<u8>> = kv.k.iter().chain(kv.v.iter()).collect();
            if let Ok(parts) = quantize_parts(&parts) {
                return Payload::Q8(parts);
            }
        }
        Payload::F16(kv)
    }

    fn format(&self) -> KvFormat {
        match self {
            Payload::F16(_) => KvFormat::F16,
            Payload::Q8(_) => KvFormat::Q8,
        }
    }

    fn parts(&self) -> Box<dyn Iterator<Item = &[u8]> + '_> {
        match self {
            Payload::F16(kv) => Box::new(kv.k.iter().chain(kv.v.iter()).map(|l| &l[..])),
            Payload::Q8(parts) => Box::new(parts.iter().map(|p| &p[..])),
        }
    }

    fn bytes(&self) -> u64 {
        self.parts().map(|p| p.len() as u64).sum()
    }
}

/// [`quant::quantize`] of every part, on several threads where there are (a document
/// of the 1B model is 32 parts of 256k values, about 1 ns a value on one core).
fn quantize_parts(parts: &[&Vec<u8>]) -> Result<Vec<Vec<u8>>> {
    let one = |p: &&Vec<u8>| {
        let mut q = Vec::new();
        quant::quantize(p, &mut q).map(|_| q)
    };
    let lost = || Err(Error::Input("q8: a quantizing thread panicked".into()));
    crate::par::map(parts, one, lost).into_iter().collect()
}

/// Write one entry (see the module docs for the layout) after its header JSON.
fn write_entry(w: &mut impl Write, json: &[u8], payload: &Payload) -> io::Result<()> {
    let mut h = Xxh64::new(0);
    let mut emit = |w: &mut dyn Write, b: &[u8]| -> io::Result<()> {
        h.update(b);
        w.write_all(b)
    };
    emit(w, MAGIC)?;
    emit(w, &entry_version(payload.format()).to_le_bytes())?;
    emit(w, &(json.len() as u32).to_le_bytes())?;
    emit(w, json)?;
    for part in payload.parts() {
        emit(w, part)?;
    }
    w.write_all(&h.finish().to_le_bytes())
}

/// One entry file's bytes, exactly as [`DiskStore::put`] writes them (for stores that
/// are not directories, such as the browser's). `created_unix_ms` goes in the header.
pub fn encode_entry(
    model_fingerprint: &str,
    tokenizer_fingerprint: &str,
    token_ids: &[u32],
    kv: &DocKv,
    created_unix_ms: u64,
) -> Result<Vec<u8>> {
    encode_entry_as(
        model_fingerprint,
        tokenizer_fingerprint,
        token_ids,
        kv,
        KvFormat::F16,
        created_unix_ms,
    )
}

/// [`encode_entry`] in `format`, as [`DiskStore::put_as`] writes it.
pub fn encode_entry_as(
    model_fingerprint: &str,
    tokenizer_fingerprint: &str,
    token_ids: &[u32],
    kv: &DocKv,
    format: KvFormat,
    created_unix_ms: u64,
) -> Result<Vec<u8>> {
    kv.validate()?;
    if token_ids.len() != kv.n_tokens {
        return Err(Error::Input(format!(
            "kv store: {} token ids for a DocKv of {} tokens",
            token_ids.len(),
            kv.n_tokens
        )));
    }
    let payload = Payload::new(kv, format);
    let json = header_json(
        model_fingerprint,
        tokenizer_fingerprint,
        token_ids,
        kv,
        payload.format(),
        created_unix_ms,
    )?;
    let mut out = Vec::with_capacity(json.len() + payload.bytes() as usize + 32);
    write_entry(&mut out, &json, &payload).map_err(|e| Error::Input(format!("kv store: {e}")))?;
    Ok(out)
}

/// Check one entry file's bytes as [`DiskStore::get`] checks a file: intact (magic,
/// version, length, checksum) and for exactly this model, tokenizer and token ids.
pub fn decode_entry(
    bytes: &[u8],
    model_fingerprint: &str,
    tokenizer_fingerprint: &str,
    token_ids: &[u32],
) -> Lookup {
    let want = Want {
        model_fingerprint,
        tokenizer_fingerprint,
        token_ids,
    };
    let mut r = bytes;
    match read_entry_into(
        &mut r,
        bytes.len() as u64,
        &want,
        doc_kv_sink,
        &mut ReadTimes::default(),
    ) {
        Ok(found) => found,
        Err(ReadErr::Version(v)) => Lookup::Mismatch(version_mismatch(v)),
        Err(ReadErr::Corrupt(reason)) => Lookup::Corrupt(reason),
        Err(ReadErr::Io(e)) => Lookup::Corrupt(e.to_string()),
        Err(ReadErr::Sink(e)) => Lookup::Corrupt(e.to_string()),
    }
}

/// The header of one entry file's bytes (magic, version and header fields checked; the
/// payload and checksum are not: [`check_entry`] or [`decode_entry`] check those).
pub fn entry_header(bytes: &[u8]) -> std::result::Result<EntryHeader, String> {
    let mut r = bytes;
    match read_header_hashed(&mut r, bytes.len() as u64, &mut Xxh64::new(0)) {
        Ok((h, _)) => Ok(h),
        Err(ReadErr::Version(v)) => Err(version_mismatch(v)),
        Err(ReadErr::Corrupt(why)) => Err(why),
        Err(ReadErr::Io(e)) => Err(e.to_string()),
        Err(ReadErr::Sink(e)) => Err(e.to_string()),
    }
}

/// The header of one entry file's bytes, if they are an intact entry of this cache
/// format (magic, version, length, checksum); why not otherwise.
pub fn check_entry(bytes: &[u8]) -> std::result::Result<EntryHeader, String> {
    let h = entry_header(bytes)?;
    let want = Want {
        model_fingerprint: &h.model_fingerprint,
        tokenizer_fingerprint: &h.tokenizer_fingerprint,
        token_ids: &h.token_ids,
    };
    let mut r = bytes;
    // Checked, not decoded: the payload only passes through the checksum.
    match read_entry_into(
        &mut r,
        bytes.len() as u64,
        &want,
        |_| Ok(Discard),
        &mut ReadTimes::default(),
    ) {
        Ok(Lookup::Hit(())) => Ok(h),
        Ok(Lookup::Corrupt(why) | Lookup::Mismatch(why)) => Err(why),
        Ok(Lookup::Miss) => Err("no entry".into()),
        Err(ReadErr::Version(v)) => Err(version_mismatch(v)),
        Err(ReadErr::Corrupt(why)) => Err(why),
        Err(ReadErr::Io(e)) => Err(e.to_string()),
        Err(ReadErr::Sink(e)) => Err(e.to_string()),
    }
}

/// A sink that keeps nothing, for checking an entry.
struct Discard;

impl PayloadSink for Discard {
    type Output = ();
    fn write(&mut self, _part: usize, _offset: usize, _bytes: &[u8]) {}
    fn finish(self) -> Result<()> {
        Ok(())
    }
}

fn version_mismatch(v: u32) -> String {
    format!(
        "entry has cache format version {v}, this build reads {CACHE_FORMAT_VERSION} and \
         {Q8_ENTRY_VERSION}"
    )
}

/// Why an intact entry is not the one asked for, if it is not.
fn header_mismatch(header: &EntryHeader, want: &Want) -> Option<String> {
    if header.model_fingerprint != want.model_fingerprint {
        return Some(format!(
            "entry is for model {:?}, asked for {:?}",
            header.model_fingerprint, want.model_fingerprint
        ));
    }
    if header.tokenizer_fingerprint != want.tokenizer_fingerprint {
        return Some(format!(
            "entry is for tokenizer {:?}, asked for {:?}",
            header.tokenizer_fingerprint, want.tokenizer_fingerprint
        ));
    }
    if header.token_ids != want.token_ids {
        return Some(format!(
            "entry holds different token ids ({} tokens, asked for {}): key collision or stale entry",
            header.token_ids.len(),
            want.token_ids.len()
        ));
    }
    None
}

fn read_u32(r: &mut impl Read, h: &mut Xxh64) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    h.update(&b);
    Ok(u32::from_le_bytes(b))
}

/// Reads magic, version and header; leaves `f` at the start of the payload, whose file
/// offset it returns with the header.
fn read_header_hashed(
    f: &mut impl Read,
    file_len: u64,
    h: &mut Xxh64,
) -> std::result::Result<(EntryHeader, u64), ReadErr> {
    if file_len < PREFIX_BYTES + CHECKSUM_BYTES {
        return Err(ReadErr::Corrupt(format!("truncated: {file_len} bytes")));
    }
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic)?;
    h.update(&magic);
    if &magic != MAGIC {
        return Err(ReadErr::Corrupt(format!("bad magic {magic:02x?}")));
    }
    let version = read_u32(f, h)?;
    if version != CACHE_FORMAT_VERSION && version != Q8_ENTRY_VERSION {
        return Err(ReadErr::Version(version));
    }
    let hlen = read_u32(f, h)? as u64;
    if hlen > file_len - PREFIX_BYTES - CHECKSUM_BYTES {
        return Err(ReadErr::Corrupt(format!(
            "header length {hlen} exceeds file size {file_len}"
        )));
    }
    let mut json = vec![0u8; hlen as usize];
    f.read_exact(&mut json)?;
    h.update(&json);
    let header: EntryHeader =
        serde_json::from_slice(&json).map_err(|e| ReadErr::Corrupt(format!("bad header: {e}")))?;
    if header.format_version != version {
        return Err(ReadErr::Corrupt(format!(
            "header says format version {}, file prefix says {version}",
            header.format_version
        )));
    }
    let format = KvFormat::from_dtype(&header.dtype);
    if format.map(entry_version) != Some(version) {
        return Err(ReadErr::Corrupt(format!(
            "dtype {:?} in a version {version} entry",
            header.dtype
        )));
    }
    if !header.format().fits(header.kv_dim) {
        return Err(ReadErr::Corrupt(format!(
            "kv_dim {} is not whole {} blocks",
            header.kv_dim, header.dtype
        )));
    }
    if header.token_ids.len() != header.n_tokens {
        return Err(ReadErr::Corrupt(format!(
            "header has n_tokens {} but {} token ids",
            header.n_tokens,
            header.token_ids.len()
        )));
    }
    if header.n_layers > MAX_LAYERS || header.kv_dim > MAX_KV_DIM {
        return Err(ReadErr::Corrupt(format!(
            "implausible shape: n_layers {} kv_dim {}",
            header.n_layers, header.kv_dim
        )));
    }
    Ok((header, PREFIX_BYTES + hlen))
}

fn read_header(f: &mut File, file_len: u64) -> std::result::Result<EntryHeader, ReadErr> {
    read_header_hashed(f, file_len, &mut Xxh64::new(0)).map(|(h, _)| h)
}

/// Reads one entry: header checks, then the payload in [`READ_CHUNK`] pieces, each
/// hashed and (if the header is the one asked for) handed to the sink, then the checksum.
/// Corrupt beats mismatched, as it always has: a mismatch is reported only for an intact
/// entry.
fn read_entry_into<R: Read, S: PayloadSink>(
    f: &mut R,
    file_len: u64,
    want: &Want,
    make: impl FnOnce(&EntryHeader) -> Result<S>,
    times: &mut ReadTimes,
) -> std::result::Result<Lookup<S::Output>, ReadErr> {
    let t = Instant::now();
    let mut h = Xxh64::new(0);
    let (header, consumed) = read_header_hashed(f, file_len, &mut h)?;
    times.open += t.elapsed();
    // Bytes of one part (the K or the V of a layer); None where the shape overflows.
    let layer_bytes = header
        .n_tokens
        .checked_mul(header.kv_dim)
        .filter(|n| n.checked_mul(DTYPE_BYTES).is_some())
        .map(|n| header.format().part_bytes(n) as u64);
    let payload = layer_bytes.and_then(|lb| lb.checked_mul(2 * header.n_layers as u64));
    let Some(payload) = payload else {
        return Err(ReadErr::Corrupt("shape overflows".into()));
    };
    let expected = consumed
        .checked_add(payload)
        .and_then(|x| x.checked_add(CHECKSUM_BYTES));
    if expected != Some(file_len) {
        return Err(ReadErr::Corrupt(format!(
            "length mismatch: file has {file_len} bytes, header implies {}",
            expected
                .map(|e| e.to_string())
                .unwrap_or_else(|| "overflow".into())
        )));
    }
    // The payload fits the file, so each part fits in memory.
    let lb = layer_bytes.unwrap_or(0) as usize;
    // A sink only for the entry asked for; else why it is not (reported once intact).
    let t = Instant::now();
    let mut sink = match header_mismatch(&header, want) {
        None => Ok(make(&header).map_err(ReadErr::Sink)?),
        Some(why) => Err(why),
    };
    times.setup += t.elapsed();
    let mut buf = vec![0u8; lb.min(READ_CHUNK)];
    // (a clock read per 256 KiB: tens of nanoseconds against tens of microseconds)
    let mut t = Instant::now();
    let mut lap = |d: &mut Duration| {
        let now = Instant::now();
        *d += now - t;
        t = now;
    };
    for part in 0..2 * header.n_layers {
        let mut off = 0;
        while off < lb {
            let n = (lb - off).min(READ_CHUNK);
            match sink.as_mut().ok().and_then(|s| s.read_into(part, off, n)) {
                Some(dst) => {
                    f.read_exact(dst)?;
                    lap(&mut times.read);
                    h.update(dst);
                    lap(&mut times.hash);
                }
                None => {
                    let chunk = &mut buf[..n];
                    f.read_exact(chunk)?;
                    lap(&mut times.read);
                    h.update(chunk);
                    lap(&mut times.hash);
                    if let Ok(s) = &mut sink {
                        s.write(part, off, chunk);
                        lap(&mut times.copy);
                    }
                }
            }
            off += n;
        }
    }
    times.bytes += payload;
    let mut sum = [0u8; 8];
    f.read_exact(&mut sum)?;
    let stored = u64::from_le_bytes(sum);
    let actual = h.finish();
    if stored != actual {
        return Err(ReadErr::Corrupt(format!(
            "checksum mismatch: stored {stored:016x}, computed {actual:016x}"
        )));
    }
    match sink {
        Ok(s) => {
            let t = Instant::now();
            let out = s.finish().map_err(ReadErr::Sink)?;
            times.finish += t.elapsed();
            Ok(Lookup::Hit(out))
        }
        Err(why) => Ok(Lookup::Mismatch(why)),
    }
}

/// Moves a corrupt entry out of the way (`.corrupt`, else delete), but only if the path
/// still names the file we read (a concurrent writer may have replaced it meanwhile).
fn move_aside(path: &Path, file: &File) {
    if !same_file(path, file) {
        return;
    }
    let mut aside = path.as_os_str().to_owned();
    aside.push(".corrupt");
    if fs::rename(path, &aside).is_err() {
        let _ = fs::remove_file(path);
    }
}

#[cfg(unix)]
fn same_file(path: &Path, file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(path), file.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(path: &Path, _file: &File) -> bool {
    path.is_file()
}

#[cfg(unix)]
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) {}
