//! The source tree's structure, checked so it stays true: every SQL statement lives in
//! `src/db/`, `config` imports nothing from the crate, and the modules depend on each other
//! top-down without a cycle (docs/architecture.md, the module table).
//!
//! These tests read `src/` as text. Cross-module paths in this crate are written `crate::…`
//! (`super::` stays inside a module), so scanning for `crate::` finds every dependency.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, top-down: a module may use modules of its own layer or below, never above, and
/// the uses within a layer must not form a cycle. A new top-level module must be placed here.
const LAYERS: [&[&str]; 10] = [
    &["main"],
    &["cli"],
    &["server", "tail"],
    &["http"],
    &[
        "hub",
        "listener",
        "sequencer",
        "revocation",
        "presence",
        "alert",
    ],
    &["socket"],
    &["db"],
    &["metrics", "activity"],
    &["event"],
    &["config", "backoff", "periodic"],
];

/// Upper-case words that start an SQL statement: a string literal that begins with one is SQL.
const STATEMENT_STARTS: [&str; 21] = [
    "SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "LISTEN", "UNLISTEN", "NOTIFY", "VACUUM",
    "TRUNCATE", "CREATE", "ALTER", "DROP", "GRANT", "REVOKE", "COPY", "ANALYZE", "SET", "BEGIN",
    "COMMIT", "ROLLBACK",
];
/// Clauses that make a literal SQL wherever they appear (the first word, then the second
/// later): fragments and statements glued to other text.
const CLAUSES: [(&str, &str); 4] = [
    ("SELECT", "FROM"),
    ("INSERT", "INTO"),
    ("DELETE", "FROM"),
    ("UPDATE", "SET"),
];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every file under `dir`, recursively, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn rust_files() -> Vec<PathBuf> {
    files(&src_dir())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect()
}

/// A path relative to `src/`, with `/` separators.
fn relative(path: &Path) -> String {
    path.strip_prefix(src_dir())
        .unwrap()
        .to_string_lossy()
        .replace('\\', "/")
}

/// A Rust source split into its string literals (with their line) and its code (comments and
/// literals removed, line breaks kept).
#[derive(Debug, Default)]
struct Lexed {
    strings: Vec<(usize, String)>,
    code: String,
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Splits Rust source into literals and code: line and nested block comments, strings with
/// escapes, raw strings (`r"…"`, `r#"…"#`, `br"…"`), and char literals told apart from
/// lifetimes (`'"'` is a char, `'a` a lifetime).
fn lex(source: &str) -> Lexed {
    let chars: Vec<char> = source.chars().collect();
    let mut out = Lexed::default();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '\n' {
            line += 1;
            out.code.push('\n');
            i += 1;
        } else if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if chars[i] == '\n' {
                        line += 1;
                        out.code.push('\n');
                    }
                    i += 1;
                }
            }
        } else if c == 'r' && raw_string_start(&chars, i).is_some() {
            let hashes = raw_string_start(&chars, i).unwrap();
            let start_line = line;
            i += 2 + hashes;
            let mut text = String::new();
            while i < chars.len() {
                if chars[i] == '"' && (0..hashes).all(|h| chars.get(i + 1 + h) == Some(&'#')) {
                    i += 1 + hashes;
                    break;
                }
                if chars[i] == '\n' {
                    line += 1;
                    out.code.push('\n');
                }
                text.push(chars[i]);
                i += 1;
            }
            out.strings.push((start_line, text));
        } else if c == '"' {
            let start_line = line;
            i += 1;
            let mut text = String::new();
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    text.push(chars[i]);
                    i += 1;
                }
                if let Some(&ch) = chars.get(i) {
                    if ch == '\n' {
                        line += 1;
                        out.code.push('\n');
                    }
                    text.push(ch);
                }
                i += 1;
            }
            i += 1;
            out.strings.push((start_line, text));
        } else if c == '\'' && next == Some('\\') {
            // An escaped char literal: '\n', '\'', '\u{1F600}'.
            i += 2;
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else if c == '\'' && chars.get(i + 2) == Some(&'\'') {
            i += 3;
        } else {
            out.code.push(c);
            i += 1;
        }
    }
    out
}

/// At a `r`: the number of `#` of the raw string it starts (`r"`, `r#"`, `br"`), if it starts
/// one (and is not the end of an identifier, nor a raw identifier like `r#type`).
fn raw_string_start(chars: &[char], i: usize) -> Option<usize> {
    let before = |k: usize| i.checked_sub(k).map(|j| chars[j]);
    let starts_token = match before(1) {
        None => true,
        Some('b') => !before(2).is_some_and(is_ident),
        Some(p) => !is_ident(p),
    };
    if !starts_token {
        return None;
    }
    let hashes = chars[i + 1..].iter().take_while(|c| **c == '#').count();
    (chars.get(i + 1 + hashes) == Some(&'"')).then_some(hashes)
}

/// Why `text` reads as SQL: the statement word it starts with, or the clause it contains
/// (words are whole and upper-case, so prose such as "the NOTIFY queue" is not SQL).
fn sql_keywords(text: &str) -> Vec<&'static str> {
    let words: Vec<&str> = text
        .split(|c: char| !is_ident(c))
        .filter(|w| !w.is_empty())
        .collect();
    let mut found: Vec<&'static str> = STATEMENT_STARTS
        .iter()
        .copied()
        .filter(|k| words.first() == Some(k))
        .collect();
    for (first, then) in CLAUSES {
        let at = words.iter().position(|w| *w == first);
        if at.is_some_and(|at| words[at + 1..].contains(&then)) && !found.contains(&first) {
            found.push(first);
        }
    }
    found
}

