//! An engine set up the way `kvlink ask` sets one up, for every front end (the command
//! line, the desktop viewer, a program using the library): which weights ([`ModelSpec`]:
//! a model file or folder, a Hugging Face Hub repository id, or the default model,
//! fetched on first use; a LoRA adapter; the context), then the link tokens (the
//! adapter's or the model's `kvlink.json`, [`LinkOverrides`]) and where document caches
//! are kept ([`StoreSpec`]: a disk directory, a Redis tier shared with other processes).
//!
//! ```no_run
//! use kvlink::setup::{ModelSpec, StoreSpec};
//! # fn main() -> kvlink::Result<()> {
//! let spec = ModelSpec { lora: Some("adapters/smollm2-135m-kvlink".into()), ..Default::default() };
//! let gpu = kvlink::gpu::Gpu::new(&kvlink::gpu::AdapterChoice::from_env())?;
//! let mut engine = spec.load(gpu, &mut |m| eprintln!("{m}"), &mut |_, _| {})?;
//! kvlink::setup::configure(&mut engine, &spec, &Default::default(), &StoreSpec::default())?;
//! # Ok(())
//! # }
//! ```

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kv::redis::RedisStore;
use crate::kv::{DiskStore, KvFormat};
use crate::link::LinkConfig;
use crate::model::{open_model, WeightSource};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The weights an engine runs.
#[derive(Clone, Debug, Default)]
pub struct ModelSpec {
    /// A `.gguf` file, a Hugging Face folder, or a Hub repository id (downloaded once);
    /// `None`: SmolLM2-135M-Instruct in the cache directory, fetched the first time.
    pub model: Option<PathBuf>,
    /// A LoRA adapter folder (PEFT layout, optional `kvlink.json`), merged at load.
    pub lora: Option<PathBuf>,
    /// Context length in tokens; 0: the model's maximum, at most the engine's default.
    pub ctx: usize,
}

impl ModelSpec {
    /// The weights, with the adapter merged. `log` hears of downloads.
    pub fn open(&self, log: &mut dyn FnMut(&str)) -> Result<Box<dyn WeightSource>> {
        let src = self.open_base(log)?;
        match &self.lora {
            Some(dir) => crate::model::lora::with_lora(src, dir),
            None => Ok(src),
        }
    }

    fn open_base(&self, log: &mut dyn FnMut(&str)) -> Result<Box<dyn WeightSource>> {
        let path = match &self.model {
            Some(p) => p.clone(),
            None => {
                let p = crate::model::default_model_path();
                if p.exists() {
                    p
                } else {
                    crate::model::fetch::ensure_default_model(log)?
                }
            }
        };
        if !path.exists() {
            let s = path.to_string_lossy();
            if crate::model::hub::looks_like_repo(&s) {
                // Not a file or folder here: a Hugging Face Hub repository id.
                let dir = crate::model::hub::download(&s, true)?;
                return open_model(&dir);
            }
            return Err(Error::Input(format!("model not found: {}", path.display())));
        }
        open_model(&path)
    }

