//! The desktop app (`kvlink view`): a workspace to load a model, add documents, ask in
//! full / kvlink / naive mode or compare full against kvlink, with TTFT bars and
//! attention-across-segments heatmaps. egui on winit (eframe), drawn through wgpu.

use super::attention::{self, AttentionCapture, CaptureExt, CAPTURE_IS_REAL};
use super::export::colormap;
use anyhow::{anyhow, Result};
use eframe::egui;
use egui::{Color32, Key, KeyboardShortcut, Modifiers, RichText};
use egui_plot::{Bar, BarChart, Legend, Line, Plot, PlotPoints, Points};
use kvlink::gpu::AdapterChoice;
use kvlink::link::Mode;
use kvlink::setup::{LinkOverrides, ModelSpec, StoreSpec};
use kvlink::{AskStats, Engine, GenerateParams, Request};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One segment of a stacked TTFT bar: label, colour, milliseconds of a request.
type TtftPart = (&'static str, Color32, fn(&AskStats) -> f64);

/// What `kvlink view` was started with.
pub struct Options {
    pub adapter: AdapterChoice,
    /// The model, a LoRA adapter merged into every model the app loads (`--lora`), the
    /// context.
    pub model: ModelSpec,
    /// Where document caches are kept (`--store`, `--no-store`, `--store-max-gb`,
    /// `--store-format`).
    pub stores: StoreSpec,
}

/// Test mode (env KVLINK_VIEW_SCRIPT=path to this as JSON): drive the app, save a
/// screenshot and a summary, quit.
#[derive(Clone, Debug, Deserialize)]
pub struct Script {
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// A LoRA adapter folder merged into the model.
    #[serde(default)]
    pub lora: Option<PathBuf>,
    pub docs: Vec<ScriptDoc>,
    pub question: String,
    #[serde(default = "default_compare")]
    pub mode: String,
    #[serde(default = "default_script_tokens")]
    pub max_tokens: usize,
    pub screenshot: PathBuf,
    pub summary: PathBuf,
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

fn default_compare() -> String {
    "compare".into()
}
fn default_script_tokens() -> usize {
    24
}

#[derive(Clone, Debug, Deserialize)]
pub struct ScriptDoc {
    pub name: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub path: Option<PathBuf>,
}

pub fn run(opts: Options) -> Result<()> {
    let script = match std::env::var_os("KVLINK_VIEW_SCRIPT") {
        Some(p) if !p.is_empty() => {
            let text = std::fs::read_to_string(&p)
                .map_err(|e| anyhow!("cannot read KVLINK_VIEW_SCRIPT {:?}: {e}", p))?;
            Some(
                serde_json::from_str::<Script>(&text)
                    .map_err(|e| anyhow!("bad view script: {e}"))?,
            )
        }
        _ => None,
    };
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("kvlink viewer")
            .with_inner_size([1360.0, 900.0])
            .with_min_inner_size([800.0, 500.0])
            .with_drag_and_drop(true),
        ..Default::default()
    };
    eframe::run_native(
        "kvlink viewer",
        native,
        Box::new(move |cc| Ok(Box::new(ViewerApp::new(cc, opts, script)))),
    )
    .map_err(|e| anyhow!("the viewer window failed: {e}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum ModeSel {
    Full,
    Kvlink,
    Naive,
    Compare,
}

impl ModeSel {
    fn modes(self) -> Vec<Mode> {
        match self {
            ModeSel::Full => vec![Mode::Full],
            ModeSel::Kvlink => vec![Mode::Kvlink],
            ModeSel::Naive => vec![Mode::Naive],
            ModeSel::Compare => vec![Mode::Full, Mode::Kvlink],
        }
    }
    fn parse(s: &str) -> Option<ModeSel> {
        Some(match s.to_ascii_lowercase().as_str() {
            "full" => ModeSel::Full,
            "kvlink" => ModeSel::Kvlink,
            "naive" => ModeSel::Naive,
            "compare" => ModeSel::Compare,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CacheState {
    Unknown,
    Missing,
    Disk,
    Gpu,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Doc {
    name: String,
    #[serde(default)]
    path: Option<PathBuf>,
    text: String,
    #[serde(skip)]
    tokens: Option<Vec<u32>>,
    #[serde(skip, default = "unknown")]
    state: CacheState,
}

fn unknown() -> CacheState {
    CacheState::Unknown
}

/// Remembered between sessions (`<cache dir>/viewer.json`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Saved {
    model: Option<PathBuf>,
    #[serde(default)]
    lora: Option<PathBuf>,
    docs: Vec<Doc>,
    question: String,
    mode: Option<ModeSel>,
    max_tokens: Option<usize>,
}

fn saved_path() -> PathBuf {
    kvlink::model::paths::cache_dir().join("viewer.json")
}

struct Run {
    ask: usize,
    mode: Mode,
    answer: String,
    stats: Option<AskStats>,
    capture: Option<AttentionCapture>,
    pieces: Vec<String>,
    error: Option<String>,
    done: bool,
}

enum Msg {
    Loaded(std::result::Result<Arc<Engine>, String>),
    Started(usize),
    Text(usize, String),
    Done(usize, Box<AskStats>, AttentionCapture, Vec<String>),
    Failed(usize, String),
    Finished,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    WaitModel,
    Ask,
    WaitRuns,
    Settle(u32),
    WaitShot,
    Done,
}

struct ScriptState {
    script: Script,
    step: Step,
    started: Instant,
    shot: Arc<Mutex<Option<Arc<egui::ColorImage>>>>,
}

pub struct ViewerApp {
    adapter: AdapterChoice,
    ctx_len: usize,
    /// LoRA adapter folder (empty: none), applied at the next Load.
    lora_field: String,
    stores: StoreSpec,
    model_field: String,
    engine: Option<Arc<Engine>>,
    loading: bool,
    docs: Vec<Doc>,
    path_field: String,
    paste_field: String,
    paste_name: String,
    question: String,
    mode: ModeSel,
    max_tokens: usize,
    warm: bool,
    runs: Vec<Run>,
    asks: usize,
    busy: bool,
    stop: Arc<AtomicBool>,
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
    errors: Vec<String>,
    head: Option<usize>,
    hover_token: Option<(usize, usize)>,
    bars_drawn: usize,
    script: Option<ScriptState>,
}

impl ViewerApp {
    fn new(cc: &eframe::CreationContext<'_>, opts: Options, script: Option<Script>) -> ViewerApp {
        let (tx, rx) = channel();
        let saved: Saved = if script.is_some() {
            Saved::default()
        } else {
            std::fs::read_to_string(saved_path())
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default()
        };
        let model = script
            .as_ref()
            .and_then(|s| s.model.clone())
            .or(opts.model.model.clone())
            .or(saved.model.clone());
        let mut app = ViewerApp {
            adapter: opts.adapter,
            ctx_len: opts.model.ctx,
            lora_field: script
                .as_ref()
                .and_then(|s| s.lora.clone())
                .or(opts.model.lora)
                .or(saved.lora.clone())
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            stores: opts.stores,
            model_field: model.map(|p| p.display().to_string()).unwrap_or_default(),
            engine: None,
            loading: false,
            docs: saved.docs,
            path_field: String::new(),
            paste_field: String::new(),
            paste_name: String::new(),
            question: saved.question,
            mode: saved.mode.unwrap_or(ModeSel::Compare),
            max_tokens: saved.max_tokens.unwrap_or(64),
            warm: true,
            runs: Vec::new(),
            asks: 0,
            busy: false,
            stop: Arc::new(AtomicBool::new(false)),
            tx,
            rx,
            errors: Vec::new(),
            head: None,
            hover_token: None,
            bars_drawn: 0,
            script: None,
        };
        if let Some(s) = script {
            for d in &s.docs {
                match (&d.text, &d.path) {
                    (Some(t), _) => app.add_doc(d.name.clone(), None, t.clone()),
                    (None, Some(p)) => app.add_path(p.clone()),
                    _ => app
                        .errors
                        .push(format!("script document {} has no text", d.name)),
                }
            }
            app.question = s.question.clone();
            app.mode = ModeSel::parse(&s.mode).unwrap_or(ModeSel::Compare);
            app.max_tokens = s.max_tokens;
            app.script = Some(ScriptState {
                script: s,
                step: Step::WaitModel,
                started: Instant::now(),
                shot: Default::default(),
            });
        }
        app.load_model(&cc.egui_ctx);
        app
    }

    fn save_state(&self) {
        if self.script.is_some() {
            return;
        }
        let s = Saved {
            model: (!self.model_field.trim().is_empty())
                .then(|| PathBuf::from(self.model_field.trim())),
            lora: (!self.lora_field.trim().is_empty())
                .then(|| PathBuf::from(self.lora_field.trim())),
            docs: self.docs.clone(),
            question: self.question.clone(),
            mode: Some(self.mode),
            max_tokens: Some(self.max_tokens),
        };
        let p = saved_path();
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        if let Ok(t) = serde_json::to_string_pretty(&s) {
            let tmp = p.with_extension("json.tmp");
            if std::fs::write(&tmp, t).is_ok() {
                let _ = std::fs::rename(&tmp, &p);
            }
        }
    }

    fn load_model(&mut self, ctx: &egui::Context) {
        if self.loading || self.busy {
            return;
        }
        self.loading = true;
        self.engine = None;
        let tx = self.tx.clone();
        let ctx = ctx.clone();
        let m = self.model_field.trim();
        let spec = ModelSpec {
            model: (!m.is_empty()).then(|| PathBuf::from(m)),
            ctx: self.ctx_len,
            lora: (!self.lora_field.trim().is_empty())
                .then(|| PathBuf::from(self.lora_field.trim())),
        };
        let adapter = self.adapter.clone();
        let stores = self.stores.clone();
        std::thread::spawn(move || {
            let r = catch(|| -> Result<Arc<Engine>> {
                let gpu = kvlink::gpu::Gpu::new(&adapter)?;
                let mut engine = spec.load(gpu, &mut |m| eprintln!("{m}"), &mut |_, _| {})?;
                kvlink::setup::configure(&mut engine, &spec, &LinkOverrides::default(), &stores)?;
                Ok(Arc::new(engine))
            });
            let _ = tx.send(Msg::Loaded(r.map_err(|e| format!("{e:#}"))));
            ctx.request_repaint();
        });
    }

    fn add_doc(&mut self, name: String, path: Option<PathBuf>, text: String) {
        let text = format!("{}\n", text.trim_end());
        if text.trim().is_empty() {
            self.errors.push(format!("document {name} is empty"));
            return;
        }
        let mut d = Doc {
            name,
            path,
            text,
            tokens: None,
            state: CacheState::Unknown,
        };
        self.refresh_doc(&mut d);
        self.docs.push(d);
    }

    fn add_path(&mut self, p: PathBuf) {
        match std::fs::read(&p) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(t) => {
                    let name = p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| p.display().to_string());
                    self.add_doc(name, Some(p), t)
                }
                Err(_) => self
                    .errors
                    .push(format!("{} is not a UTF-8 text file", p.display())),
            },
            Err(e) => self
                .errors
                .push(format!("cannot read {}: {e}", p.display())),
        }
    }

    /// Token count and cache state of a document under the loaded engine.
    fn refresh_doc(&self, d: &mut Doc) {
        let Some(engine) = &self.engine else {
            d.tokens = None;
            d.state = CacheState::Unknown;
            return;
        };
        if d.tokens.is_none() {
            d.tokens = engine.tokenizer().encode_data(&d.text).ok();
        }
        let Some(t) = &d.tokens else { return };
        let key = engine.doc_key(t);
        d.state = if engine.doc_resident(&key) {
            CacheState::Gpu
        } else if engine.store().is_some_and(|s| s.contains(&key)) {
            CacheState::Disk
        } else {
            CacheState::Missing
        };
    }

    fn refresh_docs(&mut self) {
        let mut docs = std::mem::take(&mut self.docs);
        for d in &mut docs {
            self.refresh_doc(d);
        }
        self.docs = docs;
    }

    fn ask(&mut self, ctx: &egui::Context) {
        if self.busy {
            return;
        }
        let Some(engine) = self.engine.clone() else {
            self.errors.push("load a model first".into());
            return;
        };
        if self.question.trim().is_empty() {
            self.errors.push("type a question first".into());
            return;
        }
        self.save_state();
        self.asks += 1;
        let ask = self.asks;
        let modes = self.mode.modes();
        let first = self.runs.len();
        for m in &modes {
            self.runs.push(Run {
                ask,
                mode: *m,
                answer: String::new(),
                stats: None,
                capture: None,
                pieces: Vec::new(),
                error: None,
                done: false,
            });
        }
        self.busy = true;
        self.hover_token = None;
        self.stop.store(false, Ordering::SeqCst);
        let stop = self.stop.clone();
        let tx = self.tx.clone();
        let ctx = ctx.clone();
        let docs: Vec<String> = self.docs.iter().map(|d| d.text.clone()).collect();
        let question = self.question.clone();
        let params = GenerateParams {
            max_tokens: self.max_tokens.max(1),
            ..Default::default()
        };
        let warm = self.warm;
        std::thread::spawn(move || {
            for (i, mode) in modes.into_iter().enumerate() {
                let id = first + i;
                let _ = tx.send(Msg::Started(id));
                let mut req = Request::new(docs.clone(), question.clone());
                req.mode = mode;
                let r = catch(|| -> Result<(AskStats, AttentionCapture)> {
                    if warm && mode != Mode::Full {
                        // Encode missing caches (prefix and documents) now, so the bar
                        // shows reuse, not the one-time encoding.
                        let plan = engine.plan(&req)?;
                        let mut parts: Vec<&[u32]> = Vec::new();
                        if plan.prefix_len > 0 {
                            parts.push(&plan.tokens[..plan.prefix_len]);
                        }
                        parts.extend((0..plan.docs.len()).map(|j| plan.doc_tokens(j)));
                        engine.doc_caches(&parts)?;
                    }
                    let mut ts = kvlink::model::tokenizer::TextStream::new(engine.tokenizer());
                    let out = attention::ask_with_attention(&engine, &req, &params, |t| {
                        if !engine.tokenizer().is_stop(t) {
                            if let Ok(s) = ts.push(t) {
                                if !s.is_empty() {
                                    let _ = tx.send(Msg::Text(id, s));
                                    ctx.request_repaint();
                                }
                            }
                        }
                        !stop.load(Ordering::SeqCst)
                    })?;
                    if let Ok(s) = ts.finish() {
                        if !s.is_empty() {
                            let _ = tx.send(Msg::Text(id, s));
                        }
                    }
                    Ok(out)
                });
                match r {
                    Ok((stats, cap)) => {
                        let pieces = cap
                            .tokens
                            .iter()
                            .map(|&t| engine.tokenizer().decode(&[t]).unwrap_or_default())
                            .collect();
                        let _ = tx.send(Msg::Done(id, Box::new(stats), cap, pieces));
                    }
                    Err(e) => {
                        let _ = tx.send(Msg::Failed(id, format!("{mode}: {e:#}")));
                    }
                }
                ctx.request_repaint();
            }
            let _ = tx.send(Msg::Finished);
            ctx.request_repaint();
        });
    }

    fn poll(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            match m {
                Msg::Loaded(Ok(e)) => {
                    self.loading = false;
                    self.engine = Some(e);
                    for d in &mut self.docs {
                        d.tokens = None;
                    }
                    self.refresh_docs();
                }
                Msg::Loaded(Err(e)) => {
                    self.loading = false;
                    self.errors.push(format!("loading the model failed: {e}"));
                }
                Msg::Started(_) => {}
                Msg::Text(id, s) => {
                    if let Some(r) = self.runs.get_mut(id) {
                        r.answer.push_str(&s);
                    }
                }
                Msg::Done(id, stats, cap, pieces) => {
                    if let Some(r) = self.runs.get_mut(id) {
                        r.stats = Some(*stats);
                        r.capture = Some(cap);
                        r.pieces = pieces;
                        r.done = true;
                    }
                    self.refresh_docs();
                }
                Msg::Failed(id, e) => {
                    if let Some(r) = self.runs.get_mut(id) {
                        r.error = Some(e.clone());
                        r.done = true;
                    }
                    self.errors.push(e);
                }
                Msg::Finished => {
                    self.busy = false;
                    self.refresh_docs();
                }
            }
        }
    }

    fn last_ask(&self) -> Vec<&Run> {
        self.runs.iter().filter(|r| r.ask == self.asks).collect()
    }

    // ---------------------------------------------------------------- panels

    fn top_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            ui.heading("kvlink");
            ui.separator();
            ui.label("Model:");
            ui.add(
                egui::TextEdit::singleline(&mut self.model_field)
                    .hint_text("default: SmolLM2-135M-Instruct (.gguf file or HF folder)")
                    .desired_width(420.0),
            );
            ui.label("LoRA:");
            ui.add(
                egui::TextEdit::singleline(&mut self.lora_field)
                    .hint_text("none (adapter folder)")
                    .desired_width(180.0),
            );
            let ctx = ui.ctx().clone();
            if ui
                .add_enabled(!self.loading && !self.busy, egui::Button::new("Load"))
                .clicked()
            {
                self.load_model(&ctx);
                self.save_state();
            }
            if self.loading {
                ui.spinner();
                ui.label("loading…");
            } else if let Some(e) = &self.engine {
                ui.label(
                    RichText::new(format!(
                        "{} · {} layers × {} heads · ctx {} · {}",
                        e.description(),
                        e.config().num_hidden_layers,
                        e.config().num_attention_heads,
                        e.context(),
                        e.gpu().report.name
                    ))
                    .weak(),
                );
            } else {
                ui.label(RichText::new("no model loaded").color(Color32::LIGHT_RED));
            }
        });
    }

    fn docs_panel(&mut self, ui: &mut egui::Ui) {
        ui.heading("Documents");
        ui.label(RichText::new("Drop text files anywhere in the window.").weak());
        ui.add_space(4.0);
        let mut remove = None;
        egui::ScrollArea::vertical()
            .id_salt("docs")
            .max_height(ui.available_height() * 0.55)
            .show(ui, |ui| {
                for (i, d) in self.docs.iter().enumerate() {
                    ui.horizontal(|ui| {
                        if ui.small_button("×").on_hover_text("remove").clicked() {
                            remove = Some(i);
                        }
                        let (txt, col, tip) = match d.state {
                            CacheState::Gpu => (
                                "GPU",
                                Color32::from_rgb(80, 200, 120),
                                "cache resident on the GPU",
                            ),
                            CacheState::Disk => (
                                "disk",
                                Color32::from_rgb(120, 160, 255),
                                "cache in the disk store",
                            ),
                            CacheState::Missing => (
                                "missing",
                                Color32::from_rgb(230, 150, 60),
                                "no cache yet: encoded on first reuse",
                            ),
                            CacheState::Unknown => ("?", Color32::GRAY, "load a model"),
                        };
                        ui.label(RichText::new(format!("[{txt}]")).color(col).monospace())
                            .on_hover_text(tip);
                        let n = d
                            .tokens
                            .as_ref()
                            .map_or("–".to_string(), |t| t.len().to_string());
                        ui.label(format!("{n} tok"));
                        ui.label(RichText::new(&d.name).strong())
                            .on_hover_text(d.text.chars().take(400).collect::<String>());
                    });
                }
                if self.docs.is_empty() {
                    ui.label(RichText::new("no documents yet").weak());
                }
            });
        if let Some(i) = remove {
            self.docs.remove(i);
            self.save_state();
        }
        ui.separator();
        ui.label("Add a file:");
        ui.horizontal(|ui| {
            let r = ui.add(
                egui::TextEdit::singleline(&mut self.path_field)
                    .hint_text("/path/to/document.txt")
                    .desired_width(ui.available_width() - 50.0),
            );
            let enter = r.lost_focus() && ui.input(|i| i.key_pressed(Key::Enter));
            if (ui.button("Add").clicked() || enter) && !self.path_field.trim().is_empty() {
                let p = PathBuf::from(self.path_field.trim());
                self.add_path(p);
                self.path_field.clear();
                self.save_state();
            }
        });
        ui.add_space(4.0);
        ui.label("Or paste text:");
        ui.add(
            egui::TextEdit::singleline(&mut self.paste_name)
                .hint_text("name (optional)")
                .desired_width(f32::INFINITY),
        );
        ui.add(
            egui::TextEdit::multiline(&mut self.paste_field)
                .desired_rows(5)
                .desired_width(f32::INFINITY),
        );
        if ui.button("Add pasted text").clicked() {
            let name = if self.paste_name.trim().is_empty() {
                format!("pasted {}", self.docs.len() + 1)
            } else {
                self.paste_name.trim().to_string()
            };
            let t = std::mem::take(&mut self.paste_field);
            self.add_doc(name, None, t);
            self.paste_name.clear();
            self.save_state();
        }
    }

    fn ask_panel(&mut self, ui: &mut egui::Ui) {
        ui.label(RichText::new("Question").strong());
        ui.add(
            egui::TextEdit::multiline(&mut self.question)
                .desired_rows(2)
                .desired_width(f32::INFINITY)
                .hint_text("Ask about the documents…"),
        );
        ui.horizontal(|ui| {
            ui.label("Mode:");
            ui.radio_value(&mut self.mode, ModeSel::Full, "full");
            ui.radio_value(&mut self.mode, ModeSel::Kvlink, "kvlink");
            ui.radio_value(&mut self.mode, ModeSel::Naive, "naive");
            ui.radio_value(&mut self.mode, ModeSel::Compare, "compare (full vs kvlink)");
            ui.separator();
            ui.label("max tokens");
            ui.add(egui::DragValue::new(&mut self.max_tokens).range(1..=2048));
            ui.checkbox(&mut self.warm, "warm caches first")
                .on_hover_text("encode missing document caches before timing a reuse run");
            ui.separator();
            let ctx = ui.ctx().clone();
            let can = !self.busy && !self.loading && self.engine.is_some();
            if ui
                .add_enabled(
                    can,
                    egui::Button::new(RichText::new("Ask  (Ctrl+Enter)").strong()),
                )
                .clicked()
            {
                self.ask(&ctx);
            }
            if self.busy {
                ui.spinner();
                if ui.button("Stop").clicked() {
                    self.stop.store(true, Ordering::SeqCst);
                }
            }
        });
    }

    fn answers(&mut self, ui: &mut egui::Ui) {
        let runs = self.last_ask();
        if runs.is_empty() {
            return;
        }
        ui.columns(runs.len(), |cols| {
            for (c, r) in cols.iter_mut().zip(&runs) {
                c.label(RichText::new(format!("Answer ({})", r.mode)).strong());
                egui::Frame::group(c.style()).show(c, |ui| {
                    ui.set_min_height(60.0);
                    ui.set_width(ui.available_width());
                    if let Some(e) = &r.error {
                        ui.colored_label(Color32::LIGHT_RED, e);
                    } else if r.answer.is_empty() && !r.done {
                        ui.label(RichText::new("…").weak());
                    } else {
                        ui.label(r.answer.trim());
                    }
                });
            }
        });
    }

    fn ttft_panel(&mut self, ui: &mut egui::Ui) {
        ui.heading("Time to first token");
        let runs = self.last_ask();
        let done: Vec<(&Run, &AskStats)> = runs
            .iter()
            .filter_map(|r| r.stats.as_ref().map(|s| (*r, s)))
            .collect();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut lines = Vec::new();
        for (_, s) in &done {
            let t = &s.timings;
            lines.push(format!("{}: {t}", s.mode));
        }
        for l in lines {
            ui.label(RichText::new(l).monospace().small());
        }
        let full = done.iter().find(|(_, s)| s.mode == Mode::Full);
        let kv = done.iter().find(|(_, s)| s.mode == Mode::Kvlink);
        if let (Some((_, f)), Some((_, k))) = (full, kv) {
            let r = ms(k.timings.ttft) / ms(f.timings.ttft).max(1e-9);
            ui.label(
                RichText::new(format!(
                    "kvlink / full TTFT = {r:.3}  ({:.1}× faster)",
                    1.0 / r.max(1e-9)
                ))
                .strong()
                .color(Color32::from_rgb(80, 200, 120)),
            );
        }
        let names: Vec<String> = done.iter().map(|(_, s)| s.mode.to_string()).collect();
        let parts: [TtftPart; 3] = [
            ("lookup", Color32::from_rgb(120, 160, 255), |s| {
                s.timings.lookup.as_secs_f64() * 1e3
            }),
            ("assembly", Color32::from_rgb(230, 150, 60), |s| {
                s.timings.assemble.as_secs_f64() * 1e3
            }),
            (
                "prefill + first token",
                Color32::from_rgb(200, 90, 200),
                |s| s.timings.prefill.as_secs_f64() * 1e3,
            ),
        ];
        let mut charts: Vec<BarChart> = Vec::new();
        for (name, col, f) in parts {
            let bars: Vec<Bar> = done
                .iter()
                .enumerate()
                .map(|(i, (_, s))| Bar::new(i as f64, f(s)).name(s.mode.to_string()).width(0.6))
                .collect();
            let refs: Vec<&BarChart> = charts.iter().collect();
            let c = BarChart::new(name, bars).color(col).stack_on(&refs);
            charts.push(c);
        }
        self.bars_drawn = done.len();
        ui.columns(2, |cols| {
            Plot::new("ttft_bars")
                .height(180.0)
                .legend(Legend::default())
                .allow_zoom(false)
                .allow_drag(false)
                .allow_scroll(false)
                .include_y(0.0)
                .y_axis_label("ms")
                .x_axis_formatter(move |m, _| {
                    let i = m.value.round();
                    if (m.value - i).abs() < 1e-6 && i >= 0.0 {
                        names.get(i as usize).cloned().unwrap_or_default()
                    } else {
                        String::new()
                    }
                })
                .show(&mut cols[0], |p| {
                    for c in charts {
                        p.bar_chart(c);
                    }
                });
            // History: TTFT per run, one line per mode.
            let mut series: Vec<(Mode, Vec<[f64; 2]>)> = Vec::new();
            for (i, r) in self.runs.iter().enumerate() {
                if let Some(s) = &r.stats {
                    let e = match series.iter_mut().find(|(m, _)| *m == r.mode) {
                        Some(e) => e,
                        None => {
                            series.push((r.mode, Vec::new()));
                            series.last_mut().unwrap()
                        }
                    };
                    e.1.push([i as f64 + 1.0, s.timings.ttft.as_secs_f64() * 1e3]);
                }
            }
            Plot::new("ttft_history")
                .height(180.0)
                .legend(Legend::default())
                .include_y(0.0)
                .x_axis_label("run")
                .y_axis_label("TTFT ms")
                .show(&mut cols[1], |p| {
                    for (m, pts) in series {
                        p.line(
                            Line::new(m.to_string(), PlotPoints::new(pts.clone()))
                                .color(mode_color(m)),
                        );
                        p.points(
                            Points::new(m.to_string(), PlotPoints::new(pts))
                                .color(mode_color(m))
                                .radius(4.0),
                        );
                    }
                });
        });
    }

    fn attention_panel(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            ui.heading("Attention across segments");
            if !CAPTURE_IS_REAL {
                ui.label(
                    RichText::new("(synthetic: engine capture not available yet)")
                        .color(Color32::LIGHT_RED),
                );
            }
        });
        let heads = self
            .last_ask()
            .iter()
            .filter_map(|r| r.capture.as_ref().map(|c| c.heads))
            .max()
            .unwrap_or(0);
        ui.horizontal(|ui| {
            ui.label("Head:");
            let sel = match self.head {
                None => "average over heads".to_string(),
                Some(h) => format!("head {h}"),
            };
            egui::ComboBox::from_id_salt("head")
                .selected_text(sel)
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut self.head, None, "average over heads");
                    for h in 0..heads {
                        ui.selectable_value(&mut self.head, Some(h), format!("head {h}"));
                    }
                });
            ui.label(
                RichText::new("rows: layers · columns: segments · mean over generated tokens (hover a token for its own)")
                    .weak(),
            );
        });
        let head = self.head;
        let ask = self.asks;
        let idx: Vec<usize> = (0..self.runs.len())
            .filter(|&i| self.runs[i].ask == ask && self.runs[i].capture.is_some())
            .collect();
        if idx.is_empty() {
            ui.label(RichText::new("ask a question to see where the answer looks").weak());
            return;
        }
        let mut hovered = None;
        let hover = self.hover_token;
        ui.columns(idx.len(), |cols| {
            for (c, &i) in cols.iter_mut().zip(&idx) {
                let r = &self.runs[i];
                let cap = r.capture.as_ref().expect("filtered");
                c.label(RichText::new(format!("{} ({} tokens)", r.mode, cap.n_tokens())).strong());
                let tok = hover.filter(|h| h.0 == i).map(|h| h.1);
                let m = cap.layer_group(head, tok);
                heatmap_widget(c, &cap.groups, &m, tok.map(|t| format!("token {t}")));
                c.add_space(4.0);
                c.label(RichText::new("Generated tokens (hover):").small());
                c.horizontal_wrapped(|ui| {
                    ui.spacing_mut().item_spacing.x = 2.0;
                    for (t, p) in r.pieces.iter().enumerate().take(cap.n_tokens()) {
                        let shown = if p.trim().is_empty() {
                            format!("␣{}", p.len())
                        } else {
                            p.replace('\n', "⏎")
                        };
                        let sel = tok == Some(t);
                        let resp = ui.add(
                            egui::Button::new(RichText::new(shown).monospace().small())
                                .selected(sel)
                                .small(),
                        );
                        if resp.hovered() {
                            hovered = Some((i, t));
                        }
                        resp.on_hover_ui(|ui| {
                            let d = cap.token_groups(t, head);
                            distribution(ui, &cap.groups, &d);
                        });
                    }
                });
            }
        });
        self.hover_token = hovered;
    }

    fn errors_panel(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            ui.colored_label(
                Color32::LIGHT_RED,
                format!("{} error(s)", self.errors.len()),
            );
            if ui.small_button("clear").clicked() {
                self.errors.clear();
            }
        });
        for e in self.errors.iter().rev().take(4) {
            ui.colored_label(Color32::LIGHT_RED, e);
        }
    }

    // ------------------------------------------------------------ test mode

    fn drive_script(&mut self, ctx: &egui::Context) {
        let Some(st) = &mut self.script else { return };
        ctx.request_repaint_after(Duration::from_millis(100));
        let timeout = Duration::from_secs(st.script.timeout_s.unwrap_or(600));
        if st.step != Step::Done && st.started.elapsed() > timeout {
            self.errors.push("view script timed out".into());
            self.finish_script(ctx, None);
            return;
        }
        match st.step {
            Step::WaitModel => {
                if self.engine.is_some() {
                    st.step = Step::Ask;
                } else if !self.loading {
                    // Load failed.
                    self.finish_script(ctx, None);
                }
            }
            Step::Ask => {
                st.step = Step::WaitRuns;
                self.ask(ctx);
            }
            Step::WaitRuns => {
                if !self.busy {
                    st.step = Step::Settle(10);
                }
            }
            Step::Settle(0) => {
                st.step = Step::WaitShot;
                let slot = st.shot.clone();
                let c = ctx.clone();
                ctx.request_screenshot(move |img| {
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(img);
                    c.request_repaint();
                });
            }
            Step::Settle(n) => st.step = Step::Settle(n - 1),
            Step::WaitShot => {
                let img = st.shot.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(img) = img {
                    self.finish_script(ctx, Some(img));
                }
            }
            Step::Done => {}
        }
    }

    fn finish_script(&mut self, ctx: &egui::Context, img: Option<Arc<egui::ColorImage>>) {
        let Some(st) = &mut self.script else { return };
        st.step = Step::Done;
        let mut errors = self.errors.clone();
        let mut size = [0, 0];
        if let Some(img) = &img {
            size = img.size;
            if let Err(e) = save_rgba(&st.script.screenshot, img) {
                errors.push(format!("saving the screenshot: {e:#}"));
            }
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let runs: Vec<serde_json::Value> = self
            .runs
            .iter()
            .map(|r| {
                serde_json::json!({
                    "mode": r.mode,
                    "answer": r.answer,
                    "error": r.error,
                    "ttft_ms": r.stats.as_ref().map(|s| ms(s.timings.ttft)),
                    "lookup_ms": r.stats.as_ref().map(|s| ms(s.timings.lookup)),
                    "assemble_ms": r.stats.as_ref().map(|s| ms(s.timings.assemble)),
                    "prefill_ms": r.stats.as_ref().map(|s| ms(s.timings.prefill)),
                    "generated": r.stats.as_ref().map(|s| s.generation.generated_tokens),
                    "capture_tokens": r.capture.as_ref().map(|c| c.n_tokens()),
                    "groups": r.capture.as_ref().map(|c| c.groups.clone()),
                })
            })
            .collect();
        let v = serde_json::json!({
            "ok": img.is_some() && errors.is_empty(),
            "screenshot": st.script.screenshot,
            "width": size[0],
            "height": size[1],
            "ttft_bars": self.bars_drawn,
            "runs": runs,
            "docs": self.docs.iter().map(|d| serde_json::json!({"name": d.name, "tokens": d.tokens.as_ref().map(|t| t.len()), "state": format!("{:?}", d.state)})).collect::<Vec<_>>(),
            "model": self.engine.as_ref().map(|e| e.description().to_string()),
            "capture_real": CAPTURE_IS_REAL,
            "errors": errors,
            "seconds": st.started.elapsed().as_secs_f64(),
        });
        if let Err(e) = std::fs::write(
            &st.script.summary,
            serde_json::to_string_pretty(&v).unwrap_or_default(),
        ) {
            eprintln!("kvlink view: cannot write the summary: {e}");
        }
        ctx.send_viewport_cmd(egui::ViewportCommand::Close);
    }
}

