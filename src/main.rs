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
    restore_sigpipe();
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

/// Rust ignores SIGPIPE, so printing to a closed pipe (`kvlink devices | grep -q x`)
/// panics with "failed printing to stdout". For the one-shot commands restore the
/// default action: the process ends quietly, like any Unix filter. The server keeps it
/// ignored: a client that hangs up must never end it (sockets also use MSG_NOSIGNAL).
#[cfg(not(target_arch = "wasm32"))]
fn restore_sigpipe() {
    #[cfg(unix)]
    {
        let cmd = std::env::args().nth(1).unwrap_or_default();
        if !matches!(cmd.as_str(), "serve" | "bench" | "view") {
            // SAFETY: called first thing in main, before any other thread exists.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            }
        }
    }
}
