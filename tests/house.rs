//! The house: no module of a crate imports, directly or through others, a module that
//! imports it back. Dependencies are read from the sources (`crate::name` outside test
//! modules), so a circle introduced anywhere fails here naming its members.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module of the crate at `dir` and the sibling modules it names.
fn graph(dir: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![dir.join("src")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(dir.join("src")).unwrap();
            let top =
                rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
            if top == "bin" || top == "lib" || top == "main" {
                continue;
            }
            let src = std::fs::read_to_string(&p).unwrap();
            let src = src.split("#[cfg(test)]\nmod tests").next().unwrap();
            let deps = g.entry(top.clone()).or_default();
            for (i, _) in src.match_indices("crate::") {
                let name: String = src[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
                    .collect();
                if !name.is_empty() && name != top {
                    deps.insert(name);
                }
            }
        }
    }
    let known: BTreeSet<String> = g.keys().cloned().collect();
    for d in g.values_mut() {
        d.retain(|m| known.contains(m));
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
        for m in g.keys() {
            if let Some(c) = circle_through(&g, m) {
                circles.push(format!("{krate}: {} -> {m}", c.join(" -> ")));
            }
        }
    }
    assert!(circles.is_empty(), "import circles:\n{}", circles.join("\n"));
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
