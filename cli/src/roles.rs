//! Operator commands on roles: `agora role weight set`, `agora role ls`,
//! `agora quota set|get|rm`, and `agora explain ROLE|TASK`.

use std::process::ExitCode;

use agora_proto::Resources;
use clap::{Args, Subcommand};

use crate::ops::connect;
use crate::Target;

#[derive(Subcommand)]
pub enum RoleCmd {
    /// Weights of roles (default 1): a role with weight 2 gets twice the share of a
    /// sibling with weight 1. Kept in the master's registry across restarts.
    Weight {
        #[command(subcommand)]
        cmd: WeightCmd,
    },
    /// List roles with their weights, quotas, consumption and frameworks.
    Ls {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
pub enum WeightCmd {
    /// Set a role's weight, e.g. `agora role weight set eng/web 2`.
    Set {
        #[command(flatten)]
        target: Target,
        role: String,
        weight: f64,
    },
}

#[derive(Subcommand)]
pub enum QuotaCmd {
    /// Set a role's guarantee and limit, e.g.
    /// `agora quota set eng --guarantee "cpus:2;mem:4GiB" --limit "cpus:8;mem:16GiB"`.
    /// Only the resources named change; the others keep their amounts.
    Set(QuotaSetArgs),
    /// Show quotas (of one role, or of every role that has one).
    Get {
        #[command(flatten)]
        target: Target,
        role: Option<String>,
    },
    /// Remove a role's quota.
    Rm {
        #[command(flatten)]
        target: Target,
        role: String,
    },
}

#[derive(Args)]
pub struct QuotaSetArgs {
    #[command(flatten)]
    target: Target,
    role: String,
    /// Resources the role is guaranteed to be able to get: "cpus:2;mem:4GiB".
    #[arg(long, default_value = "")]
    guarantee: String,
    /// Most the role may consume: "cpus:8;mem:16GiB". A resource never limited is
    /// unlimited (`agora quota rm` clears every limit).
    #[arg(long, default_value = "")]
    limit: String,
    /// Set a guarantee even when the registered agents could not hold all the
    /// guarantees (other roles may then wait until agents are added).
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    target: Target,
    /// A task id (waiting, running or finished) or a role.
    what: String,
}

fn parse(what: &str, spec: &str) -> anyhow::Result<Resources> {
    if spec.trim().is_empty() {
        return Ok(Resources::new());
    }
    Resources::parse(spec).map_err(|e| anyhow::anyhow!("--{what} {spec:?}: {e}"))
}

fn show(r: &[agora_proto::v1::Resource]) -> String {
    let r = Resources::from_proto(r).unwrap_or_default();
    if r.is_empty() {
        "-".into()
    } else {
        r.to_string()
    }
}

pub async fn role(cmd: RoleCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        RoleCmd::Weight {
            cmd:
                WeightCmd::Set {
                    target,
                    role,
                    weight,
                },
        } => {
            connect(&target).await?.set_weight(&role, weight).await?;
            eprintln!("role {role}: weight {weight}");
        }
        RoleCmd::Ls { target } => {
            let roles = connect(&target).await?.roles("").await?;
            let mut table = crate::ops::plain_table(
                &[
                    "ROLE",
                    "WEIGHT",
                    "GUARANTEE",
                    "LIMIT",
                    "RESERVED (free)",
                    "CONSUMED",
                    "FRAMEWORKS",
                ],
                &[1],
            );
            for r in roles {
                let reserved = if r.reserved.is_empty() {
                    "-".to_string()
                } else {
                    format!("{} ({})", show(&r.reserved), show(&r.reserved_free))
                };
                table.add_row(vec![
                    r.role.clone(),
                    r.weight.to_string(),
                    show(&r.guarantee),
                    show(&r.limit),
                    reserved,
                    show(&r.consumed),
                    r.frameworks.join(", "),
                ]);
            }
            crate::ops::print_table(&table);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn quota(cmd: QuotaCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        QuotaCmd::Set(a) => {
            let g = parse("guarantee", &a.guarantee)?;
            let l = parse("limit", &a.limit)?;
            if g.is_empty() && l.is_empty() {
                anyhow::bail!(
                    "give --guarantee and/or --limit (to remove a quota: agora quota rm {})",
                    a.role
                );
            }
            let client = connect(&a.target).await?;
            client.set_quota(&a.role, &g, &l, a.force).await?;
            // The whole quota now, not only what this command named.
            match client.roles(&a.role).await?.first() {
                Some(r) => eprintln!(
                    "role {}: quota guarantee {}, limit {}",
                    a.role,
                    show(&r.guarantee),
                    show(&r.limit)
                ),
                None => eprintln!("role {}: quota set", a.role),
            }
        }
        QuotaCmd::Rm { target, role } => {
            connect(&target)
                .await?
                .set_quota(&role, &Resources::new(), &Resources::new(), false)
                .await?;
            eprintln!("role {role}: quota removed");
        }
        QuotaCmd::Get { target, role } => {
            let client = connect(&target).await?;
            let one = role.is_some();
            let roles = client.roles(role.as_deref().unwrap_or("")).await?;
            println!(
                "{:<20} {:<24} {:<24} CONSUMED",
                "ROLE", "GUARANTEE", "LIMIT"
            );
            for r in roles
                .into_iter()
                .filter(|r| one || !r.guarantee.is_empty() || !r.limit.is_empty())
            {
                println!(
                    "{:<20} {:<24} {:<24} {}",
                    r.role,
                    show(&r.guarantee),
                    show(&r.limit),
                    show(&r.consumed)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn explain(a: ExplainArgs) -> anyhow::Result<ExitCode> {
    let text = connect(&a.target).await?.explain(&a.what).await?;
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}
