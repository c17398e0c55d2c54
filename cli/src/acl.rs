//! `agora acl get|set`: the cluster's access policy (who may do what to which role,
//! user or function), kept in the master's registry. The file format is the master
//! core's (`agora_master_core::acl`), documented in the README.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use agora_proto::v1::{operator_request, GetAcl, SetAcl};
use clap::Subcommand;

use crate::fns::{config, operator};
use crate::Target;

/// Largest policy file read (the master refuses more than 4 MiB too).
const MAX_FILE: u64 = agora_master_core::acl::MAX_POLICY_BYTES as u64;

#[derive(Subcommand)]
pub enum AclCmd {
    /// Print the policy in force (JSON); nothing set: every principal may do everything.
    Get {
        #[command(flatten)]
        target: Target,
    },
    /// Replace the policy with FILE (JSON; `-` for stdin). It applies at once, to
    /// every request after it, with no restart.
    Set {
        file: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Remove the policy: every principal may do everything again.
    Clear {
        #[command(flatten)]
        target: Target,
    },
}

pub async fn acl(cmd: AclCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AclCmd::Get { target } => {
            let resp = operator(
                &config(&target)?,
                operator_request::Request::GetAcl(GetAcl {}),
            )
            .await?;
            if resp.policy.is_empty() {
                println!("no access policy is set: every principal may do everything");
            } else {
                println!("{}", resp.policy);
            }
        }
        AclCmd::Set { file, target } => {
            let text = read_policy(&file)?;
            // Checked here too, so a mistake is named before anything is sent.
            agora_master_core::acl::Policy::parse(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            operator(
                &config(&target)?,
                operator_request::Request::SetAcl(SetAcl { policy: text }),
            )
            .await?;
            println!("access policy set from {}", file.display());
        }
        AclCmd::Clear { target } => {
            operator(
                &config(&target)?,
                operator_request::Request::SetAcl(SetAcl {
                    policy: String::new(),
                }),
            )
            .await?;
            println!("access policy removed: every principal may do everything");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn read_policy(file: &PathBuf) -> anyhow::Result<String> {
    let mut text = String::new();
    let read = if file.as_os_str() == "-" {
        std::io::stdin()
            .take(MAX_FILE + 1)
            .read_to_string(&mut text)
    } else {
        std::fs::File::open(file).and_then(|f| f.take(MAX_FILE + 1).read_to_string(&mut text))
    };
    read.map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    if text.len() as u64 > MAX_FILE {
        anyhow::bail!("{} is larger than {MAX_FILE} bytes", file.display());
    }
    Ok(text)
}