    /// [`ModelSpec::open`], then the weights onto `gpu` (`progress`: tensors done, of).
    pub fn load(
        &self,
        gpu: Arc<Gpu>,
        log: &mut dyn FnMut(&str),
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Engine> {
        let src = self.open(log)?;
        Engine::load(gpu, src.as_ref(), self.ctx, progress)
    }

    /// The link tokens the model comes with: the adapter's `kvlink.json` (which the
    /// engine took at load), else a `kvlink.json` beside the model (in its folder, or
    /// next to the file), else none.
    pub fn link_config(&self, engine: &Engine) -> Result<LinkConfig> {
        let adapter_link = self
            .lora
            .as_ref()
            .is_some_and(|d| d.join(crate::model::lora::LINK_FILE).is_file());
        if adapter_link {
            return Ok(engine.link().clone());
        }
        if let Some(m) = &self.model {
            let dir = if m.is_dir() {
                m.clone()
            } else {
                m.parent().map(|p| p.to_path_buf()).unwrap_or_default()
            };
            if let Some(c) = LinkConfig::from_file(&dir.join("kvlink.json"))? {
                return Ok(c);
            }
        }
        Ok(LinkConfig::default())
    }
}

/// Link-token settings that replace the model's (for a model tuned elsewhere).
#[derive(Clone, Debug, Default)]
pub struct LinkOverrides {
    /// Link tokens per document.
    pub k: Option<usize>,
    /// Id of the first link token.
    pub link_base: Option<u32>,
    /// KV-START marker id.
    pub kv_start: Option<u32>,
    /// KV-END marker id.
    pub kv_end: Option<u32>,
}

impl LinkOverrides {
    pub fn apply(&self, link: &mut LinkConfig) {
        if let Some(k) = self.k {
            link.k = k;
        }
        if self.link_base.is_some() {
            link.link_base = self.link_base;
        }
        if self.kv_start.is_some() {
            link.kv_start = self.kv_start;
        }
        if self.kv_end.is_some() {
            link.kv_end = self.kv_end;
        }
    }
}

/// Where document caches are kept besides GPU memory.
#[derive(Clone, Debug)]
pub struct StoreSpec {
    /// A directory and/or a Redis server shared with other processes
    /// (`redis://HOST:PORT[/DB]`), at most one of each; no directory: the default one
    /// ([`DiskStore::default_dir`]).
    pub locations: Vec<PathBuf>,
    /// No disk store (a Redis tier still counts).
    pub no_disk: bool,
    /// The disk store's size cap in GB (10^9 bytes); `None`: its default.
    pub max_gb: Option<f64>,
    /// How new caches are written ([`KvFormat::Q8`]: 53% of the bytes).
    pub format: KvFormat,
    /// Expiry of Redis entries in hours after their last write or hit (0: never);
    /// `None`: a week.
    pub ttl_hours: Option<f64>,
}

impl Default for StoreSpec {
    fn default() -> StoreSpec {
        StoreSpec {
            locations: Vec::new(),
            no_disk: false,
            max_gb: None,
            format: KvFormat::F16,
            ttl_hours: None,
        }
    }
}

impl StoreSpec {
    /// The disk store's cap in bytes.
    pub fn disk_cap(&self) -> Result<u64> {
        match self.max_gb {
            None => Ok(crate::kv::store::DEFAULT_MAX_BYTES),
            Some(g) if g.is_finite() && g > 0.0 => Ok((g * 1e9) as u64),
            Some(g) => Err(Error::Input(format!(
                "the disk store's cap must be a positive number of GB, got {g}"
            ))),
        }
    }

    /// Gives `engine` these stores and this format. The stores only save work: a disk
    /// store that cannot be opened or a Redis server that does not answer yet is a
    /// warning (`warn`), and the engine answers without it (Redis is tried again
    /// later). Bad settings are errors.
    pub fn apply(&self, engine: &Engine, warn: &mut dyn FnMut(&str)) -> Result<()> {
        let (urls, mut dirs): (Vec<&PathBuf>, Vec<&PathBuf>) = self
            .locations
            .iter()
            .partition(|p| RedisStore::is_url(&p.to_string_lossy()));
        if dirs.len() > 1 || urls.len() > 1 {
            return Err(Error::Input(
                "stores: at most one directory and one redis:// URL".into(),
            ));
        }
        let cap = self.disk_cap()?;
        let ttl = self.ttl_hours.unwrap_or(168.0);
        if !(ttl.is_finite() && ttl >= 0.0) {
            return Err(Error::Input(format!(
                "the Redis entries' expiry must be 0 or more hours, got {ttl}"
            )));
        }
        engine.set_store_format(self.format);
        if let Some(url) = urls.first() {
            let url = url.to_string_lossy();
            let shared = RedisStore::open(&url, Duration::from_secs_f64(ttl * 3600.0))?;
            if let Err(e) = shared.ping() {
                warn(&format!("{e}; going on without it until it answers"));
            }
            engine.set_shared_store(Some(Arc::new(shared)));
        }
        if !self.no_disk {
            let dir = dirs.pop().cloned().unwrap_or_else(DiskStore::default_dir);
            match DiskStore::open_with_cap(&dir, cap) {
                Ok(store) => engine.set_store(Some(store)),
                Err(e) => warn(&format!(
                    "cannot use the document store {} ({e}); going on without it",
                    dir.display()
                )),
            }
        }
        Ok(())
    }
}

/// Link tokens ([`ModelSpec::link_config`], then `links`) and stores for a loaded
/// engine; warnings go to standard error.
pub fn configure(
    engine: &mut Engine,
    model: &ModelSpec,
    links: &LinkOverrides,
    stores: &StoreSpec,
) -> Result<()> {
    let mut link = model.link_config(engine)?;
    links.apply(&mut link);
    engine.set_link(link)?;
    stores.apply(engine, &mut |w| eprintln!("kvlink: warning: {w}"))
}
