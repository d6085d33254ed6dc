//! Answer a question over a folder of text files, first cold (documents encoded), then
//! warm (their KV caches reused), and print both times to first token.
//!
//!     cargo run --release --example rag -- DOCS_DIR "your question" [MODEL [ADAPTER]]
//!
//! MODEL defaults to SmolLM2-135M-Instruct in the cache directory (fetched the first
//! time, as `kvlink` does), with the KVLink-tuned adapter that ships in
//! `adapters/smollm2-135m-kvlink` (link tokens after each document; reuse keeps the
//! answers of full prefill far better than the plain model). With MODEL, no adapter is
//! used unless ADAPTER is given. The model and adapter are set up by
//! `kvlink::setup::ModelSpec`, as the `kvlink` command sets them up.

use kvlink::gpu::{AdapterChoice, Gpu};
use kvlink::setup::ModelSpec;
use kvlink::{GenerateParams, Mode, Request};
use std::io::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: rag DOCS_DIR QUESTION [MODEL [ADAPTER]]");
        std::process::exit(2);
    }
    // The default model comes with the KVLink-tuned adapter; another MODEL only with
    // the ADAPTER given.
    let spec = match args.get(3) {
        Some(m) => ModelSpec {
            model: Some(m.into()),
            lora: args.get(4).map(Into::into),
            ctx: 0,
        },
        None => ModelSpec {
            model: None,
            lora: Some(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("adapters/smollm2-135m-kvlink"),
            ),
            ctx: 0,
        },
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

    if let Some(dir) = &spec.lora {
        eprintln!("adapter {}", dir.display());
    }
    // (A missing default model is fetched first, as `kvlink` does.)
    let gpu = Gpu::new(&AdapterChoice::from_env())?;
    let engine = spec.load(gpu, &mut |m| eprintln!("{m}"), &mut |_, _| {})?;
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
