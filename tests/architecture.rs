//! The crates are the architecture, and Cargo's resolved graph must say so: the plugin never
//! links training, the music core knows neither the framework nor candle, the audio thread's
//! crate knows no model. Read from `cargo metadata`, so a dependency added anywhere, directly or
//! through another crate, fails here.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

/// Package name → the names of its normal (not dev or build) dependencies, from the workspace's
/// resolved graph.
fn normal_dependencies() -> HashMap<String, Vec<String>> {
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline", "--manifest-path"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .output()
        .expect("cargo metadata runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let name_of: HashMap<&str, &str> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let mut graph = HashMap::new();
    for node in metadata["resolve"]["nodes"].as_array().unwrap() {
        let deps = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|dep| dep["dep_kinds"].as_array().unwrap().iter().any(|kind| kind["kind"].is_null()))
            .map(|dep| name_of[dep["pkg"].as_str().unwrap()].to_string())
            .collect();
        graph.insert(name_of[node["id"].as_str().unwrap()].to_string(), deps);
    }
    graph
}

/// Every package `package` links, directly or not.
fn closure(graph: &HashMap<String, Vec<String>>, package: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![package.to_string()];
    while let Some(next) = todo.pop() {
        for dep in graph.get(&next).into_iter().flatten() {
            if seen.insert(dep.clone()) {
                todo.push(dep.clone());
            }
        }
    }
    seen
}

#[test]
fn each_crate_links_only_what_its_thread_may() {
    let graph = normal_dependencies();
    let rules: [(&str, &[&str]); 4] = [
        ("antiphon", &["antiphon-train", "indicatif", "plotters"]),
        ("antiphon-music", &["candle-core", "candle-nn", "nice-plug", "nice-plug-core"]),
        ("antiphon-live", &["candle-core", "candle-nn", "antiphon-model", "antiphon-train"]),
        ("antiphon-model", &["nice-plug", "nice-plug-core", "antiphon-train", "antiphon-live"]),
    ];
    for (package, forbidden) in rules {
        let links = closure(&graph, package);
        assert!(graph.contains_key(package), "{package} is not in the workspace");
        for name in forbidden {
            assert!(!links.contains(*name), "{package} links {name}, which its thread must not");
        }
    }
    // The plugin does link the three crates it is made of.
    let plugin = closure(&graph, "antiphon");
    for name in ["antiphon-music", "antiphon-live", "antiphon-model", "nice-plug"] {
        assert!(plugin.contains(name), "the plugin does not link {name}");
    }
}
