//! The shared document-cache tier on Redis (`--store redis://HOST:PORT[/DB]`): one
//! string per entry, key `kvlink:kv:<DocKey>`, value the disk store's entry bytes (see
//! [`super::shared`]). Native builds only; the sync client on one connection (the engine
//! looks documents up from one thread at a time).
//!
//! Size: entries are a document's whole K/V (tens of KB per token on small models), so
//! every write sets a TTL ([`RedisStore::ttl`], refreshed on every hit with `GETEX`);
//! with TTL 0 the keys never expire and the server's `maxmemory` with an LRU
//! `maxmemory-policy` (e.g. `allkeys-lru`) must bound them. An entry over Redis'
//! `proto-max-bulk-len` (512 MB by default) is refused by the server: a warning, and
//! that document is not shared.
//!
//! Failures: every error (refused connection, timeout, an error reply) is returned to
//! the caller, which warns and goes on without the tier; after one, the store is left
//! alone for [`RETRY_AFTER`] (lookups are misses, writes are skipped, silently), so an
//! unreachable Redis costs one warning and one connection attempt per interval, not a
//! timeout per request.

use super::shared::SharedStore;
use super::DocKey;
use crate::{Error, Result};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Key prefix of entries.
pub const KEY_PREFIX: &str = "kvlink:kv:";
/// How long after a failure the store is not tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);
/// Connecting gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// One socket read or write gives up after this long (entries can be MBs).
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The default TTL of entries: a week.
pub const DEFAULT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

struct Conn {
    con: Option<redis::Connection>,
    /// Not tried again before this instant (after a failure).
    down_until: Option<Instant>,
}

pub struct RedisStore {
    url: String,
    client: redis::Client,
    ttl: Duration,
    conn: Mutex<Conn>,
}

fn err(url: &str, e: impl std::fmt::Display) -> Error {
    Error::Input(format!("redis store {url}: {e}"))
}

impl RedisStore {
    /// Whether `s` names a Redis store rather than a directory.
    pub fn is_url(s: &str) -> bool {
        s.starts_with("redis://") || s.starts_with("redis+unix://") || s.starts_with("rediss://")
    }

    /// A store at `url` (`redis://HOST:PORT[/DB]`, or `redis+unix:///path.sock`) whose
    /// entries expire `ttl` after their last write or hit (zero: never). Does not
    /// connect: see [`RedisStore::ping`].
    pub fn open(url: &str, ttl: Duration) -> Result<RedisStore> {
        if url.starts_with("rediss://") {
            return Err(err(url, "TLS (rediss://) is not supported in this build"));
        }
        let client = redis::Client::open(url).map_err(|e| err(url, e))?;
        Ok(RedisStore {
            url: url.to_string(),
            client,
            ttl,
            conn: Mutex::new(Conn {
                con: None,
                down_until: None,
            }),
        })
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Connect (if not connected) and check that the server answers.
    pub fn ping(&self) -> Result<()> {
        self.with(|c| redis::cmd("PING").query::<String>(c))
            .map(|_| ())
    }

    fn key(k: &DocKey) -> String {
        format!("{KEY_PREFIX}{k}")
    }

    /// Run `f` on the connection (connecting first if needed). `Ok(None)` without
    /// trying while the store is backing off after a failure.
    fn try_with<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<Option<T>> {
        let mut c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if c.down_until.is_some_and(|t| Instant::now() < t) {
            return Ok(None);
        }
        let was_down = c.down_until.take().is_some();
        let r = (|| -> redis::RedisResult<T> {
            if c.con.is_none() {
                let con = self.client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
                con.set_read_timeout(Some(IO_TIMEOUT))?;
                con.set_write_timeout(Some(IO_TIMEOUT))?;
                c.con = Some(con);
            }
            f(c.con.as_mut().expect("connected"))
        })();
        match r {
            Ok(v) => {
                if was_down {
                    eprintln!("kvlink: redis store {} is reachable again", self.url);
                }
                Ok(Some(v))
            }
            Err(e) => {
                // A reply the server refused (e.g. an entry over its size limit) leaves
                // the connection usable; anything else drops it and backs off.
                let refused = matches!(
                    e.kind(),
                    redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
                );
                if !refused || e.is_io_error() {
                    c.con = None;
                    c.down_until = Some(Instant::now() + RETRY_AFTER);
                    return Err(err(
                        &self.url,
                        format!("{e} (not tried again for {} s)", RETRY_AFTER.as_secs()),
                    ));
                }
                Err(err(&self.url, e))
            }
        }
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T> {
        self.try_with(f)?
            .ok_or_else(|| err(&self.url, "unreachable (backing off after a failure)"))
    }
}

impl SharedStore for RedisStore {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn get(&self, key: &DocKey) -> Result<Option<Vec<u8>>> {
        let k = Self::key(key);
        let ttl = self.ttl.as_secs();
        Ok(self
            .try_with(|c| {
                if ttl > 0 {
                    redis::cmd("GETEX")
                        .arg(&k)
                        .arg("EX")
                        .arg(ttl)
                        .query::<Option<Vec<u8>>>(c)
                } else {
                    redis::cmd("GET").arg(&k).query::<Option<Vec<u8>>>(c)
                }
            })?
            .flatten())
    }

    fn put(&self, key: &DocKey, entry: &[u8]) -> Result<()> {
        let k = Self::key(key);
        let ttl = self.ttl.as_secs();
        self.try_with(|c| {
            let mut cmd = redis::cmd("SET");
            cmd.arg(&k).arg(entry);
            if ttl > 0 {
                cmd.arg("EX").arg(ttl);
            }
            cmd.query::<()>(c)
        })?;
        Ok(())
    }

    fn remove(&self, key: &DocKey) -> Result<bool> {
        let k = Self::key(key);
        Ok(self
            .try_with(|c| redis::cmd("DEL").arg(&k).query::<i64>(c))?
            .is_some_and(|n| n > 0))
    }
}
