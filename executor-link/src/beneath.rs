//! Opening and creating files inside a sandbox without following a symlink out of
//! it: what the agent and the executors use for every path a task or a framework
//! names (sandbox reads for `agora logs`, inputs placed before a task starts, a
//! task's stdout and stderr files).
//!
//! Paths are resolved with `openat2(2)` and `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`
//! from a descriptor of the sandbox: an absolute symlink, a `..` that climbs out, or
//! a `/proc` magic link fails (EXDEV or ELOOP) instead of being followed. Kernels
//! without openat2 (before 5.6, or where seccomp hides it: ENOSYS) get a walk of
//! one component at a time with `O_NOFOLLOW`, which refuses every symlink.
//!
//! Errors are [`BeneathError`]s that name the path as the caller gave it.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Why a path inside a sandbox could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BeneathError {
    /// The path names something outside the directory (absolute, `..`, empty).
    #[error("`{path}` is not a path inside the sandbox ({why})")]
    BadPath { path: String, why: &'static str },
    /// A symlink on the way leads out of the directory (or is refused outright on
    /// kernels without openat2).
    #[error("`{path}` is a symlink (or passes through one) that {why}; refusing to follow it")]
    Escapes { path: String, why: &'static str },
    /// Not a regular file (a fifo, a device, a directory) where a file was wanted.
    #[error("`{path}` is not a regular file")]
    NotAFile { path: String },
    #[error("cannot {what} `{path}`: {cause}")]
    Io {
        what: &'static str,
        path: String,
        cause: io::Error,
    },
}

impl BeneathError {
    /// The underlying I/O error kind, where there is one (NotFound tells a missing
    /// file from a refused one).
    pub fn kind(&self) -> Option<io::ErrorKind> {
        match self {
            BeneathError::Io { cause, .. } => Some(cause.kind()),
            _ => None,
        }
    }
}

/// Checks that `rel` is a relative path of normal components (no `/` at the start,
/// no `..`, not empty): the rule for every sandbox path a framework names.
pub fn check_relative(rel: &str) -> Result<(), BeneathError> {
    let bad = |why| {
        Err(BeneathError::BadPath {
            path: rel.to_string(),
            why,
        })
    };
    if rel.is_empty() {
        return bad("it is empty");
    }
    if rel.starts_with('/') {
        return bad("it is absolute");
    }
    if rel.contains('\0') {
        return bad("it holds a NUL byte");
    }
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return bad("it contains `..`"),
            Component::RootDir | Component::Prefix(_) => return bad("it is absolute"),
        }
    }
    Ok(())
}

/// A directory (a sandbox) that paths are resolved beneath.
#[derive(Debug)]
pub struct Beneath {
    dir: OwnedFd,
    shown: PathBuf,
}

static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
}

