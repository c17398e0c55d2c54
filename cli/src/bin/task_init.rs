//! `agora-task-init`: the init (PID 1) of a native executor's PID namespace. The
//! native executor starts this small program (installed beside `agora`) as its first
//! child, so that the namespace's init does not keep the executor's memory shared
//! copy-on-write for its life
//! (`agora_native_executor::isolation::enter_executor_pid_namespace`).
fn main() {
    agora_native_executor::isolation::pid_namespace_helper();
    eprintln!(
        "agora-task-init: started by the native executor as its namespace's init; not a command"
    );
    std::process::exit(2);
}
