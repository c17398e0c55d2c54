//! The fairness policy: hierarchical weighted Dominant Resource Fairness.
//!
//! Like Mesos's DRF sorter (`src/master/allocator/sorter/drf/`), this only answers
//! "in which order should clients be offered resources?"; what can be offered to whom
//! is the allocator's business. A client is one (framework, role) pair.
//!
//! The order is a walk of the role tree. At each node its entries are visited in
//! increasing weighted share:
//! - each child role, keyed by `share(allocations of the child's whole subtree) /
//!   weight(child)`, so weights apply among siblings and a subtree as a whole competes
//!   with its parent's siblings with its own top node's weight (`eng/web` gets a part
//!   of what `eng` gets, never more weight than `eng` has);
//! - the role's own frameworks, as one more entry keyed by `share(their
//!   allocations) / 1` (the default weight: a role's own frameworks compete with its
//!   children like an unweighted child). Within it, frameworks go in increasing
//!   share of their allocation in that role (no weights between frameworks).
//!
//! `share(x)` is the dominant share: the largest `x[k] / total[k]` over resource
//! kinds, against the cluster's total (all agents, reserved or not). Ties go by name
//! (role path, then framework id), which keeps rounds deterministic.
//!
//! Cost: keys change only when an allocation changes (a client's key and the keys of
//! its role's ancestors: O(depth · log n)) or when the cluster total changes (then all
//! keys are recomputed once, lazily, at the next `refresh`). Inactive clients (and
//! subtrees without active clients) are kept out of the ordered sets, so a walk never
//! steps over them.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::qty::Qty;
use super::roles::{NodeId, RoleTree, ROOT};

/// Index of a client: one (framework, role) pair.
pub(crate) type ClientId = usize;

/// What a visitor wants after being shown a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Show me the next client.
    Next,
    /// Skip the rest of this role's clients.
    RoleDone,
    /// End the walk.
    Stop,
}

/// Receives a walk in fair order.
pub(crate) trait Visitor {
    /// Whether to descend into the subtree of `role`.
    fn enter(&mut self, role: NodeId) -> bool;
    /// A client of `role`, in order.
    fn visit(&mut self, role: NodeId, client: ClientId) -> Flow;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Entry {
    /// The role's own clients.
    Own,
    Child(NodeId),
}

#[derive(Debug)]
struct Node {
    path: Arc<str>,
    parent: Option<NodeId>,
    weight: f64,
    /// Allocations of every client in the subtree (active or not).
    alloc: Qty,
    /// Allocations of the role's own clients.
    own_alloc: Qty,
    /// This node's key in its parent's entries: weighted share of `alloc`.
    key: u64,
    /// The key of the `Own` entry: share of `own_alloc`.
    own_key: u64,
    /// Active children and (when it has active clients) `Own`, in fair order.
    entries: BTreeSet<(u64, Arc<str>, Entry)>,
    /// Active own clients in fair order.
    clients: BTreeSet<(u64, Arc<str>, ClientId)>,
    /// Active clients in the subtree; the node is in its parent's entries iff > 0.
    active: usize,
}

#[derive(Debug)]
struct Client {
    node: NodeId,
    name: Arc<str>,
    alloc: Qty,
    key: u64,
    active: bool,
}

#[derive(Debug)]
pub(crate) struct Sorter {
    nodes: Vec<Node>,
    clients: Vec<Option<Client>>,
    total: Qty,
    /// The total changed: every key is stale until `refresh`.
    dirty: bool,
}

impl Default for Sorter {
    fn default() -> Self {
        let mut s = Sorter {
            nodes: Vec::new(),
            clients: Vec::new(),
            total: Qty::default(),
            dirty: false,
        };
        s.nodes.push(Node::new(Arc::from(""), None));
        s
    }
}

impl Node {
    fn new(path: Arc<str>, parent: Option<NodeId>) -> Self {
        Node {
            path,
            parent,
            weight: 1.0,
            alloc: Qty::default(),
            own_alloc: Qty::default(),
            key: 0,
            own_key: 0,
            entries: BTreeSet::new(),
            clients: BTreeSet::new(),
            active: 0,
        }
    }
}

/// Order-preserving key of a non-negative share.
fn key_of(share: f64) -> u64 {
    share.max(0.0).to_bits()
}

impl Sorter {
    /// Grows to cover every role the tree knows.
    pub fn ensure(&mut self, tree: &RoleTree) {
        for n in self.nodes.len()..tree.len() {
            self.nodes
                .push(Node::new(Arc::from(tree.path(n)), tree.parent(n)));
        }
    }

    pub fn set_total(&mut self, total: &Qty) {
        if *total != self.total {
            self.total = total.clone();
            self.dirty = true;
        }
    }