impl Beneath {
    /// Opens the directory `dir` itself (the caller's own path: a symlink as its
    /// last component is refused all the same).
    pub fn open(dir: &Path) -> Result<Beneath, BeneathError> {
        let c = cstr(dir).map_err(|cause| BeneathError::Io {
            what: "open",
            path: dir.display().to_string(),
            cause,
        })?;
        // SAFETY: open(2) on a valid C string.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_RDONLY,
            )
        };
        if fd < 0 {
            return Err(BeneathError::Io {
                what: "open the directory",
                path: dir.display().to_string(),
                cause: io::Error::last_os_error(),
            });
        }
        Ok(Beneath {
            // SAFETY: a fresh descriptor owned by nobody else.
            dir: unsafe { OwnedFd::from_raw_fd(fd) },
            shown: dir.to_path_buf(),
        })
    }

    /// The directory's own descriptor.
    pub fn fd(&self) -> RawFd {
        self.dir.as_raw_fd()
    }

    /// The directory's path, as given to [`Beneath::open`].
    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// Opens `rel` (relative, no `..`) beneath the directory with `flags` (O_CLOEXEC
    /// is added) and `mode` for a file it creates.
    pub fn open_file(&self, rel: &str, flags: i32, mode: u32) -> Result<File, BeneathError> {
        check_relative(rel)?;
        let fd = resolve(self.dir.as_raw_fd(), Path::new(rel), flags, mode)
            .map_err(|cause| classify(rel, "open", cause))?;
        // SAFETY: a fresh descriptor owned by nobody else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Opens an existing regular file for reading. Fifos and devices are refused
    /// without blocking (opened with O_NONBLOCK, checked with fstat).
    pub fn open_read(&self, rel: &str) -> Result<File, BeneathError> {
        let f = self.open_file(rel, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0)?;
        let meta = f.metadata().map_err(|cause| BeneathError::Io {
            what: "inspect",
            path: rel.to_string(),
            cause,
        })?;
        if !meta.is_file() {
            return Err(BeneathError::NotAFile {
                path: rel.to_string(),
            });
        }
        // Back to blocking reads.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
        Ok(f)
    }

    /// Creates (or truncates) the regular file `rel` for writing; its last component
    /// may not be a symlink, and nothing on the way may lead out.
    pub fn create(&self, rel: &str, mode: u32) -> Result<File, BeneathError> {
        self.open_file(
            rel,
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_NOCTTY,
            mode,
        )
    }

    /// Creates the directory `rel` and its missing parents, each beneath the
    /// directory (an existing component that is a symlink leading out fails).
    pub fn create_dir_all(&self, rel: &str, mode: u32) -> Result<(), BeneathError> {
        check_relative(rel)?;
        let mut sofar = PathBuf::new();
        for c in Path::new(rel).components() {
            let Component::Normal(name) = c else { continue };
            sofar.push(name);
            let parent = match sofar.parent() {
                Some(p) if !p.as_os_str().is_empty() => Some(
                    resolve(
                        self.dir.as_raw_fd(),
                        p,
                        libc::O_DIRECTORY | libc::O_RDONLY,
                        0,
                    )
                    .map_err(|cause| classify(rel, "open", cause))?,
                ),
                _ => None,
            };
            let pfd = parent.unwrap_or(self.dir.as_raw_fd());
            let cname = cstr(Path::new(name)).map_err(|cause| classify(rel, "create", cause))?;
            // SAFETY: mkdirat on a valid descriptor and C string.
            let r = unsafe { libc::mkdirat(pfd, cname.as_ptr(), mode as libc::mode_t) };
            let err = (r != 0).then(io::Error::last_os_error);
            if let Some(fd) = parent {
                // SAFETY: a descriptor `resolve` gave us and nobody else holds.
                unsafe { libc::close(fd) };
            }
            match err {
                None => {}
                Some(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // It must be a directory beneath us (not a symlink out).
                    let fd = resolve(
                        self.dir.as_raw_fd(),
                        &sofar,
                        libc::O_DIRECTORY | libc::O_RDONLY,
                        0,
                    )
                    .map_err(|cause| classify(rel, "open", cause))?;
                    // SAFETY: as above.
                    unsafe { libc::close(fd) };
                }
                Some(e) => return Err(classify(rel, "create", e)),
            }
        }
        Ok(())
    }
}

/// Turns the errors that mean "a symlink leads out" into [`BeneathError::Escapes`].
fn classify(rel: &str, what: &'static str, cause: io::Error) -> BeneathError {
    match cause.raw_os_error() {
        Some(libc::EXDEV) => BeneathError::Escapes {
            path: rel.to_string(),
            why: "leads out of the sandbox",
        },
        Some(libc::ELOOP) => BeneathError::Escapes {
            path: rel.to_string(),
            why: if NO_OPENAT2.load(Ordering::Relaxed) {
                "may not be followed (this kernel has no openat2, so no symlink is)"
            } else {
                "is a /proc magic link or loops"
            },
        },
        _ => BeneathError::Io {
            what,
            path: rel.to_string(),
            cause,
        },
    }
}

/// openat2 beneath `dir`, or the O_NOFOLLOW walk where the kernel has no openat2.
fn resolve(dir: RawFd, rel: &Path, flags: i32, mode: u32) -> io::Result<RawFd> {
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        match openat2_beneath(dir, rel, flags, mode) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                NO_OPENAT2.store(true, Ordering::Relaxed);
                tracing::warn!("openat2 is not available (ENOSYS): sandbox paths are resolved one component at a time with O_NOFOLLOW, refusing every symlink");
            }
            other => return other,
        }
    }
    walk_nofollow(dir, rel, flags, mode)
}

fn openat2_beneath(dir: RawFd, rel: &Path, flags: i32, mode: u32) -> io::Result<RawFd> {
    let c = cstr(rel)?;
    // SAFETY: open_how is plain data; zeroed is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & libc::O_CREAT != 0 {
        mode as u64
    } else {
        0
    };
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 with a valid descriptor, C string and open_how of its size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd as RawFd)
}