/// Run `f`, turning a panic into an error (a worker thread must always report back).
fn catch<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(anyhow!("internal error: {msg}"))
        }
    }
}

fn save_rgba(path: &std::path::Path, img: &egui::ColorImage) -> Result<()> {
    let f = std::fs::File::create(path)?;
    let mut enc = png::Encoder::new(
        std::io::BufWriter::new(f),
        img.size[0] as u32,
        img.size[1] as u32,
    );
    enc.set_color(png::ColorType::Rgba);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    let data: Vec<u8> = img.pixels.iter().flat_map(|c| c.to_array()).collect();
    w.write_image_data(&data)?;
    w.finish()?;
    Ok(())
}

fn mode_color(m: Mode) -> Color32 {
    match m {
        Mode::Full => Color32::from_rgb(230, 110, 90),
        Mode::Kvlink => Color32::from_rgb(80, 200, 120),
        Mode::Naive => Color32::from_rgb(120, 160, 255),
        Mode::Masked => Color32::from_rgb(200, 200, 90),
    }
}

fn c32(c: [u8; 3]) -> Color32 {
    Color32::from_rgb(c[0], c[1], c[2])
}

/// A layers x segments heatmap drawn with the painter; hovering a cell shows its value.
fn heatmap_widget(ui: &mut egui::Ui, groups: &[String], m: &[Vec<f32>], note: Option<String>) {
    let label_w = 34.0;
    let header_h = 18.0;
    let w = (ui.available_width() - label_w - 4.0).max(100.0);
    let cw = w / groups.len().max(1) as f32;
    let ch = if m.len() > 24 { 11.0 } else { 16.0 };
    let size = egui::vec2(label_w + w, header_h + ch * m.len() as f32 + 4.0);
    let (rect, resp) = ui.allocate_exact_size(size, egui::Sense::hover());
    let p = ui.painter_at(rect);
    let max = m.iter().flatten().copied().fold(0f32, f32::max).max(1e-6);
    let font = egui::FontId::proportional(11.0);
    let small = egui::FontId::monospace(9.0);
    let text = ui.visuals().text_color();
    let x0 = rect.left() + label_w;
    let y0 = rect.top() + header_h;
    for (j, g) in groups.iter().enumerate() {
        p.text(
            egui::pos2(x0 + (j as f32 + 0.5) * cw, rect.top() + 2.0),
            egui::Align2::CENTER_TOP,
            g,
            font.clone(),
            text,
        );
    }
    let mut hover = None;
    let pointer = resp.hover_pos();
    for (l, row) in m.iter().enumerate() {
        let y = y0 + l as f32 * ch;
        if l % 2 == 0 || m.len() <= 24 {
            p.text(
                egui::pos2(x0 - 4.0, y + ch / 2.0),
                egui::Align2::RIGHT_CENTER,
                format!("L{l}"),
                small.clone(),
                text,
            );
        }
        for (j, v) in row.iter().enumerate() {
            let r =
                egui::Rect::from_min_size(egui::pos2(x0 + j as f32 * cw, y), egui::vec2(cw, ch));
            let col = colormap(v / max);
            p.rect_filled(r, 0.0, c32(col));
            p.rect_stroke(
                r,
                0.0,
                egui::Stroke::new(0.5, Color32::from_gray(40)),
                egui::StrokeKind::Inside,
            );
            if cw > 40.0 && ch >= 11.0 {
                let lum = 0.299 * col[0] as f32 + 0.587 * col[1] as f32 + 0.114 * col[2] as f32;
                p.text(
                    r.center(),
                    egui::Align2::CENTER_CENTER,
                    format!("{v:.2}"),
                    small.clone(),
                    if lum > 140.0 {
                        Color32::BLACK
                    } else {
                        Color32::WHITE
                    },
                );
            }
            if pointer.is_some_and(|q| r.contains(q)) {
                hover = Some((l, j, *v));
            }
        }
    }
    if let Some(n) = note {
        p.text(
            egui::pos2(rect.left(), rect.top() + 2.0),
            egui::Align2::LEFT_TOP,
            n,
            small,
            Color32::YELLOW,
        );
    }
    if let Some((l, j, v)) = hover {
        resp.on_hover_text(format!("layer {l} · {} · mass {v:.4}", groups[j]));
    }
}

