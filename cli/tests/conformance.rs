//! WASI preview 1 conformance: every case of the wasi-testsuite C and AssemblyScript
//! suites (see shared/conformance/README.md) runs as an ordinary job through one
//! running cluster, via `agora run`, and must pass.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unreachable,
    reason = "a test: a panic is how it fails"
)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::{code, stderr, stdout, Cluster};

const SUITES: &[&str] = &["c", "assemblyscript"];

/// One case: `NAME.wasm` and what its `NAME.json` says (defaults when absent).
struct Case {
    name: String,
    dir: PathBuf,
    wasm: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    root: Option<PathBuf>,
    exit_code: i32,
    stdout: Option<String>,
}

fn load_case(suite: &str, wasm: &Path) -> Case {
    let dir = wasm.parent().expect("case folder").to_path_buf();
    let stem = wasm
        .file_stem()
        .expect("case name")
        .to_string_lossy()
        .into_owned();
    let json_path = wasm.with_extension("json");
    let spec: serde_json::Value = if json_path.exists() {
        let text = std::fs::read_to_string(&json_path)
            .unwrap_or_else(|e| panic!("{}: {e}", json_path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", json_path.display()))
    } else {
        serde_json::json!({})
    };
    let args = spec
        .get("args")
        .and_then(|a| a.as_array())
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().expect("args are strings").to_string())
                .collect()
        })
        .unwrap_or_default();
    let env = spec
        .get("env")
        .and_then(|e| e.as_object())
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str().expect("env values are strings").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let root = spec
        .get("root")
        .and_then(|r| r.as_str())
        .map(|r| dir.join(r));
    let exit_code = spec.get("exit_code").and_then(|c| c.as_i64()).unwrap_or(0) as i32;
    let stdout = spec
        .get("stdout")
        .and_then(|s| s.as_str())
        .map(str::to_string);
    Case {
        name: format!("{suite}/{stem}"),
        dir,
        wasm: wasm.to_path_buf(),
        args,
        env,
        root,
        exit_code,
        stdout,
    }
}

fn is_cleanup(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "cleanup")
}

/// Deletes `*.cleanup` files a previous run left in the case's folder (best effort:
/// the shared tree may be read-only, and the copy below skips them anyway).
fn remove_cleanup_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            remove_cleanup_files(&p);
        } else if is_cleanup(&p) {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// Copies `src`'s contents into `dst` (which exists), leaving out `*.cleanup` files.
fn copy_tree(src: &Path, dst: &Path) {
    for e in std::fs::read_dir(src).unwrap_or_else(|e| panic!("{}: {e}", src.display())) {
        let e = e.expect("dir entry");
        let (from, to) = (e.path(), dst.join(e.file_name()));
        let ft = e.file_type().expect("file type");
        if ft.is_dir() {
            std::fs::create_dir(&to).expect("mkdir");
            copy_tree(&from, &to);
        } else if !is_cleanup(&from) {
            std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
        }
    }
}

struct Failure {
    name: String,
    expected: i32,
    actual: i32,
    detail: String,
    stderr: String,
}

fn run_case(cluster: &Cluster, case: &Case) -> Result<(), Failure> {
    remove_cleanup_files(&case.dir);
    // A fresh copy of the root per case: cases must not see each other's files.
    let root_copy = tempfile::tempdir().expect("tempdir");
    let config = cluster.config.to_string_lossy().into_owned();
    let mut args: Vec<String> = vec![
        "run".into(),
        "--config".into(),
        config,
        "--timeout".into(),
        "60s".into(),
    ];
    for (k, v) in &case.env {
        args.push("--env".into());
        args.push(format!("{k}={v}"));
    }
    if let Some(root) = &case.root {
        copy_tree(root, root_copy.path());
        args.push("--input".into());
        args.push(format!("{}:/", root_copy.path().display()));
    } else {
        // No root: the guest gets no filesystem, as `wasmtime run` without --dir.
        args.push("--no-fs".into());
    }
    args.push(case.wasm.to_string_lossy().into_owned());
    args.push("--".into());
    args.extend(case.args.iter().cloned());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();

    let out = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cluster.agora(&argv)))
    {
        Ok(out) => out,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            return Err(Failure {
                name: case.name.clone(),
                expected: case.exit_code,
                actual: -1,
                detail: format!("agora run did not complete: {msg}"),
                stderr: String::new(),
            });
        }
    };
    let actual = code(&out);
    let mut problems = Vec::new();
    if actual != case.exit_code {
        problems.push("wrong exit code".to_string());
    }
    if let Some(want) = &case.stdout {
        let got = stdout(&out);
        if &got != want {
            problems.push(format!("stdout {got:?}, expected {want:?}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Failure {
            name: case.name.clone(),
            expected: case.exit_code,
            actual,
            detail: problems.join("; "),
            stderr: stderr(&out),
        })
    }
}

#[test]
fn wasi_testsuite_passes_through_the_cluster() {
    let base =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/wasi-testsuite/tests");
    if !base.is_dir() {
        println!(
            "conformance: skipped, no suite at {} (shared/ is not checked out beside the repo)",
            base.display()
        );
        return;
    }
    let mut cases = Vec::new();
    for suite in SUITES {
        let dir = base.join(suite).join("testsuite/wasm32-wasip1");
        let mut wasms: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
            .collect();
        wasms.sort();
        cases.extend(wasms.iter().map(|w| load_case(suite, w)));
    }
    assert!(!cases.is_empty(), "no cases found under {}", base.display());

    let started = Instant::now();
    let cluster = Cluster::start();
    let mut failures = Vec::new();
    for case in &cases {
        let t = Instant::now();
        let result = run_case(&cluster, case);
        println!(
            "{:<50} {} ({} ms)",
            case.name,
            if result.is_ok() { "ok" } else { "FAILED" },
            t.elapsed().as_millis()
        );
        if let Err(f) = result {
            failures.push(f);
        }
    }
    drop(cluster);

    let passed = cases.len() - failures.len();
    println!("conformance: {passed} passed, {} failed", failures.len());
    for f in &failures {
        println!(
            "--- {}: expected exit code {}, got {} ({})",
            f.name, f.expected, f.actual, f.detail
        );
        for line in f.stderr.lines() {
            println!("    {line}");
        }
    }
    println!("conformance: took {:.1} s", started.elapsed().as_secs_f64());
    assert!(
        failures.is_empty(),
        "{} of {} conformance cases failed",
        failures.len(),
        cases.len()
    );
}
