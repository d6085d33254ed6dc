//! The `kvlink` command line. Thin: parse, call the library, print.

#[cfg(not(target_arch = "wasm32"))]
mod cli;

/// The command line is native only; the browser build is the library (feature `web`).
#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    // Mesa's Vulkan drivers print "error: XDG_RUNTIME_DIR is invalid" on headless
    // machines where it is unset; give them a harmless value (before any thread exists).
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    if let Err(e) = cli::run() {
        // One clear line (plus causes), never a panic trace, and a non-zero exit.
        let mut msg = format!("error: {e}");
        for c in e.chain().skip(1) {
            let s = c.to_string();
            if !msg.contains(&s) {
                msg.push_str(&format!(": {s}"));
            }
        }
        eprintln!("{msg}");
        std::process::exit(1);
    }
}