/// Horizontal bars of a per-segment distribution (tooltip of a generated token).
fn distribution(ui: &mut egui::Ui, groups: &[String], d: &[f32]) {
    ui.label(RichText::new("attention mass per segment (mean over layers)").small());
    for (g, v) in groups.iter().zip(d) {
        ui.horizontal(|ui| {
            ui.add_sized([70.0, 14.0], egui::Label::new(RichText::new(g).small()));
            let (r, _) = ui.allocate_exact_size(egui::vec2(160.0, 12.0), egui::Sense::hover());
            ui.painter().rect_filled(r, 0.0, Color32::from_gray(50));
            let mut f = r;
            f.set_width(r.width() * v.clamp(0.0, 1.0));
            ui.painter().rect_filled(f, 0.0, c32(colormap(*v)));
            ui.label(RichText::new(format!("{v:.3}")).small().monospace());
        });
    }
}

impl eframe::App for ViewerApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let ctx = ui.ctx().clone();
        self.poll();
        // Files dropped on the window become documents.
        let dropped: Vec<egui::DroppedFileHandle> = ctx.input(|i| i.raw.dropped_files.clone());
        if !dropped.is_empty() {
            for f in dropped {
                self.add_path(f.path().to_path_buf());
            }
            self.save_state();
        }
        if ctx.input_mut(|i| {
            i.consume_shortcut(&KeyboardShortcut::new(Modifiers::COMMAND, Key::Enter))
        }) {
            self.ask(&ctx);
        }
        egui::Panel::top("top").show(ui, |ui| {
            ui.add_space(4.0);
            self.top_bar(ui);
            ui.add_space(4.0);
        });
        if !self.errors.is_empty() {
            egui::Panel::bottom("errors").show(ui, |ui| self.errors_panel(ui));
        }
        egui::Panel::left("docs")
            .resizable(true)
            .default_size(340.0)
            .show(ui, |ui| self.docs_panel(ui));
        egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::vertical().show(ui, |ui| {
                self.ask_panel(ui);
                ui.add_space(6.0);
                self.answers(ui);
                ui.separator();
                self.ttft_panel(ui);
                ui.separator();
                self.attention_panel(ui);
            });
        });
        self.drive_script(&ctx);
    }

    fn on_exit(&mut self) {
        self.save_state();
    }
}
