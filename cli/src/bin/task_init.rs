//! `agora-task-init`: the shim and the init of a native task's PID namespace. The
//! native executor re-executes this small program (installed beside `agora`) in the
//! two processes it forks around each task, so that they do not keep the executor's
//! memory shared copy-on-write for the task's life
//! (`agora_native_executor::isolation::MountPlan::with_pid_namespace`).
fn main() {
    agora_native_executor::isolation::pid_namespace_helper();
    eprintln!("agora-task-init: run by the native executor around each task; not a command");
    std::process::exit(2);
}
