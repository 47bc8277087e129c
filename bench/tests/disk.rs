//! `flowattr-bench disk` on a real file: it measures, it cleans up, and it refuses settings
//! O_DIRECT cannot take.

use flowattr_bench::disk::{DiskArgs, measure};

fn args(dir: &std::path::Path) -> DiskArgs {
    DiskArgs {
        dir: dir.to_owned(),
        bytes: 8 << 20,
        request: 256 << 10,
        depth: 4,
    }
}

#[test]
fn a_measurement_writes_reads_and_removes_its_scratch_file() {
    // Under the target directory: /tmp may be a tmpfs, which has no O_DIRECT.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let ceiling = measure(&args(dir.path())).unwrap();
    assert!(ceiling.write > 0.0 && ceiling.read > 0.0, "{ceiling:?}");
    let combined = ceiling.write_then_read();
    assert!(
        combined < ceiling.write.min(ceiling.read),
        "each byte costs a write and a read: {combined} vs {ceiling:?}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the scratch file is removed"
    );
}

#[test]
fn requests_o_direct_cannot_take_are_refused_before_any_io() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let error = measure(&DiskArgs {
        request: 1000,
        ..args(dir.path())
    })
    .unwrap_err();
    assert!(error.to_string().contains("multiple of 4096"), "{error}");
    let error = measure(&DiskArgs {
        depth: 0,
        ..args(dir.path())
    })
    .unwrap_err();
    assert!(error.to_string().contains("--depth"), "{error}");
}

#[test]
fn a_directory_that_does_not_exist_is_a_clear_error() {
    let error = measure(&args(std::path::Path::new("/nonexistent/flowattr"))).unwrap_err();
    assert!(
        format!("{error:#}").contains("/nonexistent/flowattr"),
        "{error:#}"
    );
}
