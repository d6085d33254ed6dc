//! Document caches in the browser's origin-private file system (OPFS).
//!
//! Same layout, keys, checksums and format versions as the native [`DiskStore`]:
//! `kvlink/kv/<first 2 hex of key>/<key>.kvc`, each file exactly the bytes
//! `DiskStore::put_as` writes ([`encode_entry_as`] / [`decode_entry`]), f16 or q8, so an
//! entry file can be copied between a native store directory and the browser either way. A writable
//! stream only replaces the file when it is closed, so readers never see a torn entry.
//!
//! [`DiskStore`]: crate::kv::DiskStore

use super::api::source_name;
use super::readback;
use crate::engine::{CacheSource, Engine};
use crate::error::{Error, Result};
use crate::kv::store::{decode_entry, encode_entry_as, ENTRY_EXT};
use crate::kv::KvFormat;
use crate::kv::{DocKey, DocKv, Lookup};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    FileSystemDirectoryHandle, FileSystemFileHandle, FileSystemGetDirectoryOptions,
    FileSystemGetFileOptions, FileSystemWritableFileStream,
};

fn js(e: JsValue) -> Error {
    let msg = e
        .dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| e.as_string())
        .unwrap_or_else(|| format!("{e:?}"));
    Error::Gpu(format!("browser storage: {msg}"))
}

/// The `kvlink/kv` directory of the origin-private file system.
#[derive(Clone)]
pub struct OpfsStore {
    dir: FileSystemDirectoryHandle,
}

async fn subdir(
    parent: &FileSystemDirectoryHandle,
    name: &str,
    create: bool,
) -> Result<Option<FileSystemDirectoryHandle>> {
    let o = FileSystemGetDirectoryOptions::new();
    o.set_create(create);
    match JsFuture::from(parent.get_directory_handle_with_options(name, &o)).await {
        Ok(h) => Ok(Some(h.unchecked_into())),
        Err(e) if !create && is_not_found(&e) => Ok(None),
        Err(e) => Err(js(e)),
    }
}

fn is_not_found(e: &JsValue) -> bool {
    js_sys::Reflect::get(e, &"name".into())
        .ok()
        .and_then(|n| n.as_string())
        .is_some_and(|n| n == "NotFoundError")
}

impl OpfsStore {
    /// Open (creating) `kvlink/kv` in the origin-private file system.
    pub async fn open() -> Result<OpfsStore> {
        let global: web_sys::WorkerGlobalScope = js_sys::global().unchecked_into();
        // `navigator.storage` exists on windows and workers alike.
        let nav = js_sys::Reflect::get(&global, &"navigator".into()).map_err(js)?;
        let nav: web_sys::Navigator = nav.unchecked_into();
        let root: FileSystemDirectoryHandle = JsFuture::from(nav.storage().get_directory())
            .await
            .map_err(js)?
            .unchecked_into();
        let k = subdir(&root, "kvlink", true).await?.expect("created");
        let dir = subdir(&k, "kv", true).await?.expect("created");
        Ok(OpfsStore { dir })
    }

    fn names(key: &DocKey) -> (String, String) {
        let k = key.to_string();
        (k[..2.min(k.len())].to_string(), format!("{k}.{ENTRY_EXT}"))
    }

    /// The raw entry file, if present.
    pub async fn get_bytes(&self, key: &DocKey) -> Result<Option<Vec<u8>>> {
        let (shard, file) = Self::names(key);
        let Some(d) = subdir(&self.dir, &shard, false).await? else {
            return Ok(None);
        };
        let o = FileSystemGetFileOptions::new();
        let h: FileSystemFileHandle =
            match JsFuture::from(d.get_file_handle_with_options(&file, &o)).await {
                Ok(h) => h.unchecked_into(),
                Err(e) if is_not_found(&e) => return Ok(None),
                Err(e) => return Err(js(e)),
            };
        let f: web_sys::File = JsFuture::from(h.get_file())
            .await
            .map_err(js)?
            .unchecked_into();
        let buf = JsFuture::from(f.array_buffer()).await.map_err(js)?;
        Ok(Some(js_sys::Uint8Array::new(&buf).to_vec()))
    }

