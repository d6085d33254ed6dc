//! Answer a question over a folder of text files, first cold (documents encoded), then
//! warm (their KV caches reused), and print both times to first token.
//!
//!     cargo run --release --example rag -- DOCS_DIR "your question" [MODEL [ADAPTER]]
//!
//! MODEL defaults to SmolLM2-135M-Instruct in the cache directory
//! (scripts/fetch-model.sh fetches it), with the KVLink-tuned adapter that ships in
//! `adapters/smollm2-135m-kvlink` (link tokens after each document; reuse keeps the
//! answers of full prefill far better than the plain model). With MODEL, no adapter is
//! used unless ADAPTER is given.

use kvlink::gpu::{AdapterChoice, Gpu};
use kvlink::model::lora::with_lora;
use kvlink::model::{default_model_path, open_model};
use kvlink::{Engine, GenerateParams, Mode, Request};
use std::io::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: rag DOCS_DIR QUESTION [MODEL [ADAPTER]]");
        std::process::exit(2);
    }
    let (model, adapter): (std::path::PathBuf, Option<std::path::PathBuf>) = match args.get(3) {
        Some(m) => (m.into(), args.get(4).map(Into::into)),
        None => (
            default_model_path(),
            Some(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("adapters/smollm2-135m-kvlink"),
            ),
        ),
    };
    let mut files: Vec<_> = std::fs::read_dir(&args[1])?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    let documents = files
        .iter()
        .map(|p| Ok(format!("{}\n", std::fs::read_to_string(p)?.trim_end())))
        .collect::<std::io::Result<Vec<_>>>()?;
    eprintln!("{} documents from {}", documents.len(), args[1]);

    let mut src = open_model(&model)?;
    if let Some(dir) = &adapter {
        src = with_lora(src, dir)?;
        eprintln!("adapter {}", dir.display());
    }
    let engine = Engine::load(
        Gpu::new(&AdapterChoice::from_env())?,
        src.as_ref(),
        0,
        &mut |_, _| {},
    )?;
    let request = Request {
        mode: Mode::Kvlink,
        ..Request::new(documents, args[2].clone())
    };
    let params = GenerateParams {
        max_tokens: 64,
        ..Default::default()
    };
    for pass in ["cold", "warm"] {
        let mut stream = kvlink::model::tokenizer::TextStream::new(engine.tokenizer());
        let stats = engine.ask(&request, &params, |t| {
            if !engine.tokenizer().is_stop(t) {
                print!("{}", stream.push(t).unwrap_or_default());
                let _ = std::io::stdout().flush();
            }
            true
        })?;
        println!("{}", stream.finish()?);
        let t = &stats.timings;
        eprintln!(
            "{pass}: TTFT {:.1} ms ({} documents cached, {} encoded)",
            t.ttft.as_secs_f64() * 1e3,
            t.cached_docs,
            t.computed_docs
        );
    }
    Ok(())
}
