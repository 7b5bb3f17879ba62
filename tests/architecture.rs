//! The crate map in `docs/ARCHITECTURE.md` is enforced here, in the spirit of
//! rust-analyzer's "tidy" tests: the document's rule blocks are parsed and the real
//! dependency graph (`cargo metadata`) is checked against them.
//!
//! - **Edges**: each workspace crate depends (normal and build dependencies) on
//!   exactly the workspace crates the map lists for it. A new edge must be added to
//!   the map on purpose; an edge that went away must leave the map, so it stays true.
//! - **Owned crates**: some external crates may be named by one or a few crates only
//!   (fuser by the filesystem, reqwest by the registry client, tonic by the gRPC
//!   adapters, anyhow and clap by the binary...), so that a change of library stays
//!   local.
//! - **Never compiled**: some crates must not pull a heavy dependency in even
//!   transitively (the format crate builds without an async runtime, so it can be
//!   fuzzed and reused alone).
//!
//! The checker is a plain function over plain data, so the fixture test below shows
//! it failing on a forbidden edge without touching the real manifests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

/// The rules, as written in the architecture document.
#[derive(Debug, Default)]
struct Rules {
    /// crate → the workspace crates it depends on.
    edges: BTreeMap<String, BTreeSet<String>>,
    /// external crate → the workspace crates that may depend on it directly.
    owners: BTreeMap<String, BTreeSet<String>>,
    /// crate → external crates it must not compile, even transitively.
    never: BTreeMap<String, BTreeSet<String>>,
}

/// The real graph: per workspace crate, its direct (normal and build) dependencies
/// and every package it compiles transitively for a normal build.
#[derive(Debug, Default)]
struct Graph {
    direct: BTreeMap<String, BTreeSet<String>>,
    transitive: BTreeMap<String, BTreeSet<String>>,
}

const DOC: &str = "docs/ARCHITECTURE.md";

/// The lines of the first fenced block after the heading `heading` in `doc`.
fn rule_block<'a>(doc: &'a str, heading: &str) -> Result<Vec<&'a str>, String> {
    let start = doc
        .find(heading)
        .ok_or_else(|| format!("{DOC} has no heading {heading:?}"))?;
    let rest = &doc[start..];
    let open = rest
        .find("```")
        .ok_or_else(|| format!("{DOC}: no rule block under {heading:?}"))?;
    let body = &rest[open..];
    let body = &body[body.find('\n').map_or(body.len(), |n| n + 1)..];
    let close = body
        .find("```")
        .ok_or_else(|| format!("{DOC}: rule block under {heading:?} is not closed"))?;
    Ok(body[..close]
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect())
}

/// `name: a b c` lines into a map.
fn parse_lines(lines: &[&str]) -> Result<BTreeMap<String, BTreeSet<String>>, String> {
    let mut out = BTreeMap::new();
    for line in lines {
        let (name, rest) = line
            .split_once(':')
            .ok_or_else(|| format!("{DOC}: rule line {line:?} has no ':'"))?;
        let values = rest.split_whitespace().map(str::to_owned).collect();
        if out.insert(name.trim().to_owned(), values).is_some() {
            return Err(format!("{DOC}: {name:?} appears twice in one rule block"));
        }
    }
    Ok(out)
}

fn parse_rules(doc: &str) -> Result<Rules, String> {
    Ok(Rules {
        edges: parse_lines(&rule_block(doc, "### Dependency edges")?)?,
        owners: parse_lines(&rule_block(doc, "### Owned external crates")?)?,
        never: parse_lines(&rule_block(doc, "### Never compiled")?)?,
    })
}

/// Everything the rules forbid in `graph`, one message per violation.
fn check(rules: &Rules, graph: &Graph) -> Vec<String> {
    let mut problems = Vec::new();
    let workspace: BTreeSet<&String> = graph.direct.keys().collect();
    for (krate, deps) in &graph.direct {
        let Some(allowed) = rules.edges.get(krate) else {
            problems.push(format!(
                "{krate} is not on the crate map: add it under \"Dependency edges\" in {DOC}"
            ));
            continue;
        };
        for dep in deps.iter().filter(|d| workspace.contains(d)) {
            if !allowed.contains(dep) {
                problems.push(format!(
                    "forbidden edge {krate} -> {dep}: the map in {DOC} does not allow it \
                     (move the code, or change the map on purpose)"
                ));
            }
        }
        for dep in allowed {
            if !deps.contains(dep) {
                problems.push(format!(
                    "the map says {krate} -> {dep}, but {krate} does not depend on {dep}: \
                     keep the map in {DOC} true"
                ));
            }
        }
        for dep in deps {
            if let Some(owners) = rules.owners.get(dep) {
                if !owners.contains(krate) {
                    problems.push(format!(
                        "{krate} depends on {dep}, which only {} may name",
                        owners.iter().cloned().collect::<Vec<_>>().join(", ")
                    ));
                }
            }
        }
    }
    for krate in rules.edges.keys() {
        if !graph.direct.contains_key(krate) {
            problems.push(format!(
                "the map in {DOC} lists {krate}, which is not a workspace crate"
            ));
        }
    }
    for (krate, banned) in &rules.never {
        let Some(compiled) = graph.transitive.get(krate) else {
            problems.push(format!(
                "\"Never compiled\" names {krate}, which is not a workspace crate"
            ));
            continue;
        };
        for dep in banned.intersection(compiled) {
            problems.push(format!(
                "{krate} compiles {dep} (through its dependencies), which the map forbids"
            ));
        }
    }
    problems
}

