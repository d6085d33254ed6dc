//! `f` over a slice on scoped threads, one chunk of items per thread (native builds);
//! in order, one item after another, in the browser (no threads there, and wgpu's types
//! are not `Send` there, so the browser's `map` asks for no thread bounds).

/// `f` of every item, in order: up to one thread per core (at most 16) where there is
/// more than one item. `lost()` stands in for each result of a chunk whose thread
/// panicked.
#[cfg(not(target_arch = "wasm32"))]
pub fn map<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> R + Sync,
    lost: impl Fn() -> R,
) -> Vec<R> {
    if items.len() < 2 {
        return items.iter().map(f).collect();
    }
    let threads = std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .min(16);
    let per = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(per)
            .map(|c| {
                (
                    c.len(),
                    s.spawn(move || c.iter().map(f).collect::<Vec<_>>()),
                )
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|(n, h)| {
                h.join()
                    .unwrap_or_else(|_| (0..n).map(|_| lost()).collect())
            })
            .collect()
    })
}

/// `f` of every item, in order (the browser: one thread).
#[cfg(target_arch = "wasm32")]
pub fn map<T, R>(items: &[T], f: impl Fn(&T) -> R, _lost: impl Fn() -> R) -> Vec<R> {
    items.iter().map(f).collect()
}
