//! Every top-level protobuf message a peer (or a file) hands us: the first byte
//! picks the type, the rest is decoded with prost. What decodes must encode and
//! decode back to an equal message (`agora_fuzz::roundtrip`), and every resource
//! list in it goes through `Resources::from_proto`: what that accepts holds exactly
//! the sums of the list per name and role, and survives `to_proto`.
#![no_main]
use std::collections::BTreeMap;

use agora_agent_core::checkpoint::{ExecutorRecord, MetaRecord, TaskRecord};
use agora_proto::resources::MAX_AMOUNT;
use agora_proto::v1::{self, call, operation, Resource, TaskInfo};
use agora_proto::Resources;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 24 {
        0 => check::<v1::StreamOpen>(bytes, |m, out| {
            use v1::stream_open::Kind;
            match &m.kind {
                Some(Kind::Agent(h)) => hello(h, out),
                Some(Kind::Operator(r)) => operator(r, out),
                _ => {}
            }
        }),
        1 => check::<v1::AgentToMaster>(bytes, |_, _| {}),
        2 => check::<v1::MasterToAgent>(bytes, |m, out| {
            if let Some(v1::master_to_agent::Msg::RunTask(rt)) = &m.msg {
                rt.task.iter().for_each(|t| task(t, out));
            }
        }),
        3 => check::<v1::AgentHello>(bytes, hello),
        4 => check::<v1::SchedulerHello>(bytes, |_, _| {}),
        5 => check::<v1::Call>(bytes, |m, out| match &m.call {
            Some(call::Call::Accept(a)) => {
                for op in a.operations.iter().filter_map(|o| o.operation.as_ref()) {
                    match op {
                        operation::Operation::Launch(l) => {
                            l.tasks.iter().for_each(|t| task(t, out))
                        }
                        operation::Operation::LaunchGroup(g) => {
                            g.tasks.iter().for_each(|t| task(t, out))
                        }
                        operation::Operation::Reserve(r) => out.push(&r.resources),
                        operation::Operation::Unreserve(u) => out.push(&u.resources),
                    }
                }
            }
            Some(call::Call::Pending(p)) => p.tasks.iter().for_each(|t| out.push(&t.resources)),
            _ => {}
        }),
        6 => check::<v1::Event>(bytes, |m, out| {
            if let Some(v1::event::Event::Offers(o)) = &m.event {
                o.offers.iter().for_each(|o| out.push(&o.resources));
            }
        }),
        7 => check::<v1::OperatorRequest>(bytes, operator),
        8 => check::<v1::OperatorResponse>(bytes, |m, out| {
            m.tasks.iter().for_each(|t| out.push(&t.resources));
            for a in &m.agents {
                out.push(&a.total);
                out.push(&a.allocated);
            }
            for r in &m.roles {
                out.push(&r.guarantee);
                out.push(&r.limit);
                out.push(&r.consumed);
            }
        }),
        9 => check::<v1::ExecutorToAgent>(bytes, |_, _| {}),
        10 => check::<v1::AgentToExecutor>(bytes, |_, _| {}),
        11 => check::<v1::LeaderInfo>(bytes, |_, _| {}),
        12 => check::<v1::RaftRpc>(bytes, |_, _| {}),
        13 => check::<v1::RaftReply>(bytes, |_, _| {}),
        14 => check::<v1::RaftSnapshotOpen>(bytes, |_, _| {}),
        15 => check::<v1::RaftSnapshotReply>(bytes, |_, _| {}),
        16 => check::<v1::AgentRequest>(bytes, |_, _| {}),
        17 => check::<v1::SandboxData>(bytes, |_, _| {}),
        18 => check::<v1::UsageReport>(bytes, |_, _| {}),
        19 => check::<v1::ArtifactHeader>(bytes, |_, _| {}),
        20 => check::<v1::DataChunk>(bytes, |_, _| {}),
        // The agent's checkpoint records, read back from its file after a restart.
        21 => check::<TaskRecord>(bytes, |m, out| m.info.iter().for_each(|t| task(t, out))),
        22 => check::<MetaRecord>(bytes, |_, _| {}),
        _ => check::<ExecutorRecord>(bytes, |_, _| {}),
    }
});

fn check<M>(bytes: &[u8], resources_of: impl for<'a> Fn(&'a M, &mut Vec<&'a [Resource]>))
where
    M: Message + Default + PartialEq + std::fmt::Debug,
{
    let Ok(m) = M::decode(bytes) else {
        return;
    };
    agora_fuzz::roundtrip(&m);
    let mut lists = Vec::new();
    resources_of(&m, &mut lists);
    for l in lists {
        resources(l);
    }
}

fn task<'a>(t: &'a TaskInfo, out: &mut Vec<&'a [Resource]>) {
    out.push(&t.resources);
}

fn hello<'a>(h: &'a v1::AgentHello, out: &mut Vec<&'a [Resource]>) {
    out.push(&h.resources);
    for rt in &h.tasks {
        rt.task.iter().for_each(|t| task(t, out));
    }
}

fn operator<'a>(r: &'a v1::OperatorRequest, out: &mut Vec<&'a [Resource]>) {
    use v1::operator_request::Request;
    match &r.request {
        Some(Request::SetQuota(q)) => {
            out.push(&q.guarantee);
            out.push(&q.limit);
        }
        Some(Request::FnDeploy(d)) => out.push(&d.resources),
        _ => {}
    }
}

/// `from_proto` accepts a list exactly when every amount is named and not negative
/// and no sum per (name, role) exceeds `MAX_AMOUNT`; what it accepts holds those
/// sums (zero sums are absent) and survives `to_proto`.
fn resources(list: &[Resource]) {
    let refuse = list.iter().any(|x| x.name.is_empty() || x.value < 0)
        || sums(list).values().any(|s| *s > i128::from(MAX_AMOUNT));
    let parsed = Resources::from_proto(list);
    assert_eq!(parsed.is_err(), refuse, "{list:?}: {parsed:?}");
    let Ok(r) = parsed else {
        return;
    };
    for ((name, role), sum) in sums(list) {
        assert_eq!(
            i128::from(r.of_role(&role).get(&name)),
            sum,
            "{name}({role}) of {list:?}"
        );
    }
    let back = Resources::from_proto(&r.to_proto()).expect("to_proto's list parses");
    assert_eq!(back, r);
    assert!(back.contains(&r) && r.contains(&back));
    let _ = r.to_string();
}

fn sums(list: &[Resource]) -> BTreeMap<(String, String), i128> {
    let mut s = BTreeMap::new();
    for x in list {
        *s.entry((x.name.clone(), x.role.clone())).or_insert(0i128) += i128::from(x.value);
    }
    s.retain(|_, v| *v != 0);
    s
}