/// The workspace's real graph, from `cargo metadata`.
fn real_graph() -> Graph {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(root)
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let name_of: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter_map(|p| Some((p["id"].as_str()?, p["name"].as_str()?)))
        .collect();
    // Normal and build edges of every resolved package (dev edges are for tests).
    let mut normal: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().expect("resolve nodes") {
        let id = node["id"].as_str().expect("node id");
        let deps = node["deps"].as_array().expect("deps");
        let kept = deps.iter().filter(|d| {
            d["dep_kinds"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k["kind"].as_str() != Some("dev")))
        });
        normal.insert(id, kept.filter_map(|d| d["pkg"].as_str()).collect());
    }
    let mut graph = Graph::default();
    for id in meta["workspace_members"].as_array().expect("members") {
        let id = id.as_str().expect("member id");
        let name = name_of[id].to_owned();
        let direct = normal[id].iter().map(|d| name_of[d].to_owned()).collect();
        let mut seen = BTreeSet::new();
        let mut stack: Vec<&str> = normal[id].clone();
        while let Some(next) = stack.pop() {
            if seen.insert(next) {
                stack.extend(normal.get(next).into_iter().flatten());
            }
        }
        let transitive = seen.iter().map(|d| name_of[d].to_owned()).collect();
        graph.direct.insert(name.clone(), direct);
        graph.transitive.insert(name, transitive);
    }
    graph
}

#[test]
fn crates_follow_the_map_in_architecture_md() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join(DOC)).expect("reading the architecture doc");
    let rules = parse_rules(&doc).unwrap_or_else(|e| panic!("{e}"));
    let problems = check(&rules, &real_graph());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// A map and a graph that break each kind of rule once: the checker names each.
#[test]
fn a_forbidden_edge_is_reported() {
    let doc = "\
### Dependency edges
```text
zest-oci:
zest-format: zest-oci
zest-fetch: zest-format zest-oci
```
### Owned external crates
```text
fuser: zest-fs
```
### Never compiled
```text
zest-format: tokio
```
";
    let rules = parse_rules(doc).unwrap_or_else(|e| panic!("{e}"));
    let mut graph = Graph::default();
    graph.direct.insert("zest-oci".into(), set(&["serde"]));
    // zest-format gains an edge up the stack, and with it an async runtime.
    graph
        .direct
        .insert("zest-format".into(), set(&["zest-oci", "zest-fetch"]));
    graph.direct.insert(
        "zest-fetch".into(),
        set(&["zest-format", "zest-oci", "fuser"]),
    );
    graph.transitive.insert("zest-oci".into(), set(&["serde"]));
    graph.transitive.insert(
        "zest-format".into(),
        set(&["zest-oci", "zest-fetch", "tokio", "fuser"]),
    );
    graph
        .transitive
        .insert("zest-fetch".into(), set(&["zest-format", "tokio", "fuser"]));

    let problems = check(&rules, &graph);
    let has = |needle: &str| problems.iter().any(|p| p.contains(needle));
    assert!(
        has("forbidden edge zest-format -> zest-fetch"),
        "{problems:?}"
    );
    assert!(
        has("zest-fetch depends on fuser, which only zest-fs may name"),
        "{problems:?}"
    );
    assert!(has("zest-format compiles tokio"), "{problems:?}");
    assert_eq!(problems.len(), 3, "{problems:?}");

    // The same graph without the bad edge and the owned crate passes.
    graph
        .direct
        .insert("zest-format".into(), set(&["zest-oci"]));
    graph
        .direct
        .insert("zest-fetch".into(), set(&["zest-format", "zest-oci"]));
    graph
        .transitive
        .insert("zest-format".into(), set(&["zest-oci"]));
    assert!(check(&rules, &graph).is_empty());

    // A map that lists an edge the graph lacks is reported too: the map stays true.
    graph.direct.insert("zest-fetch".into(), set(&["zest-oci"]));
    let problems = check(&rules, &graph);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("the map says zest-fetch -> zest-format"));
}
