//! A small framework against a running `agora dev`: subscribes in role `example`,
//! reserves 0.5 cpu and 128 MiB on the first agent offered, runs a wasm module on
//! that reservation, prints its updates, unreserves, and tears itself down.
//!
//! ```text
//! cargo run -p agora-sdk --example reserve_and_run -- guest.wasm
//! ```

use std::time::Duration;

use agora_sdk::{
    Client, ClientConfig, Event, FrameworkInfo, Operation, Resources, TaskInfo, WasmModule,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: reserve_and_run FILE.wasm"))?;
    let cfg = ClientConfig::discover(None, None)?;
    let client = Client::connect(&cfg).await?;
    let (sha256, size) = client.upload_file(path.as_ref()).await?;
    let mut sched = client
        .subscribe(FrameworkInfo {
            name: "reserve-and-run".into(),
            roles: vec!["example".into()],
            failover_timeout_seconds: 60.0,
            ..Default::default()
        })
        .await?;
    println!("subscribed as {}", sched.framework_id());
    let want = Resources::cpus_mem(500, 128 << 20);
    let mut launched = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let ev = tokio::time::timeout_at(deadline, sched.next_event())
            .await
            .map_err(|_| anyhow::anyhow!("nothing finished within 120 s"))?;
        let Some(ev) = ev else {
            anyhow::bail!("the master closed the stream")
        };
        match ev {
            Event::Offers(offers) => {
                for offer in offers {
                    let have =
                        Resources::from_proto(&offer.resources).map_err(anyhow::Error::msg)?;
                    let reserved = want.with_role(&offer.role);
                    if !launched && have.unreserved().contains(&want) {
                        println!("reserving {want} on {} and launching on it", offer.agent_id);
                        let task = TaskInfo {
                            task_id: "example-1".into(),
                            name: "example".into(),
                            resources: reserved.to_proto(),
                            module: Some(WasmModule {
                                sha256: sha256.clone(),
                                size,
                                ..Default::default()
                            }),
                            ..Default::default()
                        };
                        let ops = vec![Operation::reserve(&want), Operation::launch(vec![task])];
                        sched
                            .accept_operations(vec![offer.offer_id], ops, None)
                            .await?;
                        launched = true;
                    } else if launched && have.contains(&reserved) {
                        // The task ended and its reservation came back: give it up.
                        println!("unreserving {reserved} on {}", offer.agent_id);
                        let ops = vec![Operation::unreserve(&want)];
                        sched
                            .accept_operations(vec![offer.offer_id], ops, Some(0.0))
                            .await?;
                        sched.teardown().await?;
                        return Ok(());
                    } else {
                        sched.decline(vec![offer.offer_id], Some(1.0)).await?;
                    }
                }
            }
            Event::Update(st) => {
                println!("task {} {:?} {}", st.task_id, st.state(), st.message);
                sched.acknowledge(&st).await?;
            }
            Event::Error(e) => eprintln!("refused: {e}"),
            Event::Rescind(id) => println!("offer {id} rescinded"),
            Event::Message {
                executor_id, data, ..
            } => {
                println!("{executor_id}: {}", String::from_utf8_lossy(&data))
            }
            Event::Failure { message, .. } => println!("failure: {message}"),
            Event::Disconnected(why) => println!("lost the master ({why}); reconnecting"),
            Event::Reconnected => println!("subscribed again"),
            Event::Heartbeat => {}
        }
    }
}
