//! The module graph of a crate, read from its sources, for the tests that keep each crate's
//! top-level modules free of import circles: each can be read, and changed, knowing only the
//! modules below it. An import is a `crate::` path outside comments and test modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            out.push(path);
        }
    }
}

/// Top-level module -> the modules it names, each with one place it does.
pub fn imports(src: &Path) -> BTreeMap<String, BTreeMap<String, String>> {
    let modules: BTreeSet<String> = std::fs::read_dir(src)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter_map(|path| Some(path.file_stem()?.to_str()?.to_owned()))
        .filter(|name| name != "lib" && name != "bin")
        .collect();
    let mut graph: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for module in &modules {
        let mut files = Vec::new();
        let dir = src.join(module);
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        } else {
            files.push(src.join(format!("{module}.rs")));
        }
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for (number, line) in code.lines().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                for (at, _) in line.match_indices("crate::") {
                    let rest = &line[at + "crate::".len()..];
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if name != *module && modules.contains(&name) {
                        let place = format!("{}:{}", file.display(), number + 1);
                        graph
                            .entry(module.clone())
                            .or_default()
                            .entry(name)
                            .or_insert(place);
                    }
                }
            }
        }
    }
    graph
}

/// A circle of imports, if there is one: the modules around it.
pub fn circle(graph: &BTreeMap<String, BTreeMap<String, String>>) -> Option<Vec<String>> {
    fn visit(
        module: &str,
        graph: &BTreeMap<String, BTreeMap<String, String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|on| on == module) {
            return Some(path[at..].to_vec());
        }
        if done.contains(module) {
            return None;
        }
        path.push(module.to_owned());
        for next in graph.get(module).into_iter().flat_map(BTreeMap::keys) {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(module.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|module| visit(module, graph, &mut Vec::new(), &mut done))
}

/// Panics naming the circle, if `src`'s top-level modules import each other in one, with one
/// place of each import around it.
pub fn assert_no_circle(src: &Path) {
    let graph = imports(src);
    assert!(
        graph.len() > 3,
        "the modules of {} were read: {graph:?}",
        src.display()
    );
    if let Some(modules) = circle(&graph) {
        let places: Vec<String> = modules
            .iter()
            .zip(modules.iter().cycle().skip(1))
            .map(|(from, to)| format!("{from} -> {to} ({})", graph[from][to]))
            .collect();
        panic!(
            "the modules of {} import each other in a circle:\n{}",
            src.display(),
            places.join("\n")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_circle_is_found_and_named() {
        let edge = |from: &str, to: &str| {
            (
                from.to_owned(),
                BTreeMap::from([(to.to_owned(), format!("{from}.rs:1"))]),
            )
        };
        let graph: BTreeMap<_, _> = [
            edge("a", "b"),
            edge("b", "c"),
            edge("c", "a"),
            edge("d", "a"),
        ]
        .into_iter()
        .collect();
        let found = circle(&graph).unwrap();
        assert_eq!(found.len(), 3, "{found:?}");
        let acyclic: BTreeMap<_, _> = [edge("a", "b"), edge("b", "c"), edge("d", "a")]
            .into_iter()
            .collect();
        assert_eq!(circle(&acyclic), None);
    }
}
