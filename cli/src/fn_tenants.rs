//! `agora fn tenant set|ls|rm`: a role's per-agent concurrency limit over all of its
//! functions (the tenant limit), kept in the master's registry. Each agent lets at most
//! that many of the tenant's requests run at once; more wait in a bounded queue, then
//! get 429 or 503 with `Retry-After`.

use std::process::ExitCode;
use std::time::Duration;

use agora_proto::units::{format_duration, parse_duration_ms};
use agora_proto::v1::{self, operator_request, TenantLimit};
use clap::Subcommand;

use crate::fns::{config, operator};
use crate::Target;

#[derive(Subcommand)]
pub enum TenantCmd {
    /// Limit the requests of ROLE's functions that run at once on each agent.
    Set {
        #[command(flatten)]
        target: Target,
        /// The role (tenant); `*` is the default role.
        role: String,
        /// Requests of the tenant's functions running at once on one agent.
        #[arg(long)]
        max_concurrency: u32,
        /// Requests that may wait on an agent beyond it; more get 429.
        #[arg(long, default_value_t = 64)]
        queue: u32,
        /// Longest a request waits for a slot before it gets 503, e.g. 1s or 500ms.
        #[arg(long, default_value = "1s")]
        queue_wait: String,
    },
    /// List the tenant limits.
    Ls {
        #[command(flatten)]
        target: Target,
    },
    /// Remove ROLE's tenant limit.
    Rm {
        #[command(flatten)]
        target: Target,
        role: String,
    },
}

pub async fn tenants(cmd: TenantCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TenantCmd::Set {
            target,
            role,
            max_concurrency,
            queue,
            queue_wait,
        } => {
            if max_concurrency == 0 {
                anyhow::bail!(
                    "--max-concurrency must be at least 1 (to remove the limit: agora fn tenant rm {role})"
                );
            }
            let limit = TenantLimit {
                role: role.clone(),
                max_concurrency,
                queue_len: queue,
                max_queue_wait_ms: parse_duration_ms(&queue_wait)?,
            };
            let r = set(&target, limit).await?;
            print(&r.tenant_limits);
            eprintln!("tenant limit of role {role} set; {}", replaced(&role, &r));
            Ok(ExitCode::SUCCESS)
        }
        TenantCmd::Ls { target } => {
            let cfg = config(&target)?;
            let r = operator(
                &cfg,
                operator_request::Request::FnTenantList(v1::ListTenantLimits {}),
            )
            .await?;
            print(&r.tenant_limits);
            if r.tenant_limits.is_empty() {
                eprintln!(
                    "no tenant limits; set one with: agora fn tenant set ROLE --max-concurrency N"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        TenantCmd::Rm { target, role } => {
            let r = set(
                &target,
                TenantLimit {
                    role: role.clone(),
                    ..Default::default()
                },
            )
            .await?;
            print(&r.tenant_limits);
            eprintln!(
                "tenant limit of role {role} removed; {}",
                replaced(&role, &r)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn set(target: &Target, limit: TenantLimit) -> anyhow::Result<v1::OperatorResponse> {
    let cfg = config(target)?;
    operator(
        &cfg,
        operator_request::Request::FnTenantSet(v1::SetTenantLimit { limit: Some(limit) }),
    )
    .await
}

/// Which functions' hosts are replaced to carry the change (those of the role).
fn replaced(role: &str, r: &v1::OperatorResponse) -> String {
    let names: Vec<&str> = r
        .functions
        .iter()
        .filter_map(|f| f.spec.as_ref().map(|s| s.name.as_str()))
        .collect();
    if names.is_empty() {
        let hint = if role == "default" {
            " (functions deployed without --role have role '*')"
        } else {
            ""
        };
        format!(
            "no function of role {role} is deployed yet{hint}; it applies to those deployed later"
        )
    } else {
        format!(
            "the hosts of {} are being replaced to carry it",
            names.join(", ")
        )
    }
}

fn print(limits: &[TenantLimit]) {
    if limits.is_empty() {
        return;
    }
    println!(
        "{:<20} {:>16} {:>8} {:>11}",
        "ROLE", "PER-AGENT LIMIT", "QUEUE", "QUEUE WAIT"
    );
    for l in limits {
        println!(
            "{:<20} {:>16} {:>8} {:>11}",
            l.role,
            l.max_concurrency,
            l.queue_len,
            format_duration(Duration::from_millis(l.max_queue_wait_ms))
        );
    }
}
