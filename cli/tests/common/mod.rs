//! Shared harness for end-to-end tests: a real `agora dev` cluster (the built binary)
//! on a free loopback port, in a temporary directory, stopped on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const AGORA: &str = env!("CARGO_BIN_EXE_agora");

pub fn guest(name: &str) -> PathBuf {
    agora_guest_examples::wasm_path(name)
}

pub struct Cluster {
    child: Child,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub master: String,
    /// What `agora dev` printed before `ready`.
    pub banner: Vec<String>,
}

impl Cluster {
    /// Starts `agora dev` and waits (bounded) for its `ready` line.
    pub fn start() -> Cluster {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(AGORA);
        cmd.arg("dev")
            .arg("--data-dir")
            .arg(dir.path())
            .args(extra)
            .env("AGORA_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = spawn_tied_to_process(cmd);
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // Keep draining after start-up so the cluster never writes to a closed pipe.
                let _ = tx.send(line);
            }
        });
        let mut master = String::new();
        let mut banner = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(l) if l.trim_start().starts_with("master ") => {
                    master = l.split_whitespace().nth(1).unwrap_or_default().to_string();
                    banner.push(l);
                }
                Ok(l) if l == "ready" => break,
                Ok(l) => banner.push(l),
                Err(e) => {
                    let _ = child.kill();
                    panic!("agora dev did not print `ready` within 60 s: {e}");
                }
            }
        }
        let config = dir.path().join("client.json");
        assert!(config.exists(), "agora dev wrote no client config");
        Cluster {
            child,
            dir,
            config,
            master,
            banner,
        }
    }

    /// The `agora dev` process (its master and agents run in it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `agora ARGS` against this cluster, with a bounded run time.
    pub fn agora(&self, args: &[&str]) -> Output {
        run_bounded(
            Command::new(AGORA)
                .args(args)
                .env("AGORA_CONFIG", &self.config)
                .env_remove("AGORA_MASTER"),
            120,
        )
    }

    pub fn agent_dir(&self) -> PathBuf {
        self.dir.path().join("agent")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SIGTERM lets the dev cluster stop its executors; then make sure.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20)); // waiting for process exit
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` so that it gets SIGTERM when this test process ends, even when the
/// owner is a static that is never dropped. PR_SET_PDEATHSIG fires when the spawning
/// *thread* exits, so the spawn happens on a thread that lives as long as the process.
pub fn spawn_tied_to_process(mut cmd: Command) -> Child {
    use std::os::unix::process::CommandExt;
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    static KEEPER: std::sync::OnceLock<
        std::sync::Mutex<mpsc::Sender<(Command, mpsc::Sender<std::io::Result<Child>>)>>,
    > = std::sync::OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<(Command, mpsc::Sender<std::io::Result<Child>>)>();
        std::thread::spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
            loop {
                std::thread::park();
            }
        });
        std::sync::Mutex::new(tx)
    });
    let (rtx, rrx) = mpsc::channel();
    keeper
        .lock()
        .unwrap()
        .send((cmd, rtx))
        .expect("keeper thread");
    rrx.recv().expect("keeper reply").expect("spawn agora dev")
}

/// Runs a command to completion, killing it after `secs`.
pub fn run_bounded(cmd: &mut Command, secs: u64) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("command {cmd:?} did not finish within {secs} s");
        }
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// The task id from `agora run`'s `task ID STATE` lines.
pub fn task_id(o: &Output) -> String {
    stderr(o)
        .lines()
        .find_map(|l| {
            l.strip_prefix("task ")
                .and_then(|r| r.split_whitespace().next())
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no task line in {}", stderr(o)))
}

/// The last `task ID STATE[: message]` line.
pub fn final_line(o: &Output) -> String {
    stderr(o)
        .lines()
        .filter(|l| l.starts_with("task "))
        .last()
        .unwrap_or_default()
        .to_string()
}

pub fn write_file(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write");
    p
}

/// A long-running process (master, agent) started by a test, killed on drop.
pub struct Proc {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Starts `cmd` and waits (bounded) for a stdout line matching `pred`; returns it.
    pub fn start(mut cmd: Command, pred: impl Fn(&str) -> bool) -> (Proc, String) {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env("AGORA_LOG", "warn");
        let mut child = spawn_tied_to_process(cmd);
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(l) if pred(&l) => return (Proc { child, lines: rx }, l),
                Ok(_) => {}
                Err(e) => {
                    let _ = child.kill();
                    panic!("process did not print the expected line within 60 s: {e}");
                }
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20)); // waiting for process exit
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it holds, for at most 60 s.
pub fn wait_until(what: &str, check: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50)); // poll interval
    }
}

/// `agora run` arguments of a small native task `NAME-I` that waits until the file
/// `go` exists, then prints `run I survived` and exits with I mod 3.
pub fn held_run_args(name: &str, i: usize, go: &Path) -> Vec<String> {
    // Tasks run as `nobody`: it must be able to reach `go` (a test's temporary
    // directory is 0700).
    if let Some(dir) = go.parent() {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711));
    }
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.05; done; echo run {i} survived; exit {}",
        go.display(),
        i % 3
    );
    [
        "run",
        "--name",
        &format!("{name}-{i}"),
        "--cpus",
        "0.05",
        "--mem",
        "16MiB",
        "--command",
        &script,
    ]
    .map(String::from)
    .to_vec()
}

/// Polls `ps` (which returns what `agora ps` printed) until `n` rows mention
/// `name` and say RUNNING, for at most 90 s.
pub fn wait_running(ps: impl Fn() -> String, name: &str, n: usize) {
    let count = || {
        ps().lines()
            .filter(|l| l.contains(name) && l.contains("RUNNING"))
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while count() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {n} {name} tasks ran",
            count()
        );
        std::thread::sleep(Duration::from_millis(200)); // poll interval
    }
}

/// Polls `agora ps` until a row matches; returns that row's task id.
pub fn wait_for_task(c: &Cluster, pred: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ps = stdout(&c.agora(&["ps"]));
        if let Some(row) = ps.lines().find(|l| pred(l)) {
            return row
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no matching task in `agora ps` within 60 s:\n{ps}"
        );
        std::thread::sleep(Duration::from_millis(100)); // poll interval
    }
}

/// Waits (bounded) for a child to exit; returns its status and, when piped, stderr.
pub fn wait_child(child: &mut Child, secs: u64) -> Output {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20)); // poll interval
    };
    let mut err = Vec::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_end(&mut err);
    }
    Output {
        status,
        stdout: Vec::new(),
        stderr: err,
    }
}

// ---- functions (issue 6) ------------------------------------------------------------

/// The master's HTTP address (`host:port`) from the client config `agora dev` wrote.
pub fn master_http(c: &Cluster) -> String {
    let text = std::fs::read_to_string(&c.config).expect("client config");
    let v: serde_json::Value = serde_json::from_str(&text).expect("client config JSON");
    let url = v["http"]
        .as_str()
        .unwrap_or_else(|| panic!("client config has no `http` field: {text}"));
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// The `hello-http` component (wasm32-wasip2), built on first use.
pub fn hello_http_component() -> PathBuf {
    agora_guest_examples::component_path("hello-http")
}

/// An HTTP answer as a test reads it.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), bounded in time.
pub fn http(method: &str, addr: &str, path: &str, body: &[u8]) -> HttpReply {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(90)))
        .expect("timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\nX-Test: yes\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("send");
    s.write_all(body).expect("send body");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: reading the answer: {e}"));
    parse_reply(&raw)
}

/// A POST whose body (`total` bytes of `x`, in `chunk`-byte writes) is sent by a
/// thread of its own while this one reads the answer, as real clients do: with
/// `Transfer-Encoding: chunked`, or with its `Content-Length` declared. The writer
/// stops when the server closes (a refusal before the end). Returns the answer and
/// the body bytes the socket accepted.
pub fn upload(addr: &str, path: &str, total: u64, chunk: usize, chunked: bool) -> (HttpReply, u64) {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let mut s = std::net::TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(90)))
        .expect("timeout");
    let length = if chunked {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {total}")
    };
    let head =
        format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{length}\r\n\r\n");
    s.write_all(head.as_bytes()).expect("send");
    let written = Arc::new(AtomicU64::new(0));
    let mut w = s.try_clone().expect("clone the socket");
    let count = Arc::clone(&written);
    let writer = std::thread::spawn(move || {
        let data = vec![b'x'; chunk];
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk as u64) as usize;
            let r = if chunked {
                let mut frame = format!("{n:x}\r\n").into_bytes();
                frame.extend_from_slice(&data[..n]);
                frame.extend_from_slice(b"\r\n");
                w.write_all(&frame)
            } else {
                w.write_all(&data[..n])
            };
            if r.is_err() {
                return; // the server closed: it will not read the rest
            }
            left -= n as u64;
            count.fetch_add(n as u64, Ordering::SeqCst);
        }
        if chunked {
            let _ = w.write_all(b"0\r\n\r\n");
        }
    });
    // Read until the server closes; a reset after the answer's head (a refusal with
    // unread body bytes in flight) still leaves that head.
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if raw.windows(4).any(|w| w == b"\r\n\r\n") => {
                eprintln!(
                    "POST http://{addr}{path}: connection ended with {e} after the answer's head"
                );
                break;
            }
            Err(e) => panic!("POST http://{addr}{path}: reading the answer: {e}"),
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    writer.join().expect("the writer thread");
    (parse_reply(&raw), written.load(Ordering::SeqCst))
}

/// An HTTP/1.1 answer as read off the wire (a chunked body reassembled).
pub fn parse_reply(raw: &[u8]) -> HttpReply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut rest = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        let mut out = Vec::new();
        let mut i = 0;
        while let Some(nl) = rest[i..].windows(2).position(|w| w == b"\r\n") {
            let size_line = String::from_utf8_lossy(&rest[i..i + nl]).into_owned();
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .unwrap_or(0);
            i += nl + 2;
            if size == 0 || i + size > rest.len() {
                break;
            }
            out.extend_from_slice(&rest[i..i + size]);
            i += size + 2;
        }
        rest = out;
    }
    HttpReply {
        status,
        headers,
        body: String::from_utf8_lossy(&rest).into_owned(),
    }
}

/// `GET /fn` of the master: every function with its instances.
pub fn fn_list(master_http: &str) -> serde_json::Value {
    let r = http("GET", master_http, "/fn", b"");
    assert_eq!(r.status, 200, "GET /fn: {r:?}");
    serde_json::from_str(&r.body).expect("GET /fn answers JSON")
}

/// The function's entry in `GET /fn`.
pub fn fn_entry(master_http: &str, name: &str) -> Option<serde_json::Value> {
    fn_list(master_http)
        .as_array()
        .expect("a list")
        .iter()
        .find(|f| f["name"] == name)
        .cloned()
}

/// Agent HTTP addresses of the function's RUNNING hosts.
pub fn running_hosts(master_http: &str, name: &str) -> Vec<String> {
    fn_entry(master_http, name)
        .map(|f| {
            f["instances"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|i| i["state"] == "TASK_RUNNING")
                .filter_map(|i| i["http_address"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `ip ARGS` (iproute2), for the network-namespace tests; the error names the
/// command and what it said.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}
