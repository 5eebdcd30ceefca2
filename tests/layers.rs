//! The crate's layers (see `ARCHITECTURE.md`): no module imports a module above it.
//!
//! Every source file of the library belongs to one module, and every module has a rank; a file
//! may name (`crate::…`, in a `use` or in code) its own module and modules of lower rank only.
//! Modules of equal rank do not name each other. Comments are not read: a doc link may point
//! anywhere.

use std::{collections::BTreeSet, fs, path::Path};

/// The modules, bottom first. The rank is the index of the row.
const LAYERS: &[&[&str]] = &[
    // Foundations: values and encodings that know nothing of the network.
    &["identity", "metadata", "status", "codec", "trace"],
    // How calls are framed on a stream.
    &["transport"],
    // Policy: rules, grants, certificates, decisions. Pure: no network.
    &["auth"],
    // The node: the swarm, its event loop and handle; components plug into it.
    &["node"],
    // Components that speak their own protocols over the node.
    &["registry", "store", "broker", "auth::exchange", "debug"],
    // The selector; the configuration, whose mesh layer lives in the store.
    &["selector", "config"],
    &["client"],
    &["server"],
    // Composition: the crate-wide error, and the service that wires every component.
    &["error"],
    &["service"],
    &["testing", "lib"],
];

/// Names the crate root re-exports, and the module each comes from.
const REEXPORTS: &[(&str, &str)] = &[
    ("Service", "service"),
    ("Client", "client"),
    ("Context", "server"),
    ("Status", "status"),
    ("Error", "error"),
    ("Identity", "identity"),
    ("Metadata", "metadata"),
];

fn rank(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|row| row.contains(&module))
        .unwrap_or_else(|| panic!("module {module} has no layer: add it to LAYERS"))
}

/// The module a file under `src/` belongs to.
fn module_of(relative: &str) -> Option<String> {
    if relative.starts_with("bin/") || relative == "test_vectors.rs" {
        return None; // the CLI is a program of its own; the test vectors are test code
    }
    if relative == "auth/exchange.rs" {
        return Some("auth::exchange".into());
    }
    let first = relative.split('/').next()?;
    Some(first.trim_end_matches(".rs").to_owned())
}

/// The code of a file without comments and without its `#[cfg(test)]` module (tests may use
/// anything).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The crate modules a piece of code names.
fn named_modules(code: &str) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::b, C, d::{...}}`: the first segment of each item.
            let mut depth = 0;
            let mut item_start = true;
            let mut current = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphanumeric() || c == '_') => current.push(c),
                    c if item_start && !current.is_empty() && !c.is_whitespace() => {
                        named.insert(std::mem::take(&mut current));
                        item_start = false;
                    }
                    _ => {}
                }
                if item_start && c == ',' && !current.is_empty() {
                    named.insert(std::mem::take(&mut current));
                }
            }
            if !current.is_empty() {
                named.insert(current);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if name == "auth" && rest.starts_with("auth::exchange") {
                named.insert("auth::exchange".to_owned());
            } else {
                named.insert(name);
            }
        }
    }
    named
        .into_iter()
        .filter_map(|name| {
            if name.chars().next().is_some_and(char::is_uppercase) {
                REEXPORTS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, m)| (*m).to_owned())
            } else {
                Some(name)
            }
        })
        .collect()
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_imports_a_module_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut violations = Vec::new();
    for path in all {
        let relative = path
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let Some(module) = module_of(&relative) else {
            continue;
        };
        let own = rank(&module);
        let code = code(&fs::read_to_string(&path).unwrap());
        for named in named_modules(&code) {
            if named == module || module.starts_with(&format!("{named}::")) {
                continue;
            }
            if !LAYERS.iter().any(|row| row.contains(&named.as_str())) {
                continue; // not a module: a macro, `crate::Multiaddr`, …
            }
            if rank(&named) >= own {
                violations.push(format!("src/{relative} ({module}) names {named}"));
            }
        }
        // Inside the auth module, the exchange is named without `crate::`.
        if module == "auth" && code.contains("exchange::") {
            violations.push(format!("src/{relative} (auth) names auth::exchange"));
        }
    }
    assert!(
        violations.is_empty(),
        "upward imports (see ARCHITECTURE.md):\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_reads_grouped_imports() {
    let named = named_modules(
        "use crate::{\n    Metadata, PeerId,\n    codec::{self, Codec},\n    node::{self, Node},\n};\nlet x = crate::store::Store::new();",
    );
    let named: Vec<&str> = named.iter().map(String::as_str).collect();
    assert_eq!(named, ["codec", "metadata", "node", "store"]);
}
