//! The library's layers (docs/architecture.md): each top-level module of src/ may import only
//! modules of a LOWER layer (and itself). This test reads every file under src/ and fails, naming
//! the file, line and import, when a module imports from its own layer's neighbour or from above.

use std::path::{Path, PathBuf};

/// Bottom to top. A module may import modules of strictly lower rank; one rank, one module, so
/// that even neighbours (data and eval, bench and doctor) have a direction.
const LAYERS: &[&str] = &[
    "error",   // the error type
    "fsutil",  // atomic writes
    "testing", // test helpers (seeded data, rel_err, finite differences)
    "backend", // ops: CPU reference, GPU backend, devices, kernels' host side, NF4, NVTX
    "model",   // T5 and Llama: configs, loading, batches, forward, backward, generation
    "prompt",  // the prompt methods
    "engine",  // one step: method → backbone → loss → backward → method
    "data",    // tasks, readers, tokenising, batching (into model::batch::HostBatch)
    "eval",    // metrics and evaluation
    "config",  // the run config (TOML)
    "train",   // the trainer, checkpoints, reports, export
    "bench",   // efficiency measurements and the papers' claims
    "doctor",  // whole-step checks of a GPU backend against the CPU
];

/// The top-level modules that `src` (one line of Rust) names through `crate::`, in order.
/// Understands `crate::a::b`, `crate::{a::b, c}` and nested groups.
fn crate_imports(src: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = src;
    while let Some(at) = rest.find("crate::") {
        // `fastpt::crate::` cannot occur; skip matches inside a longer identifier (`mycrate::`).
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group: split at commas outside nested braces.
            let (mut depth, mut start) = (0usize, 0usize);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        found.extend(first_ident(&group[start..i]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.extend(first_ident(&group[start..i]));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            found.extend(first_ident(rest));
        }
    }
    found
}

fn first_ident(s: &str) -> Option<String> {
    let ident: String = s
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!ident.is_empty()).then_some(ident)
}

/// The source with comments removed (line comments and doc comments: a doc link to a higher
/// layer is not an import). Block comments are not used in this crate.
fn code_lines(src: &str) -> impl Iterator<Item = (usize, &str)> {
    src.lines().enumerate().filter_map(|(i, line)| {
        let code = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        (!code.trim().is_empty()).then_some((i + 1, code))
    })
}

/// The violations in one file of top-level module `module`: "file:line: imports X (layer ...)".
fn violations(file: &str, module: &str, src: &str) -> Vec<String> {
    let rank = |m: &str| LAYERS.iter().position(|&l| l == m);
    let Some(own) = rank(module) else {
        return vec![format!(
            "{file}: module `{module}` is not in tests/layers.rs's LAYERS; add it at its layer"
        )];
    };
    let mut out = Vec::new();
    // Multi-line `use crate::{...}` groups: join each statement onto one line first.
    let mut statement = String::new();
    let mut first_line = 0;
    for (line_no, code) in code_lines(src) {
        if statement.is_empty() {
            first_line = line_no;
        }
        statement.push_str(code);
        statement.push(' ');
        let open = statement.matches('{').count();
        let close = statement.matches('}').count();
        if statement.contains("crate::{") && open > close {
            continue; // the group goes on
        }
        for import in crate_imports(&statement) {
            match rank(&import) {
                Some(r) if r < own || import == module => {}
                Some(_) => out.push(format!(
                    "{file}:{first_line}: `{module}` imports `crate::{import}`, which is not below it"
                )),
                // Not a module (a crate-root re-export such as `crate::Result`).
                None => {}
            }
        }
        statement.clear();
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading src/") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_imports_from_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut problems = Vec::new();
    let mut checked = 0;
    for path in &files {
        let rel = path.strip_prefix(&src).expect("under src/");
        let first = rel.components().next().expect("a path").as_os_str();
        let module = first.to_string_lossy().trim_end_matches(".rs").to_string();
        // The crate root and the binary sit above every layer.
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(path).expect("reading a source file");
        problems.extend(violations(&rel.display().to_string(), &module, &text));
        checked += 1;
    }
    assert!(checked > 50, "only {checked} files under src/ were checked");
    assert!(
        problems.is_empty(),
        "{} upward import(s) (the layers, bottom to top: {}):\n{}",
        problems.len(),
        LAYERS.join(" → "),
        problems.join("\n")
    );
}

#[test]
fn every_top_level_module_has_a_layer() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("reading src/lib.rs");
    let modules: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';'))
        .collect();
    assert!(modules.len() >= 10, "src/lib.rs declares {modules:?}");
    for m in modules {
        assert!(
            LAYERS.contains(&m),
            "src/lib.rs declares `{m}`, which LAYERS lacks"
        );
    }
}

/// The checker itself: it must see imports in every form the crate writes them, and only those.
#[test]
fn the_checker_finds_upward_imports_in_every_form() {
    assert_eq!(crate_imports("use crate::model::t5::T5;"), ["model"]);
    assert_eq!(
        crate_imports("use crate::{backend::Backend, eval::{metrics::Metric, EvalMode}, Result};"),
        ["backend", "eval", "Result"]
    );
    assert_eq!(
        crate_imports("let x = crate::engine::step(a, mycrate::b);"),
        ["engine"]
    );
    // A backend file that imports the model (one line), the engine (a multi-line group), or a
    // neighbour of its own rank.
    let src = "use crate::error::Result;\n\
               use crate::model::nf4::Nf4Tensor;\n\
               use crate::{\n    backend::Backend,\n    engine::step,\n};\n\
               // crate::train in a comment is not an import\n\
               /// [`crate::bench`] in a doc link neither\n";
    let found = violations("backend/x.rs", "backend", src);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(found[0].starts_with("backend/x.rs:2: `backend` imports `crate::model`"));
    assert!(found[1].starts_with("backend/x.rs:3: `backend` imports `crate::engine`"));
    let found = violations("bench/x.rs", "bench", "use crate::doctor::check;");
    assert_eq!(
        found.len(),
        1,
        "bench and doctor share no direction: {found:#?}"
    );
    assert!(violations("doctor/x.rs", "doctor", "use crate::bench::Report;").is_empty());
    let found = violations("newmod.rs", "newmod", "");
    assert!(
        found[0].contains("not in tests/layers.rs's LAYERS"),
        "{found:#?}"
    );
}
