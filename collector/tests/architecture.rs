//! The collector's top-level modules import each other without a circle
//! (`flowattr_bench::architecture`): a change that closes one fails here with its path.

#[test]
fn the_collectors_modules_import_each_other_without_a_circle() {
    flowattr_bench::architecture::assert_no_circle(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
    );
}
