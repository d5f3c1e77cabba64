//! The crate's modules form layers, read top to bottom, and a module names only modules below
//! it: `cli → server → proxy → web → app → … → auth → revocation → store → config → paths`.
//! Names that several layers share live low (user-name rules with the account domain in
//! `auth`, the gateway's own URL paths in `paths`), so there is no arrow back up and no circle.
//! This test reads every `crate::…` path in `src/` (comments aside) and fails on an arrow that
//! points up or sideways, and on a module that has no place in the list yet.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every top-level module of the library, highest first. A module may name only modules after
/// it in this list.
const LAYERS: &[&str] = &[
    "cli",
    "backup",
    "healthcheck",
    "server",
    "proxy",
    "web",
    "acme",
    "app",
    "metrics",
    "oidc",
    "directory",
    "webhook",
    "mail",
    "probe",
    "telemetry",
    "tls",
    "systemd",
    "readiness",
    "datadir",
    "mediaserver",
    "auth",
    "revocation",
    "store",
    "config",
    "netaddr",
    "paths",
];

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// The text of a source file without its comments (line comments, doc comments and block
/// comments), so that a comment naming a module is not an arrow. String literals are kept: a
/// `//` inside one ends the line's text early, which can only hide an arrow, never invent one.
fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut depth = 0usize;
    while !rest.is_empty() {
        if depth > 0 {
            if let Some(r) = rest.strip_prefix("*/") {
                depth -= 1;
                rest = r;
            } else if let Some(r) = rest.strip_prefix("/*") {
                depth += 1;
                rest = r;
            } else {
                let c = rest.chars().next().unwrap();
                rest = &rest[c.len_utf8()..];
            }
        } else if let Some(r) = rest.strip_prefix("/*") {
            depth = 1;
            rest = r;
        } else if rest.starts_with("//") {
            let end = rest.find('\n').unwrap_or(rest.len());
            rest = &rest[end..];
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// The first segments of every `crate::…` path in `code`, groups included:
/// `crate::{app::{self, App}, auth}` names `app` and `auth`.
fn named_modules(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `mycrate::…`, not this crate
        }
        if let Some(group) = rest.strip_prefix('{') {
            // The top-level items of the group, up to its closing brace.
            let (mut depth, mut item) = (0usize, String::new());
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        names.insert(first_segment(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    item.push(c);
                }
            }
            names.insert(first_segment(&item));
        } else {
            names.insert(first_segment(rest));
        }
    }
    names.remove("");
    names
}

fn first_segment(s: &str) -> String {
    s.trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Every `.rs` file under `dir`, with the top-level module it belongs to.
fn files(dir: &Path, top: Option<&str>, out: &mut Vec<(String, std::path::PathBuf)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let module = top.map(str::to_string).unwrap_or(stem);
        if path.is_dir() {
            files(&path, Some(&module), out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push((module, path));
        }
    }
}

/// The modules `lib.rs` declares.
fn declared_modules() -> BTreeSet<String> {
    let lib = std::fs::read_to_string(format!("{SRC}/lib.rs")).unwrap();
    code_of(&lib)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';').to_string())
        .collect()
}

#[test]
fn every_module_names_only_modules_below_it() {
    let declared = declared_modules();
    let unplaced: Vec<&String> = declared
        .iter()
        .filter(|m| !LAYERS.contains(&m.as_str()))
        .collect();
    assert!(
        unplaced.is_empty(),
        "modules without a place in tests/it/layers.rs LAYERS: {unplaced:?}"
    );
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);

    let mut all = Vec::new();
    files(Path::new(SRC), None, &mut all);
    let mut arrows: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut wrong = Vec::new();
    for (module, path) in &all {
        let Some(from) = rank(module) else {
            continue; // lib.rs and main.rs: the root, which declares everything
        };
        let code = code_of(&std::fs::read_to_string(path).unwrap());
        for to in named_modules(&code) {
            if to == *module || !declared.contains(&to) {
                continue; // itself, or an item of the crate root
            }
            arrows.entry(module.clone()).or_default().insert(to.clone());
            if rank(&to).is_some_and(|t| t <= from) {
                let file = path.strip_prefix(SRC).unwrap().display().to_string();
                wrong.push(format!("src/{file}: {module} → {to}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "arrows that point up (or sideways) in the layering:\n{}",
        wrong.join("\n")
    );
    // The check sees the arrows it should: the proxy renders the pages, the app uses the store.
    assert!(arrows["proxy"].contains("web") && arrows["app"].contains("store"));
}

#[test]
fn the_reader_finds_arrows_in_every_form_and_none_in_comments() {
    let code = code_of(
        "use crate::app::App;\n\
         use crate::{auth::{self, cookie}, store};\n\
         /// see crate::cli\n\
         // crate::web\n\
         /* crate::server /* nested crate::proxy */ crate::tls */\n\
         let x = crate::paths::LOGIN_PATH; other_crate::metrics::X;\n",
    );
    let found: Vec<String> = named_modules(&code).into_iter().collect();
    assert_eq!(found, ["app", "auth", "paths", "store"]);
}