/// One component at a time, every one opened with O_NOFOLLOW.
pub(crate) fn walk_nofollow(dir: RawFd, rel: &Path, flags: i32, mode: u32) -> io::Result<RawFd> {
    let names: Vec<&std::ffi::OsStr> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(Ok(n)),
            Component::CurDir => None,
            _ => Some(Err(io::Error::from_raw_os_error(libc::EXDEV))),
        })
        .collect::<io::Result<_>>()?;
    let Some((last, parents)) = names.split_last() else {
        // "." : the directory itself.
        // SAFETY: dup of a valid descriptor.
        let fd = unsafe { libc::fcntl(dir, libc::F_DUPFD_CLOEXEC, 0) };
        return if fd < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(fd)
        };
    };
    let mut cur: Option<OwnedFd> = None;
    for name in parents {
        let c = cstr(Path::new(name))?;
        let at = cur.as_ref().map_or(dir, |f| f.as_raw_fd());
        // SAFETY: openat on a valid descriptor and C string.
        let fd = unsafe {
            libc::openat(
                at,
                c.as_ptr(),
                libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_RDONLY,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor.
        cur = Some(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let c = cstr(Path::new(last))?;
    let at = cur.as_ref().map_or(dir, |f| f.as_raw_fd());
    // SAFETY: openat on a valid descriptor and C string.
    let fd = unsafe {
        libc::openat(
            at,
            c.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::symlink;

    fn setup() -> (tempfile::TempDir, Beneath) {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("box/fs/sub")).unwrap();
        std::fs::write(t.path().join("box/stdout"), "mine").unwrap();
        std::fs::write(t.path().join("secret"), "outside").unwrap();
        let b = Beneath::open(&t.path().join("box")).unwrap();
        (t, b)
    }

    fn read(b: &Beneath, rel: &str) -> Result<String, BeneathError> {
        let mut s = String::new();
        b.open_read(rel)?.read_to_string(&mut s).unwrap();
        Ok(s)
    }

    #[test]
    fn symlinks_out_are_refused_and_inside_ones_followed() {
        let (t, b) = setup();
        assert_eq!(read(&b, "stdout").unwrap(), "mine");
        symlink(t.path().join("secret"), t.path().join("box/abs")).unwrap();
        symlink("../secret", t.path().join("box/up")).unwrap();
        symlink("/proc/self/root/etc/hostname", t.path().join("box/magic")).unwrap();
        for bad in ["abs", "up", "magic"] {
            let e = read(&b, bad).unwrap_err();
            assert!(matches!(e, BeneathError::Escapes { .. }), "{bad}: {e}");
            assert!(e.to_string().contains(&format!("`{bad}`")), "{e}");
        }
        for bad in ["/etc/passwd", "../secret", "fs/../../secret", ""] {
            let e = read(&b, bad).unwrap_err();
            assert!(matches!(e, BeneathError::BadPath { .. }), "{bad}: {e}");
        }
        symlink("stdout", t.path().join("box/inner")).unwrap();
        assert_eq!(read(&b, "inner").unwrap(), "mine");
    }

    #[test]
    fn the_walk_refuses_every_symlink() {
        let (t, b) = setup();
        symlink("../secret", t.path().join("box/up")).unwrap();
        symlink("fs", t.path().join("box/fslink")).unwrap();
        let e = walk_nofollow(b.dir.as_raw_fd(), Path::new("up"), libc::O_RDONLY, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        let e = walk_nofollow(
            b.dir.as_raw_fd(),
            Path::new("fslink/sub"),
            libc::O_RDONLY,
            0,
        )
        .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR));
        let fd = walk_nofollow(b.dir.as_raw_fd(), Path::new("fs/sub"), libc::O_RDONLY, 0).unwrap();
        unsafe { libc::close(fd) };
    }

    #[test]
    fn fifos_are_refused_without_blocking() {
        let (t, b) = setup();
        let p = CString::new(t.path().join("box/fifo").as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(p.as_ptr(), 0o600) }, 0);
        let e = b.open_read("fifo").unwrap_err();
        assert!(matches!(e, BeneathError::NotAFile { .. }), "{e}");
    }

    #[test]
    fn create_does_not_write_through_a_planted_symlink() {
        let (t, b) = setup();
        symlink(t.path().join("secret"), t.path().join("box/fs/input")).unwrap();
        assert!(b.create("fs/input", 0o644).is_err());
        assert_eq!(
            std::fs::read_to_string(t.path().join("secret")).unwrap(),
            "outside"
        );
        symlink(t.path(), t.path().join("box/fs/away")).unwrap();
        let e = b.create_dir_all("fs/away/made", 0o755).unwrap_err();
        assert!(matches!(e, BeneathError::Escapes { .. }), "{e}");
        assert!(!t.path().join("made").exists());
        b.create_dir_all("fs/a/b/c", 0o755).unwrap();
        b.create("fs/a/b/c/f", 0o644)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        assert!(t.path().join("box/fs/a/b/c/f").is_file());
    }
}
