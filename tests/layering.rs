//! The library's layers only reach down: gpu <- ops <- model <- link <- engine <- the
//! front ends (eval, server, train_data, web, fuzz). This test reads every source file
//! of the library, collects the `crate::` modules it names, and fails when a module names
//! one of a higher layer, unless the pair is one of the known debts below (issue 17 item
//! 3), which must shrink, never grow: a debt that is paid off fails the test too, so the
//! list stays true.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layer of each top-level module of `src/lib.rs` (a module may use its own layer's
/// and lower layers' modules).
const LAYERS: &[(&str, u32)] = &[
    ("error", 0),
    ("paths", 0),
    ("par", 0),
    // Pure storage and numerics: bytes of KV caches, sampling from logits.
    ("kv", 1),
    ("sampling", 1),
    ("gpu", 1),
    ("ops", 2),
    ("model", 3),
    ("link", 4),
    ("engine", 5),
    ("eval", 6),
    ("train_data", 6),
    ("server", 6),
    ("setup", 6),
    ("web", 6),
    ("fuzz", 6),
];

/// Names `lib.rs` re-exports at the crate root, and the module they come from.
const ROOT_REEXPORTS: &[(&str, &str)] = &[
    ("Error", "error"),
    ("Result", "error"),
    ("Engine", "engine"),
    ("AskStats", "engine"),
    ("GenerateParams", "engine"),
    ("GenerateStats", "engine"),
    ("Request", "engine"),
    ("Mode", "link"),
    ("PromptPlan", "link"),
];

/// Known reaches up (module, the higher module it names): to be removed, not added to.
const DEBTS: &[(&str, &str)] = &[];

fn layer(m: &str) -> Option<u32> {
    LAYERS.iter().find(|(n, _)| *n == m).map(|(_, l)| *l)
}

/// The top-level module names a source text refers to through `crate::`.
fn crate_refs(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = src;
    while let Some(i) = rest.find("crate::") {
        // not part of a longer path such as `kvlink_crate::`
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // use crate::{a::b, c, d::{e, f}}: the names at brace depth 1
            let mut depth = 1;
            let mut at_name = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => at_name = true,
                    c if at_name && depth == 1 && (c.is_ascii_alphabetic() || c == '_') => {
                        out.insert(ident(&group[j..]));
                        at_name = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out.into_iter()
        .map(|n| {
            ROOT_REEXPORTS
                .iter()
                .find(|(r, _)| *r == n)
                .map_or(n.clone(), |(_, m)| m.to_string())
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every (module, higher module it names) pair of the library, with a file that does it.
fn reaches_up() -> BTreeMap<(String, String), String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = BTreeMap::new();
    for (module, own) in LAYERS {
        let mut files = Vec::new();
        let file = src.join(format!("{module}.rs"));
        if file.exists() {
            files.push(file);
        }
        let dir = src.join(module);
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        }
        assert!(
            !files.is_empty(),
            "module {module} has no source under src/"
        );
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for r in crate_refs(&text) {
                let Some(l) = layer(&r) else {
                    panic!(
                        "{} names crate::{r}, a module this test does not place: add it to LAYERS",
                        f.display()
                    );
                };
                if l > *own {
                    found
                        .entry((module.to_string(), r))
                        .or_insert_with(|| f.display().to_string());
                }
            }
        }
    }
    found
}

#[test]
fn layers_only_reach_down() {
    let found = reaches_up();
    let debts: BTreeSet<(String, String)> = DEBTS
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let new: Vec<String> = found
        .iter()
        .filter(|(k, _)| !debts.contains(*k))
        .map(|((a, b), f)| format!("{a} -> {b} ({f})"))
        .collect();
    assert!(
        new.is_empty(),
        "a lower layer names a higher one: {new:?}. Move the shared piece down, or pass it in"
    );
    let paid: Vec<_> = debts.iter().filter(|k| !found.contains_key(*k)).collect();
    assert!(
        paid.is_empty(),
        "these known debts are paid off: remove them from DEBTS: {paid:?}"
    );
}

#[test]
fn the_reference_parser_sees_every_form() {
    let refs = crate_refs(
        "use crate::gpu::Gpu;\nuse crate::{error::Result, link::{self, Mode}, Engine};\n\
         let x = crate::model::paths::cache_dir(); // kvlink_crate::nothing\n",
    );
    let want: BTreeSet<String> = ["gpu", "error", "link", "engine", "model"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(refs, want);
    // every module of lib.rs is placed
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    for line in lib.lines() {
        if let Some(m) = line.trim().strip_prefix("pub mod ") {
            let m = m.trim_end_matches(';');
            assert!(layer(m).is_some(), "lib.rs module {m} is not in LAYERS");
        }
    }
}
