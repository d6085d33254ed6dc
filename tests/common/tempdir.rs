//! Fresh, unique, empty directories under the system temp dir, removed on drop (the
//! `tempfile` crate), named after the test that made them.

pub use tempfile::TempDir;

/// A new temporary directory whose name contains `tag`.
pub fn tempdir(tag: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("kvlink-test-{tag}-"))
        .tempdir()
        .expect("create a temporary directory")
}
