//! The source's view of the ZooKeeper tree: service node name -> instance node name -> what
//! that node said. Instances of a service are kept in a sorted vector, not a tree map: at
//! 200,000 instances that is half the memory, and a service's instances change a few at a time.

use std::collections::BTreeMap;

use crate::service::Backend;

/// One instance node as last read. The zxid of its last modification stands in for the data,
/// so an unchanged node is not parsed (or logged) again; `host-port` nodes, read by name, use 0.
#[derive(Debug, Clone)]
pub(super) struct Instance {
    pub(super) mzxid: i64,
    pub(super) backend: Option<Backend>,
}

/// An instance node's data and the zxid of its last modification.
pub(super) type Data = (Vec<u8>, i64);

#[derive(Debug, Default)]
pub(super) struct Tree {
    pub(super) services: BTreeMap<String, Instances>,
}

/// A service's instances by node name, sorted by it.
#[derive(Debug, Default)]
pub(super) struct Instances(Vec<(Box<str>, Instance)>);

impl Instances {
    fn find(&self, child: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(c, _)| (**c).cmp(child))
    }

    pub(super) fn get(&self, child: &str) -> Option<&Instance> {
        self.find(child).ok().map(|i| &self.0[i].1)
    }

    pub(super) fn contains_key(&self, child: &str) -> bool {
        self.find(child).is_ok()
    }

    pub(super) fn insert(&mut self, child: String, instance: Instance) {
        match self.find(&child) {
            Ok(i) => self.0[i].1 = instance,
            Err(i) => self.0.insert(i, (child.into_boxed_str(), instance)),
        }
    }

    pub(super) fn remove(&mut self, child: &str) {
        if let Ok(i) = self.find(child) {
            self.0.remove(i);
        }
    }

    pub(super) fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.0.retain(|(c, _)| keep(c));
    }

    /// The instances, in node-name order.
    pub(super) fn values(&self) -> impl Iterator<Item = &Instance> {
        self.0.iter().map(|(_, i)| i)
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}

impl From<Vec<(String, Instance)>> for Instances {
    /// Instances read in any order (a node name appears once: they are a node's children).
    fn from(read: Vec<(String, Instance)>) -> Self {
        let mut v: Vec<(Box<str>, Instance)> = read
            .into_iter()
            .map(|(c, i)| (c.into_boxed_str(), i))
            .collect();
        v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        v.dedup_by(|a, b| a.0 == b.0);
        v.shrink_to_fit();
        Self(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(mzxid: i64) -> Instance {
        Instance {
            mzxid,
            backend: None,
        }
    }

    #[test]
    fn instances_stay_sorted_by_node_name_through_every_change() {
        let mut m = Instances::from(vec![
            ("m3".to_string(), inst(3)),
            ("m1".to_string(), inst(1)),
            ("m2".to_string(), inst(2)),
        ]);
        let order = |m: &Instances| m.values().map(|i| i.mzxid).collect::<Vec<_>>();
        assert_eq!(order(&m), [1, 2, 3]);
        m.insert("m0".into(), inst(0));
        m.insert("m2".into(), inst(22));
        assert_eq!(order(&m), [0, 1, 22, 3]);
        assert_eq!(m.get("m2").map(|i| i.mzxid), Some(22));
        assert!(m.contains_key("m0") && !m.contains_key("m9"));
        m.remove("m1");
        m.remove("m9");
        m.retain(|c| c != "m3");
        assert_eq!(order(&m), [0, 22]);
        assert_eq!(m.len(), 2);
    }
}