    /// Dominant share of `q` in the cluster.
    pub fn share(&self, q: &Qty) -> f64 {
        let mut s: f64 = 0.0;
        for (k, v) in q.iter() {
            let t = self.total.get(k);
            if t > 0 {
                s = s.max(v as f64 / t as f64);
            }
        }
        s
    }

    pub fn add_client(&mut self, c: ClientId, node: NodeId, name: &str) {
        if self.clients.len() <= c {
            self.clients.resize_with(c + 1, || None);
        }
        debug_assert!(
            self.clients[c].is_none(),
            "client slot {c} reused while live"
        );
        self.clients[c] = Some(Client {
            node,
            name: Arc::from(name),
            alloc: Qty::default(),
            key: 0,
            active: false,
        });
    }

    pub fn remove_client(&mut self, c: ClientId) {
        self.set_active(c, false);
        let alloc = self.client(c).alloc.clone();
        if !alloc.is_zero() {
            self.add_alloc(c, &alloc, -1);
        }
        self.clients[c] = None;
    }

    fn client(&self, c: ClientId) -> &Client {
        self.clients[c].as_ref().expect("live client")
    }

    /// Active clients are the ones a walk shows (connected, not suppressed).
    pub fn set_active(&mut self, c: ClientId, on: bool) {
        let cl = self.clients[c].as_mut().expect("live client");
        if cl.active == on {
            return;
        }
        cl.active = on;
        let (n, item) = (cl.node, (cl.key, cl.name.clone(), c));
        let node = &mut self.nodes[n];
        if on {
            node.clients.insert(item);
            if node.clients.len() == 1 {
                let own = (node.own_key, node.path.clone(), Entry::Own);
                node.entries.insert(own);
            }
        } else {
            node.clients.remove(&item);
            if node.clients.is_empty() {
                let own = (node.own_key, node.path.clone(), Entry::Own);
                node.entries.remove(&own);
            }
        }
        // Active counts up the tree; a subtree appears in (or leaves) its parent's
        // entries when its count leaves (or reaches) zero.
        let mut m = n;
        loop {
            let node = &mut self.nodes[m];
            let was = node.active;
            node.active = if on { was + 1 } else { was - 1 };
            let parent = node.parent;
            let item = (node.key, node.path.clone(), Entry::Child(m));
            let Some(p) = parent else { break };
            if on && was == 0 {
                self.nodes[p].entries.insert(item);
            } else if !on && was == 1 {
                self.nodes[p].entries.remove(&item);
            }
            m = p;
        }
    }

    /// Adds (`sign` 1) or removes (`sign` -1) `q` to a client's allocation.
    pub fn add_alloc(&mut self, c: ClientId, q: &Qty, sign: i64) {
        let mut signed = Qty::default();
        for (k, v) in q.iter() {
            signed.add_at(k, sign * v);
        }
        // The client within its role.
        let (n, new_key) = {
            let cl = self.clients[c].as_mut().expect("live client");
            cl.alloc.add(&signed);
            (cl.node, cl.alloc.clone())
        };
        let key = key_of(self.share(&new_key));
        let cl = self.clients[c].as_mut().expect("live client");
        if cl.active {
            let node = &mut self.nodes[n];
            node.clients.remove(&(cl.key, cl.name.clone(), c));
            node.clients.insert((key, cl.name.clone(), c));
        }
        cl.key = key;
        // The role's own entry.
        self.nodes[n].own_alloc.add(&signed);
        let own_key = key_of(self.share(&self.nodes[n].own_alloc));
        let node = &mut self.nodes[n];
        if !node.clients.is_empty() {
            node.entries
                .remove(&(node.own_key, node.path.clone(), Entry::Own));
            node.entries
                .insert((own_key, node.path.clone(), Entry::Own));
        }
        node.own_key = own_key;
        // The role and its ancestors among their siblings.
        let mut m = n;
        while m != ROOT {
            self.nodes[m].alloc.add(&signed);
            self.rekey(m);
            m = self.nodes[m].parent.expect("not the root");
        }
    }

    /// Recomputes a node's key and moves it in its parent's entries.
    fn rekey(&mut self, m: NodeId) {
        let node = &self.nodes[m];
        let key = key_of(self.share(&node.alloc) / node.weight);
        if key == node.key {
            return;
        }
        let (old, path, active, parent) = (node.key, node.path.clone(), node.active, node.parent);
        self.nodes[m].key = key;
        if let (true, Some(p)) = (active > 0, parent) {
            let entries = &mut self.nodes[p].entries;
            entries.remove(&(old, path.clone(), Entry::Child(m)));
            entries.insert((key, path, Entry::Child(m)));
        }
    }

    pub fn set_weight(&mut self, n: NodeId, weight: f64) {
        self.nodes[n].weight = weight;
        self.rekey(n);
    }

