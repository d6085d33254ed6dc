//! `kvlink.json` link configuration: parse, bounds, validate against vocabularies and
//! document counts, and the prompt plan it lays out.
#![no_main]

use kvlink::link::{LinkConfig, PromptPlan};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(link) = LinkConfig::parse(data, Path::new("kvlink.json")) else {
        return;
    };
    let docs: [&[u32]; 3] = [&[5, 6], &[7], &[8, 9, 10]];
    for vocab in [0usize, 11, 49354, 1 << 24, usize::MAX] {
        for n_docs in [0usize, 1, 3, 40, 1 << 20] {
            let _ = link.validate(vocab, n_docs);
        }
        // A plan over ids the configuration validated lies inside the vocabulary.
        if vocab > 10 && link.validate(vocab, docs.len()).is_ok() {
            let plan = PromptPlan::build(&[1], &docs, &[2], &link).expect("validated plan");
            assert!(plan.tokens.iter().all(|&t| (t as usize) < vocab));
            assert_eq!(plan.tokens.len(), plan.segments.len());
        }
    }
    let _ = PromptPlan::build(&[], &docs, &[], &link);
});