/// The string literals of `source` that look like SQL: (line, keywords, excerpt).
fn sql_literals(source: &str) -> Vec<(usize, Vec<&'static str>, String)> {
    lex(source)
        .strings
        .into_iter()
        .filter_map(|(line, text)| {
            let found = sql_keywords(&text);
            let excerpt: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
            let excerpt: String = excerpt.chars().take(80).collect();
            (!found.is_empty()).then_some((line, found, excerpt))
        })
        .collect()
}

/// The top-level module a file belongs to (`src/http/ws.rs` → `http`), or `None` for the
/// crate root `src/lib.rs`.
fn module_of(relative: &str) -> Option<String> {
    if relative == "lib.rs" {
        return None;
    }
    let first = relative.split('/').next().unwrap();
    Some(first.trim_end_matches(".rs").to_owned())
}

/// The top-level modules `code` refers to through `prefix` (`crate::` in the library,
/// `orderpush::` in the binary).
fn references(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let preceded_by_ident = rest[..at].chars().next_back().is_some_and(is_ident);
        let after = &rest[at + prefix.len()..];
        let name: String = after.chars().take_while(|c| is_ident(*c)).collect();
        if !preceded_by_ident && !name.is_empty() {
            found.insert(name);
        }
        rest = after;
    }
    found
}

/// Which top-level module uses which, from the whole of `src/`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in rust_files() {
        let rel = relative(&path);
        let Some(module) = module_of(&rel) else {
            continue;
        };
        let code = lex(&std::fs::read_to_string(&path).unwrap()).code;
        let prefix = if module == "main" {
            "orderpush::"
        } else {
            "crate::"
        };
        let uses = graph.entry(module.clone()).or_default();
        uses.extend(
            references(&code, prefix)
                .into_iter()
                .filter(|m| *m != module),
        );
    }
    graph
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// A cycle in `graph`, as the modules along it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn sql_lives_only_in_db() {
    let mut outside = Vec::new();
    for path in files(&src_dir()) {
        let rel = relative(&path);
        if rel.starts_with("db/") {
            continue;
        }
        if path.extension().is_some_and(|e| e == "sql") {
            outside.push(format!("{rel}: an SQL file outside src/db/"));
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        for (line, keywords, excerpt) in sql_literals(&std::fs::read_to_string(&path).unwrap()) {
            outside.push(format!("{rel}:{line}: {keywords:?} in \"{excerpt}\""));
        }
    }
    assert!(
        outside.is_empty(),
        "SQL belongs in src/db/ (a function there, called from here):\n{}",
        outside.join("\n")
    );
}

#[test]
fn config_imports_nothing_from_the_crate() {
    let graph = module_graph();
    let uses = graph.get("config").expect("src/config.rs exists");
    assert!(
        uses.is_empty(),
        "config is read by every module and must import none of them (defaults belong in \
         config.rs); it uses: {uses:?}"
    );
}

#[test]
fn modules_depend_top_down_without_cycles() {
    let graph = module_graph();
    let mut problems = Vec::new();
    for (module, uses) in &graph {
        let Some(layer) = layer_of(module) else {
            problems.push(format!(
                "src/{module}: a top-level module missing from LAYERS in tests/structure.rs"
            ));
            continue;
        };
        for used in uses {
            match layer_of(used) {
                None if graph.contains_key(used) => {}
                None => problems.push(format!("{module} uses crate::{used}, which is no module")),
                Some(l) if l < layer => problems.push(format!(
                    "{module} uses {used}, a module of a layer above it"
                )),
                Some(_) => {}
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "the modules use each other in a cycle: {}",
            cycle.join(" → ")
        );
    }
}

#[test]
fn the_scanners_see_through_comments_literals_and_lifetimes() {
    let source = r####"
        // SELECT in a comment is no statement
        /* nor DELETE in /* a nested */ block comment */
        fn f<'a>(x: &'a str) -> char {
            let quote = '"'; let esc = '\''; let r#type = 1;
            let _ = "ORDERPUSH_LISTEN and LISTEN_BACKLOG are names, and 'select' prose";
            let _ = "Postgres's NOTIFY queue, and a DELETE that is prose";
            let _ = br"raw bytes";
            let _ = r#"UPDATE t SET "x" = 1"#;
            let _ = "escaped \" quote, then INSERT INTO t";
            crate::db::connect(); crate::config::X; not_crate::hub::Y;
            quote
        }
    "####;
    let lines: Vec<(usize, Vec<&str>)> = sql_literals(source)
        .into_iter()
        .map(|(line, keywords, _)| (line, keywords))
        .collect();
    assert_eq!(lines, vec![(9, vec!["UPDATE"]), (10, vec!["INSERT"])]);
    let code = lex(source).code;
    assert!(
        !code.contains("SELECT") && !code.contains("DELETE"),
        "{code}"
    );
    assert_eq!(
        references(&code, "crate::"),
        BTreeSet::from(["config".to_owned(), "db".to_owned()])
    );

    let cyclic = BTreeMap::from([
        ("a".to_owned(), BTreeSet::from(["b".to_owned()])),
        ("b".to_owned(), BTreeSet::from(["c".to_owned()])),
        ("c".to_owned(), BTreeSet::from(["a".to_owned()])),
    ]);
    assert_eq!(
        find_cycle(&cyclic),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let acyclic = BTreeMap::from([
        (
            "a".to_owned(),
            BTreeSet::from(["b".to_owned(), "c".to_owned()]),
        ),
        ("b".to_owned(), BTreeSet::from(["c".to_owned()])),
    ]);
    assert_eq!(find_cycle(&acyclic), None);
}
