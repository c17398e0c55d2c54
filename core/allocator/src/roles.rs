//! Role names as a tree: `eng/web` is a child of `eng`, which is a child of the root.
//!
//! The tree is what makes roles hierarchical everywhere in the allocator: fair shares
//! are compared among siblings (sorter), a quota limit counts a role's descendants
//! (quota), and a reservation for `eng` may be offered to `eng/web` (reservations).
//! Nodes are interned once and never removed: roles are few, and keeping their ids
//! stable keeps every per-role vector simple.

use crate::AllocatorError;
use std::collections::HashMap;

/// Index of a role in the tree.
pub(crate) type NodeId = usize;

/// The root: the parent of every top-level role. It is not a role itself.
pub(crate) const ROOT: NodeId = 0;

#[derive(Debug)]
struct Node {
    path: String,
    parent: Option<NodeId>,
    depth: usize,
}

#[derive(Debug)]
pub(crate) struct RoleTree {
    nodes: Vec<Node>,
    by_path: HashMap<String, NodeId>,
}

impl Default for RoleTree {
    fn default() -> Self {
        RoleTree {
            nodes: vec![Node {
                path: String::new(),
                parent: None,
                depth: 0,
            }],
            by_path: HashMap::new(),
        }
    }
}

impl RoleTree {
    /// The node of `path`, created (with its ancestors) on first use.
    pub fn intern(&mut self, path: &str) -> NodeId {
        if path.is_empty() {
            return ROOT;
        }
        if let Some(&n) = self.by_path.get(path) {
            return n;
        }
        let parent = match path.rfind('/') {
            Some(i) => self.intern(&path[..i]),
            None => ROOT,
        };
        let n = self.nodes.len();
        let depth = self.nodes[parent].depth + 1;
        self.nodes.push(Node {
            path: path.to_string(),
            parent: Some(parent),
            depth,
        });
        self.by_path.insert(path.to_string(), n);
        n
    }

    pub fn find(&self, path: &str) -> Option<NodeId> {
        self.by_path.get(path).copied()
    }

    pub fn path(&self, n: NodeId) -> &str {
        &self.nodes[n].path
    }

    pub fn parent(&self, n: NodeId) -> Option<NodeId> {
        self.nodes[n].parent
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// `n`, its parent, ..., its top-level ancestor (the root excluded).
    pub fn path_up(&self, n: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        let mut cur = Some(n).filter(|&n| n != ROOT);
        std::iter::from_fn(move || {
            let n = cur?;
            cur = self.nodes[n].parent.filter(|&p| p != ROOT);
            Some(n)
        })
    }

    /// True when `a` is `n` or one of its ancestors (the root is everyone's ancestor).
    pub fn is_ancestor_or_self(&self, a: NodeId, n: NodeId) -> bool {
        let da = self.nodes[a].depth;
        let mut x = n;
        while self.nodes[x].depth > da {
            x = self.nodes[x].parent.expect("only the root has no parent");
        }
        x == a
    }

    /// True when one of the two is an ancestor of (or is) the other.
    pub fn related(&self, a: NodeId, b: NodeId) -> bool {
        self.is_ancestor_or_self(a, b) || self.is_ancestor_or_self(b, a)
    }
}

/// Checks a role name given by an operator (weights, quotas, reservations).
/// Segments are separated by `/`; `*` is the default role and has no children.
pub fn validate_role(role: &str) -> Result<(), AllocatorError> {
    let bad = |why: &'static str| Err(AllocatorError::RoleName(why));
    if role.is_empty() {
        return bad("a role name cannot be empty");
    }
    if role.len() > 255 {
        return bad("a role name is at most 255 bytes");
    }
    if role.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("a role name cannot contain spaces or control characters");
    }
    for seg in role.split('/') {
        match seg {
            "" => return bad("a role name cannot start or end with `/` or contain `//`"),
            "." | ".." => return bad("`.` and `..` are not role names"),
            "*" if role != "*" => return bad("`*` cannot be part of a hierarchical role"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_of_role_paths() {
        let mut t = RoleTree::default();
        let web = t.intern("eng/web");
        let eng = t.find("eng").expect("ancestors are created");
        let ops = t.intern("ops");
        assert_eq!(t.parent(web), Some(eng));
        assert_eq!(t.parent(eng), Some(ROOT));
        assert_eq!(t.path_up(web).collect::<Vec<_>>(), vec![web, eng]);
        assert!(t.is_ancestor_or_self(eng, web) && !t.is_ancestor_or_self(web, eng));
        assert!(t.related(web, eng) && !t.related(web, ops));
        assert_eq!(t.intern("eng/web"), web);
    }

    #[test]
    fn role_names_are_checked() {
        assert!(validate_role("eng/web").is_ok());
        assert!(validate_role("*").is_ok());
        for bad in ["", "/eng", "eng/", "a//b", "a/./b", "a b", "eng/*"] {
            assert!(validate_role(bad).is_err(), "{bad}");
        }
    }
}
