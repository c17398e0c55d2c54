//! Tenants (issue 15): principals from client certificates, the access policy set
//! with `agora acl set`, and what each principal may see and do, through the real
//! binaries.
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
use std::process::{Command, Output};

use common::*;

/// `agora certs issue <the cluster's cert dir> --principal NAME [ARGS]`.
fn issue(c: &Cluster, name: &str, args: &[&str]) -> Output {
    let certs = c.dir.path().join("certs");
    let mut all = vec![
        "certs",
        "issue",
        certs.to_str().unwrap(),
        "--principal",
        name,
    ];
    all.extend_from_slice(args);
    c.agora(&all)
}

/// Issues a client certificate for `principal` and returns its client.json.
fn principal(c: &Cluster, name: &str, expires: &str) -> PathBuf {
    let o = issue(c, name, &["--expires", expires]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    c.dir.path().join("certs").join(name).join("client.json")
}

/// `agora ARGS` as the principal whose client.json is `config`.
fn as_(config: &Path, args: &[&str]) -> Output {
    run_bounded(
        Command::new(AGORA)
            .args(args)
            .env("AGORA_CONFIG", config)
            .env_remove("AGORA_MASTER"),
        120,
    )
}

/// Asserts `o` was refused by the policy: exit 77 and the sentence naming `rule`.
fn denied(o: &Output, sentence: &str) {
    assert_eq!(code(o), 77, "{}{}", stdout(o), stderr(o));
    assert!(
        stderr(o).contains(sentence),
        "expected {sentence:?} in: {}",
        stderr(o)
    );
}

fn policy(views: &str) -> String {
    format!(
        r#"{{
  "permissive": false,
  "register_frameworks": [
    {{"principals": {{"values": ["alice"]}}, "roles": {{"values": ["tenant-a/*"]}}}},
    {{"principals": {{"values": ["bob"]}}, "roles": {{"values": ["tenant-b/*"]}}}}
  ],
  "run_wasm_tasks": [
    {{"principals": {{"values": ["alice"]}}, "roles": {{"values": ["tenant-a/*"]}}}},
    {{"principals": {{"values": ["bob"]}}, "roles": {{"values": ["tenant-b/*"]}}}}
  ],
  "run_native_tasks": [
    {{"principals": {{"values": ["alice", "bob"]}}, "users": {{"values": ["default", "nobody"]}}}}
  ],
  "deploy_functions": [
    {{"principals": {{"values": ["alice"]}}, "roles": {{"values": ["tenant-a/*"]}}}}
  ],
  "view_tasks": [
    {{"principals": {{"values": ["alice"]}}, "roles": {{"values": ["tenant-a/*"]}}}},
    {{"principals": {{"values": ["bob"]}}, "roles": {{"values": [{views}]}}}},
    {{"principals": {{"values": ["ops", "admin"]}}, "roles": {{"type": "ANY"}}}}
  ],
  "kill_tasks": [
    {{"principals": {{"values": ["alice"]}}, "roles": {{"values": ["tenant-a/*"]}}}},
    {{"principals": {{"values": ["ops", "admin"]}}, "roles": {{"type": "ANY"}}}}
  ],
  "update_weights": [
    {{"principals": {{"values": ["ops", "admin"]}}, "roles": {{"type": "ANY"}}}}
  ],
  "manage_acls": [
    {{"principals": {{"values": ["admin"]}}, "objects": {{"type": "ANY"}}}}
  ]
}}"#
    )
}