    /// Write an entry file (replaced as a whole when the stream closes).
    pub async fn put_bytes(&self, key: &DocKey, bytes: &[u8]) -> Result<()> {
        let (shard, file) = Self::names(key);
        let d = subdir(&self.dir, &shard, true).await?.expect("created");
        let o = FileSystemGetFileOptions::new();
        o.set_create(true);
        let h: FileSystemFileHandle = JsFuture::from(d.get_file_handle_with_options(&file, &o))
            .await
            .map_err(js)?
            .unchecked_into();
        let w: FileSystemWritableFileStream = JsFuture::from(h.create_writable())
            .await
            .map_err(js)?
            .unchecked_into();
        JsFuture::from(w.write_with_u8_array(bytes).map_err(js)?)
            .await
            .map_err(js)?;
        JsFuture::from(w.close()).await.map_err(js)?;
        Ok(())
    }

    /// Remove an entry (e.g. a corrupt one); absent is fine.
    pub async fn remove(&self, key: &DocKey) -> Result<()> {
        let (shard, file) = Self::names(key);
        if let Some(d) = subdir(&self.dir, &shard, false).await? {
            if let Err(e) = JsFuture::from(d.remove_entry(&file)).await {
                if !is_not_found(&e) {
                    return Err(js(e));
                }
            }
        }
        Ok(())
    }
}

/// Make a document's cache resident on the GPU: already there, else from the store,
/// else computed (and then written to the store in `format`). Returns where it came
/// from.
pub async fn doc_cache(
    engine: &Engine,
    store: Option<&OpfsStore>,
    format: KvFormat,
    tokens: &[u32],
) -> Result<&'static str> {
    let key = engine.doc_key(tokens);
    if engine.doc_resident(&key) {
        return Ok(source_name(CacheSource::Gpu));
    }
    let (mfp, tfp) = (&engine.fingerprint(), &engine.tokenizer_fingerprint());
    if let Some(store) = store {
        if let Some(bytes) = store.get_bytes(&key).await? {
            match decode_entry(&bytes, mfp, tfp, tokens) {
                Lookup::Hit(kv) => {
                    engine.insert_doc(tokens, &kv)?;
                    return Ok(source_name(CacheSource::Disk));
                }
                Lookup::Corrupt(why) => {
                    web_sys::console::warn_1(
                        &format!(
                            "kvlink: document cache {key} was corrupt ({why}); recomputing it"
                        )
                        .into(),
                    );
                    store.remove(&key).await?;
                }
                Lookup::Miss | Lookup::Mismatch(_) => {}
            }
        }
    }
    let dc = engine.precompute(tokens)?;
    if let Some(store) = store {
        let g = engine.gpu();
        let n = dc.len() * engine.config().kv_dim() * 2;
        let mut kv = DocKv {
            n_tokens: dc.len(),
            n_layers: dc.k.len(),
            kv_dim: engine.config().kv_dim(),
            k: Vec::new(),
            v: Vec::new(),
        };
        for t in &dc.k {
            let w = readback::read_words(g, t).await?;
            kv.k.push(bytemuck::cast_slice::<u32, u8>(&w)[..n].to_vec());
        }
        for t in &dc.v {
            let w = readback::read_words(g, t).await?;
            kv.v.push(bytemuck::cast_slice::<u32, u8>(&w)[..n].to_vec());
        }
        let now = js_sys::Date::now() as u64;
        store
            .put_bytes(&key, &encode_entry_as(mfp, tfp, tokens, &kv, format, now)?)
            .await?;
    }
    Ok(source_name(CacheSource::Computed))
}
