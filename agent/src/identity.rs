//! Who this agent installation is across restarts: `<work>/identity.json` holds what
//! it offered (resources and attributes) when it last started, and a random nonce
//! that goes into its registration token.
//!
//! An agent keeps its id (and the tasks placed on it) only if it comes back as it
//! was: tasks were placed on what it offered and on its attributes, so a restart with
//! other resources or attributes is refused, naming the differences (Mesos's
//! `--reconfiguration_policy=equal`). `--new-identity` starts afresh as a new agent;
//! it is refused while the checkpoint still records tasks or executors, so that no
//! task is ever lost track of.

use std::path::{Path, PathBuf};

use agora_proto::v1::Attribute;
use agora_proto::Resources;

const FILE: &str = "identity.json";

/// What an agent offers, in canonical text form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offered {
    pub resources: String,
    pub attributes: String,
}

impl Offered {
    pub fn new(resources: &Resources, attributes: &[Attribute]) -> Offered {
        let mut attrs: Vec<String> = attributes
            .iter()
            .map(|a| format!("{}:{}", a.name, a.value))
            .collect();
        attrs.sort();
        Offered {
            resources: resources.to_string(),
            attributes: attrs.join(";"),
        }
    }
}

/// The differences between what the agent offered (`was`) and offers now, in words;
/// empty when it may keep its identity.
pub fn changes(was: &Offered, now: &Offered) -> Vec<String> {
    let show = |s: &str| {
        if s.is_empty() {
            "none".to_string()
        } else {
            s.to_string()
        }
    };
    let mut out = Vec::new();
    if was.resources != now.resources {
        out.push(format!(
            "resources were {}, now {}",
            show(&was.resources),
            show(&now.resources)
        ));
    }
    if was.attributes != now.attributes {
        out.push(format!(
            "attributes were {}, now {}",
            show(&was.attributes),
            show(&now.attributes)
        ));
    }
    out
}

/// The identity file of a work directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub nonce: String,
    pub offered: Offered,
}

pub fn path(work: &Path) -> PathBuf {
    work.join(FILE)
}

/// Reads the identity file; `Ok(None)` when there is none (a first start, or a work
/// directory from before identities were recorded).
pub fn read(work: &Path) -> std::io::Result<Option<Identity>> {
    let bytes = match std::fs::read(path(work)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{what} (remove the file only together with checkpoint.redb)"),
        )
    };
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| bad(&format!("not JSON: {e}")))?;
    let field = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .map(str::to_string)
            .ok_or_else(|| bad(&format!("no string field {k:?}")))
    };
    Ok(Some(Identity {
        nonce: field("nonce")?,
        offered: Offered {
            resources: field("resources")?,
            attributes: field("attributes")?,
        },
    }))
}

/// Writes the identity file (atomically, synced).
pub fn write(work: &Path, id: &Identity) -> std::io::Result<()> {
    use std::io::Write;
    let body = serde_json::json!({
        "nonce": id.nonce,
        "resources": id.offered.resources,
        "attributes": id.offered.attributes,
    });
    let tmp = work.join(format!("{FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(serde_json::to_string_pretty(&body)?.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path(work))
}

/// A fresh nonce: 16 random bytes in hex.
pub fn new_nonce() -> std::io::Result<String> {
    Ok(hex::encode(crate::server::random_bytes::<16>()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offered(res: &str, attrs: &[(&str, &str)]) -> Offered {
        let attrs: Vec<Attribute> = attrs
            .iter()
            .map(|(n, v)| Attribute {
                name: n.to_string(),
                value: v.to_string(),
            })
            .collect();
        Offered::new(&Resources::parse(res).unwrap(), &attrs)
    }

    #[test]
    fn the_same_offer_in_another_order_or_spelling_is_no_change() {
        let a = offered("cpus:2;mem:1024", &[("zone", "a"), ("rack", "1")]);
        let b = offered("mem:1GiB;cpus:2", &[("rack", "1"), ("zone", "a")]);
        assert_eq!(changes(&a, &b), Vec::<String>::new());
    }

    #[test]
    fn changed_resources_and_attributes_are_named() {
        let a = offered("cpus:64;mem:1000000", &[("zone", "a")]);
        let b = offered("cpus:1;mem:512", &[("zone", "z")]);
        let c = changes(&a, &b);
        assert_eq!(c.len(), 2, "{c:?}");
        assert!(c[0].starts_with("resources were cpus:64;"), "{c:?}");
        assert!(c[0].contains("now cpus:1;mem:512MiB"), "{c:?}");
        assert_eq!(c[1], "attributes were zone:a, now zone:z");
        let d = changes(&a, &offered("cpus:64;mem:1000000", &[]));
        assert_eq!(d, vec!["attributes were zone:a, now none".to_string()]);
    }

    #[test]
    fn the_file_round_trips_and_a_damaged_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let id = Identity {
            nonce: new_nonce().unwrap(),
            offered: offered("cpus:2;mem:1024", &[("zone", "a")]),
        };
        assert_eq!(id.nonce.len(), 32);
        write(dir.path(), &id).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(id));
        std::fs::write(path(dir.path()), b"{\"nonce\": 3}").unwrap();
        let e = read(dir.path()).unwrap_err();
        assert!(e.to_string().contains("nonce"), "{e}");
    }
}