    /// Recomputes every key after the cluster total changed.
    pub fn refresh(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        for node in &mut self.nodes {
            node.entries.clear();
            node.clients.clear();
        }
        for c in 0..self.clients.len() {
            let Some(cl) = &self.clients[c] else { continue };
            let key = key_of(self.share(&cl.alloc));
            let cl = self.clients[c].as_mut().expect("checked");
            cl.key = key;
            if cl.active {
                self.nodes[cl.node]
                    .clients
                    .insert((key, cl.name.clone(), c));
            }
        }
        for m in 0..self.nodes.len() {
            let node = &self.nodes[m];
            let key = key_of(self.share(&node.alloc) / node.weight);
            let own_key = key_of(self.share(&node.own_alloc));
            let node = &mut self.nodes[m];
            node.key = key;
            node.own_key = own_key;
            if !node.clients.is_empty() {
                let own = (own_key, node.path.clone(), Entry::Own);
                node.entries.insert(own);
            }
        }
        for m in 1..self.nodes.len() {
            let node = &self.nodes[m];
            if node.active > 0 {
                let item = (node.key, node.path.clone(), Entry::Child(m));
                let p = node.parent.expect("not the root");
                self.nodes[p].entries.insert(item);
            }
        }
    }

    /// Shows every active client in fair order (see the module comment).
    pub fn walk(&self, v: &mut impl Visitor) {
        self.walk_from(ROOT, v);
    }

    /// Returns true when the visitor stopped the walk.
    fn walk_from(&self, n: NodeId, v: &mut impl Visitor) -> bool {
        for (_, _, e) in &self.nodes[n].entries {
            match *e {
                Entry::Own => {
                    for &(_, _, c) in &self.nodes[n].clients {
                        match v.visit(n, c) {
                            Flow::Next => {}
                            Flow::RoleDone => break,
                            Flow::Stop => return true,
                        }
                    }
                }
                Entry::Child(ch) => {
                    if v.enter(ch) && self.walk_from(ch, v) {
                        return true;
                    }
                }
            }
        }
        false
    }

    /// A role's active clients, in fair order.
    pub fn clients_of(&self, n: NodeId) -> impl Iterator<Item = ClientId> + '_ {
        self.nodes[n].clients.iter().map(|(_, _, c)| *c)
    }

    /// Roles with at least one active client.
    pub fn active_roles(&self) -> Vec<NodeId> {
        (1..self.nodes.len())
            .filter(|&n| !self.nodes[n].clients.is_empty())
            .collect()
    }

    /// A role's weighted share (of its subtree), as an order-preserving key.
    pub fn role_key(&self, n: NodeId) -> (u64, Arc<str>) {
        (self.nodes[n].key, self.nodes[n].path.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Collect(Vec<ClientId>);

    impl Visitor for Collect {
        fn enter(&mut self, _: NodeId) -> bool {
            true
        }
        fn visit(&mut self, _: NodeId, c: ClientId) -> Flow {
            self.0.push(c);
            Flow::Next
        }
    }

    fn order(s: &Sorter) -> Vec<ClientId> {
        let mut v = Collect(Vec::new());
        s.walk(&mut v);
        v.0
    }

    fn q(cpus: i64) -> Qty {
        let mut q = Qty::default();
        q.add_at(0, cpus);
        q
    }

    #[test]
    fn siblings_compare_weighted_subtree_shares() {
        let mut t = RoleTree::default();
        let (web, batch, ops) = (t.intern("eng/web"), t.intern("eng/batch"), t.intern("ops"));
        let mut s = Sorter::default();
        s.ensure(&t);
        s.set_total(&q(100));
        s.refresh();
        for (c, n, name) in [(0, web, "w"), (1, batch, "b"), (2, ops, "o")] {
            s.add_client(c, n, name);
            s.set_active(c, true);
        }
        // Ties go by role path: eng (eng/batch, eng/web) before ops.
        assert_eq!(order(&s), vec![1, 0, 2]);
        // eng/web's 10 counts for eng as a whole: ops (0) goes first, then eng's
        // children by their own shares.
        s.add_alloc(0, &q(10), 1);
        assert_eq!(order(&s), vec![2, 1, 0]);
        s.add_alloc(2, &q(15), 1);
        assert_eq!(order(&s), vec![1, 0, 2]);
        // Weight 2 on ops halves its share: 15/2 < 10.
        s.set_weight(ops, 2.0);
        assert_eq!(order(&s), vec![2, 1, 0]);
        // Inactive clients are not shown; a new total re-keys everything.
        s.set_active(1, false);
        s.set_total(&q(1000));
        s.refresh();
        assert_eq!(order(&s), vec![2, 0]);
        s.remove_client(2);
        assert_eq!(order(&s), vec![0]);
    }
}