/// Two tenants and an operator: each tenant runs, sees and kills only its own; the
/// operator sees and kills everything but may not change the policy; every refusal
/// is exit 77 with the rule named; a policy change applies at once.
#[test]
fn two_tenants_and_an_operator_see_and_do_only_what_the_policy_allows() {
    let c = Cluster::start();
    let alice = principal(&c, "alice", "30d");
    let bob = principal(&c, "bob", "30d");
    let ops = principal(&c, "ops", "30d");
    let file = c.dir.path().join("policy.json");
    std::fs::write(&file, policy(r#""tenant-b/*""#)).unwrap();
    // The dev cluster's own certificate is the administrator.
    let o = c.agora(&["acl", "set", file.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    // Alice runs a task in her role; it is seen by her and by the operator.
    let mut run = Command::new(AGORA);
    run.args(["run", "--role", "tenant-a/web", "--name", "alice-task"])
        .args(["--command", "sleep 120"])
        .env("AGORA_CONFIG", &alice)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut held = spawn_tied_to_process(run);
    wait_running(|| stdout(&as_(&alice, &["ps"])), "alice-task", 1);
    let task = stdout(&as_(&ops, &["ps"]))
        .lines()
        .find(|l| l.contains("alice-task"))
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .expect("the operator sees alice's task");

    // Bob may not run in her role, nor see, read, explain or kill her task.
    denied(
        &as_(&bob, &["run", "--role", "tenant-a", "--command", "true"]),
        "permission denied: principal bob may not register frameworks in role tenant-a (rule register_frameworks: no rule allows it)",
    );
    let listed = stdout(&as_(&bob, &["ps", "--all"]));
    assert!(
        !listed.contains("alice-task") && !listed.contains(&task),
        "{listed}"
    );
    let roles = stdout(&as_(&bob, &["role", "ls"]));
    assert!(!roles.contains("tenant-a"), "{roles}");
    denied(
        &as_(&bob, &["logs", &task]),
        "permission denied: principal bob may not view tasks of role tenant-a/web (rule view_tasks: no rule allows it)",
    );
    denied(
        &as_(&bob, &["explain", &task]),
        "may not view tasks of role tenant-a/web",
    );
    denied(
        &as_(&bob, &["kill", &task]),
        "permission denied: principal bob may not kill tasks of role tenant-a/web (rule kill_tasks: no rule allows it)",
    );
    denied(
        &as_(&bob, &["role", "weight", "set", "tenant-a", "3"]),
        "may not change the weight of role tenant-a (rule update_weights",
    );
    // Bob runs in his own role.
    let o = as_(
        &bob,
        &[
            "run",
            "--role",
            "tenant-b",
            "--name",
            "bob-task",
            "--command",
            "true",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    // Functions: alice deploys into her role (the gateway, part of the master,
    // subscribes whatever the policy says), bob may not deploy there, and sees
    // none of her functions listed.
    let echo = guest("echo");
    let o = as_(
        &alice,
        &[
            "fn",
            "deploy",
            "a-echo",
            echo.to_str().unwrap(),
            "--role",
            "tenant-a",
            "--min-instances",
            "1",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let web = master_http(&c);
    wait_until("alice's function to answer", || {
        http("POST", &web, "/fn/a-echo/x", b"hi").status == 200
    });
    denied(
        &as_(&bob, &["fn", "deploy", "b-echo", echo.to_str().unwrap(), "--role", "tenant-a"]),
        "permission denied: principal bob may not deploy functions into role tenant-a (rule deploy_functions: no rule allows it)",
    );
    let listed = stdout(&as_(&bob, &["fn", "ls"]));
    assert!(!listed.contains("a-echo"), "{listed}");
    let listed = stdout(&as_(&alice, &["fn", "ls"]));
    assert!(listed.contains("a-echo"), "{listed}");

    // The operator may change weights but not the policy.
    let o = as_(&ops, &["role", "weight", "set", "tenant-a", "2"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    denied(
        &as_(&ops, &["acl", "set", file.to_str().unwrap()]),
        "permission denied: principal ops may not read or change the access policy (rule manage_acls: no rule allows it)",
    );
    denied(&as_(&bob, &["acl", "get"]), "(rule manage_acls");

    // A new policy applies at once: bob may now view tenant-a (not kill there).
    std::fs::write(&file, policy(r#""tenant-b/*", "tenant-a/*""#)).unwrap();
    let o = c.agora(&["acl", "set", file.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let listed = stdout(&as_(&bob, &["ps"]));
    assert!(listed.contains("alice-task"), "{listed}");
    denied(
        &as_(&bob, &["kill", &task]),
        "may not kill tasks of role tenant-a/web",
    );

    // Bob may not take over her framework by subscribing with its id, even in a
    // role of his own.
    let fid = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let admin = agora_sdk::ClientConfig::load(&c.config).unwrap();
            let tasks = agora_sdk::Client::connect(&admin)
                .await
                .unwrap()
                .list_tasks(false)
                .await
                .unwrap();
            let fid = tasks
                .iter()
                .find(|t| t.task_id == task)
                .map(|t| t.framework_id.clone())
                .expect("alice's task listed");
            let bob_cfg = agora_sdk::ClientConfig::load(&bob).unwrap();
            let refused = agora_sdk::Client::connect(&bob_cfg)
                .await
                .unwrap()
                .subscribe(agora_sdk::FrameworkInfo {
                    name: "takeover".into(),
                    roles: vec!["tenant-b".into()],
                    framework_id: fid.clone(),
                    ..Default::default()
                })
                .await;
            let e = refused.err().expect("bob's takeover refused").to_string();
            assert!(
                e.contains(&format!(
                    "permission denied: principal bob may not subscribe as framework {fid}, which principal alice registered"
                )),
                "{e}"
            );
            fid
        })
    };
    assert!(!fid.is_empty());
    let listed = stdout(&as_(&alice, &["ps"]));
    assert!(
        listed.contains("alice-task") && listed.contains("RUNNING"),
        "{listed}"
    );

    // Alice kills her own task.
    let o = as_(&alice, &["kill", &task]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let ended = wait_child(&mut held, 60);
    let out = String::from_utf8_lossy(&ended.stdout).into_owned()
        + &String::from_utf8_lossy(&ended.stderr);
    assert!(out.contains("KILLED"), "{out}");

    // Removing the policy gives everything back to everyone.
    let o = c.agora(&["acl", "clear"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = as_(&bob, &["acl", "get"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

/// A tenant's native tasks run as the OS users its rule allows, and no other; its
/// wasm tasks only in its roles.
#[test]
fn native_tasks_run_only_as_the_users_the_policy_allows() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run tasks as other users");
        return;
    }
    let c = Cluster::start();
    let alice = principal(&c, "alice", "30d");
    let file = c.dir.path().join("policy.json");
    std::fs::write(&file, policy(r#""tenant-b/*""#)).unwrap();
    let o = c.agora(&["acl", "set", file.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    let o = as_(
        &alice,
        &["run", "--role", "tenant-a", "--command", "id -un"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "nobody");
    let o = as_(
        &alice,
        &[
            "run",
            "--role",
            "tenant-a",
            "--user",
            "nobody",
            "--command",
            "id -un",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "nobody");
    let o = as_(
        &alice,
        &[
            "run",
            "--role",
            "tenant-a",
            "--user",
            "daemon",
            "--command",
            "id -un",
        ],
    );
    denied(
        &o,
        "permission denied: principal alice may not run native tasks as user daemon (rule run_native_tasks: no rule allows it)",
    );
    assert!(
        !stdout(&o).contains("daemon"),
        "it never ran: {}",
        stdout(&o)
    );

    // A wasm task in her role runs; bob's rules do not let her run in his.
    let hello = guest("hello");
    let o = as_(
        &alice,
        &["run", "--role", "tenant-a", hello.to_str().unwrap()],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

/// A bad policy file is refused with what is wrong, before anything changes; a
/// certificate that has expired is refused by the master.
#[test]
fn bad_policies_and_expired_certificates_are_refused() {
    let c = Cluster::start();
    let file = c.dir.path().join("bad.json");
    std::fs::write(
        &file,
        r#"{"kill_tasks": [{"principals": {"values": ["a"]}, "users": {"type": "ANY"}}]}"#,
    )
    .unwrap();
    let o = c.agora(&["acl", "set", file.to_str().unwrap()]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("kill_tasks[0]: unknown key \"users\""),
        "{}",
        stderr(&o)
    );
    let o = c.agora(&["acl", "get"]);
    assert!(
        stdout(&o).contains("no access policy is set"),
        "{}",
        stdout(&o)
    );

    let o = c.agora(&["certs", "issue", "/nonexistent", "--principal", "x"]);
    assert_ne!(code(&o), 0);
    let o = issue(&c, "bad name", &[]);
    assert!(
        stderr(&o).contains("--principal: principal \"bad name\" must be"),
        "{}",
        stderr(&o)
    );
    // A name that would write outside the certificates' directory, and a validity
    // past the CA's ten years, are refused; nothing is written.
    let certs = c.dir.path().join("certs");
    let o = issue(&c, "..", &[]);
    assert!(
        stderr(&o).contains("not starting with '.'"),
        "{}",
        stderr(&o)
    );
    let config_before = std::fs::read(&c.config).unwrap();
    let o = issue(&c, "later", &["--expires", "4000d"]);
    assert!(
        stderr(&o).contains("--expires must be above 0 and at most 3653d"),
        "{}",
        stderr(&o)
    );
    assert!(!certs.join("later").exists());
    assert_eq!(std::fs::read(&c.config).unwrap(), config_before);

    let short = principal(&c, "brief", "1s");
    wait_until("the 1 s certificate to be refused as expired", || {
        let o = as_(&short, &["ps"]);
        code(&o) != 0 && stderr(&o).to_lowercase().contains("expired")
    });
}
