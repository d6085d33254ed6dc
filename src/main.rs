//! The `kvlink` command line. Thin: parse, call the library, print.

mod cli;

fn main() {
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
