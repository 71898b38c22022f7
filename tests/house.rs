//! The house: no module of a crate imports, directly or through others, a module that
//! imports it back. Modules are files (`wire::framer`; a folder's `mod.rs` is the folder's
//! module). Dependencies are read from the sources outside test modules: `crate::a::b`
//! paths name the longest module they reach, `super::x` paths name `x` beside the file or
//! the parent itself. A folder's module may use the parts it is made of (its children):
//! that edge is not a dependency; a child using its parent is. A circle introduced
//! anywhere fails here naming its members.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The module a source file is, from its path under `src/`: `wire/framer.rs` is
/// `wire::framer`, `source/mod.rs` is `source`.
fn module_of(rel: &Path) -> String {
    let mut parts: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().to_string()).collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" {
        parts.push(stem.to_string());
    }
    parts.join("::")
}

/// The longest module in `known` that `path` (`a::b::c`, names only) starts with.
fn longest_known(path: &[String], known: &BTreeSet<String>) -> Option<String> {
    (1..=path.len()).rev().map(|n| path[..n].join("::")).find(|m| known.contains(m))
}

/// The module path after `at` in `src`: names joined by `::`, up to anything else.
fn path_after(src: &str, at: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = &src[at..];
    loop {
        let name: String =
            rest.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit()).collect();
        if name.is_empty() {
            break;
        }
        rest = &rest[name.len()..];
        out.push(name);
        match rest.strip_prefix("::") {
            Some(r) => rest = r,
            None => break,
        }
    }
    out
}

/// Each module of the crate at `dir` and the modules it depends on.
fn graph(dir: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let src_dir = dir.join("src");
    let mut files = Vec::new();
    let mut stack = vec![src_dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(&src_dir).unwrap().to_path_buf();
                let top = rel.components().next().unwrap().as_os_str().to_string_lossy().to_string();
                if top != "bin" && top != "lib.rs" && top != "main.rs" {
                    files.push((module_of(&rel), p));
                }
            }
        }
    }
    let known: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, p) in &files {
        let src = std::fs::read_to_string(p).unwrap();
        let src = src.split("#[cfg(test)]\nmod tests").next().unwrap();
        let parent: Vec<String> =
            m.split("::").map(String::from).collect::<Vec<_>>()[..m.matches("::").count()].to_vec();
        let mut deps = BTreeSet::new();
        for (i, _) in src.match_indices("crate::") {
            deps.extend(longest_known(&path_after(src, i + 7), &known));
        }
        for (i, _) in src.match_indices("super::") {
            if i >= 2 && &src[i - 2..i] == "::" {
                continue; // `crate::x::super` does not occur; `a::super::b` is not a use of the parent
            }
            let mut path = parent.clone();
            path.extend(path_after(src, i + 7));
            deps.extend(longest_known(&path, &known).or_else(|| (!parent.is_empty()).then(|| parent.join("::"))));
        }
        // A folder's module is made of its children: using them is not a dependency.
        deps.retain(|d| d != m && !d.starts_with(&format!("{m}::")));
        g.insert(m.clone(), deps);
    }
    g
}

/// Modules from which `from` is reachable again through `g`.
fn circle_through(g: &BTreeMap<String, BTreeSet<String>>, from: &str) -> Option<Vec<String>> {
    // Depth-first from `from`, keeping the path: a path that returns to `from` is a circle.
    fn walk(
        g: &BTreeMap<String, BTreeSet<String>>,
        at: &str,
        goal: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in &g[at] {
            if next == goal {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(g, next, goal, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![from.to_string()];
    walk(g, from, from, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn no_module_imports_itself_through_others() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut circles = Vec::new();
    for krate in ["accel-user", "kvm-hooks", "embedded-vmm", "accel-ebpf", "qemu-vm", "mh-abi", "benches"] {
        let g = graph(&root.join(krate));
        if krate == "accel-user" || krate == "kvm-hooks" {
            assert!(g.len() >= 10, "{krate}: only {} modules found: {:?}", g.len(), g.keys());
        }
        if krate == "accel-user" {
            // The folders are read: the wire's framer is a module of its own, and the
            // transports depend on it.
            assert!(g["wire::transport"].contains("wire::framer"), "{:?}", g["wire::transport"]);
            assert!(g["source::pages"].contains("source"), "a child's use of its parent counts");
        }
        for m in g.keys() {
            if let Some(c) = circle_through(&g, m) {
                circles.push(format!("{krate}: {} -> {m}", c.join(" -> ")));
            }
        }
    }
    assert!(circles.is_empty(), "import circles:\n{}", circles.join("\n"));
}

#[test]
fn modules_are_named_by_their_files() {
    assert_eq!(module_of(Path::new("wire/framer.rs")), "wire::framer");
    assert_eq!(module_of(Path::new("source/mod.rs")), "source");
    assert_eq!(module_of(Path::new("policy.rs")), "policy");
    let known: BTreeSet<String> = ["wire", "wire::frame"].map(String::from).into();
    let src = "use crate::wire::frame::{Header, PAGE};";
    assert_eq!(longest_known(&path_after(src, 11), &known).as_deref(), Some("wire::frame"));
}

#[test]
fn a_circle_is_found() {
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    g.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    g.insert("d".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(circle_through(&g, "a"), Some(vec!["a".into(), "b".into(), "c".into()]));
    assert_eq!(circle_through(&g, "d"), None);
}
