//! Host-side helper for the example guests in `src/bin/`: [`wasm_path`] returns the
//! path of a built guest module, building all of them first when they are missing or
//! older than their sources.
//!
//! The guests themselves are compiled for `wasm32-wasip1`, and this library is compiled
//! for that target too (every bin of a package links its lib), so everything here is
//! cfg'd to the host.

#[cfg(not(target_family = "wasm"))]
mod host {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::OnceLock;
    use std::time::SystemTime;

    /// The target the guests are built for.
    pub const TARGET: &str = "wasm32-wasip1";

    /// Directory of this package's sources.
    fn package_dir() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
    }

    /// `<workspace>/target/guests`: a target dir of its own, so building the guests
    /// never waits on (or invalidates) the host build's lock and artifacts.
    pub fn guests_target_dir() -> PathBuf {
        package_dir()
            .parent()
            .unwrap_or_else(|| package_dir())
            .join("target")
            .join("guests")
    }

    /// Where cargo puts the built modules.
    pub fn out_dir() -> PathBuf {
        guests_target_dir().join(TARGET).join("release")
    }

    /// Names of the guests: the files in `src/bin/`.
    fn guest_names() -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(package_dir().join("src").join("bin")) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let path = e.path();
                if path.extension()? != "rs" {
                    return None;
                }
                path.file_stem()?.to_str().map(String::from)
            })
            .collect()
    }

    fn modified(path: &Path) -> Option<SystemTime> {
        std::fs::metadata(path).and_then(|m| m.modified()).ok()
    }

    /// True when every guest exists and is at least as new as what it is built from:
    /// its own `src/bin/NAME.rs`, the package's `src/lib.rs` and `Cargo.toml`. (Cargo
    /// rebuilds only the bins whose inputs changed, so each bin is compared with its
    /// own inputs, not with the newest source of the package.)
    fn up_to_date() -> bool {
        let dir = package_dir();
        let shared = [dir.join("Cargo.toml"), dir.join("src").join("lib.rs")];
        let names = guest_names();
        !names.is_empty()
            && names.iter().all(|name| {
                let source = dir.join("src").join("bin").join(format!("{name}.rs"));
                let newest_input = shared
                    .iter()
                    .chain([&source])
                    .filter_map(|p| modified(p))
                    .max();
                let built = modified(&out_dir().join(format!("{name}.wasm")));
                matches!((built, newest_input), (Some(built), Some(input)) if built >= input)
            })
    }

    /// Runs the cargo build of all guests. Cargo's own lock on the target dir makes
    /// concurrent callers (several test binaries at once) safe.
    fn build() -> Result<(), String> {
        // Use the cargo that runs us (tests), so the toolchain matches.
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let manifest = package_dir().join("Cargo.toml");
        let output = Command::new(&cargo)
            .args([
                "build",
                "--release",
                "--target",
                TARGET,
                "-p",
                "agora-guest-examples",
            ])
            .arg("--manifest-path")
            .arg(&manifest)
            .arg("--target-dir")
            .arg(guests_target_dir())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", Path::new(&cargo).display()))?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(format!(
            "building the guest examples failed ({}):\n{stderr}\n\
             hint: if the {TARGET} target is missing, run `rustup target add {TARGET}` \
             (scripts/build-guests.sh does that and the build)",
            output.status
        ))
    }

    /// Path of the built guest module `name` (a file in `src/bin/`, without `.rs`),
    /// e.g. `target/guests/wasm32-wasip1/release/hello.wasm`.
    ///
    /// The first call in a process builds the guests when any is missing or older than
    /// its sources; later calls reuse that outcome.
    ///
    /// # Panics
    /// When the build fails (the message says why, with a hint about the target) or
    /// when there is no guest of that name.
    pub fn wasm_path(name: &str) -> PathBuf {
        static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
        let built = BUILT.get_or_init(|| if up_to_date() { Ok(()) } else { build() });
        if let Err(e) = built {
            panic!("{e}");
        }
        let path = out_dir().join(format!("{name}.wasm"));
        assert!(
            path.is_file(),
            "no guest example named {name:?} (expected {}); guests: {:?}",
            path.display(),
            guest_names()
        );
        path
    }

    /// Target of the component guests (`guest-examples/<name>/`, crates of their own).
    pub const COMPONENT_TARGET: &str = "wasm32-wasip2";

    /// Path of the component guest `name` (a directory beside `src/`, e.g.
    /// `hello-http`), built for wasm32-wasip2 into
    /// `target/guests/wasm32-wasip2/release/<name with _>.wasm`, as
    /// scripts/build-guests.sh does. The first call per name in a process runs the
    /// cargo build (cargo decides what is stale; a no-op takes well under a second).
    ///
    /// # Panics
    /// When the build fails; the message says why, with a hint about the target.
    pub fn component_path(name: &str) -> PathBuf {
        static BUILT: OnceLock<std::sync::Mutex<HashMap<String, Result<PathBuf, String>>>> =
            OnceLock::new();
        let mut built = BUILT
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = built
            .entry(name.to_string())
            .or_insert_with(|| build_component(name));
        match result {
            Ok(path) => path.clone(),
            Err(e) => panic!("{e}"),
        }
    }

    fn build_component(name: &str) -> Result<PathBuf, String> {
        let manifest = package_dir().join(name).join("Cargo.toml");
        if !manifest.is_file() {
            return Err(format!(
                "no component guest named {name:?} (expected {})",
                manifest.display()
            ));
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let output = Command::new(&cargo)
            .args(["build", "--release", "--target", COMPONENT_TARGET])
            .arg("--manifest-path")
            .arg(&manifest)
            .arg("--target-dir")
            .arg(guests_target_dir())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", Path::new(&cargo).display()))?;
        if !output.status.success() {
            return Err(format!(
                "building the {name} component failed ({}):\n{}\n\
                 hint: if the {COMPONENT_TARGET} target is missing, run `rustup target add \
                 {COMPONENT_TARGET}` (scripts/build-guests.sh does that and the build)",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(guests_target_dir()
            .join(COMPONENT_TARGET)
            .join("release")
            .join(format!("{}.wasm", name.replace('-', "_"))))
    }
}

#[cfg(not(target_family = "wasm"))]
pub use host::{component_path, out_dir, wasm_path, COMPONENT_TARGET, TARGET};
