//! One dataplane per address family behind one [`Dataplane`].
//!
//! Some kernels' interfaces are per family: `iptables` programs IPv4 and `ip6tables` IPv6,
//! each with its own tables. A dual-stack node then runs one backend per family, and
//! [`DualStack`] presents them as one to the agent: every sync goes to both, each member
//! renders only its own family's part of the plan, and one family's failure never keeps
//! the other from being programmed (the error names the family; the agent's next sync is a
//! full resync of both). Backends that handle both families in one interface (IPVS over
//! netlink, the userspace datapath) do not need it.
//!
//! ```
//! use svcnat_core::dualstack::DualStack;
//! use svcnat_core::model::IpFamily;
//! use svcnat_core::plan::{Dataplane, NodeContext, Plan, PlanDiff, SyncReport};
//!
//! #[derive(Default)]
//! struct Count(usize);
//! impl Dataplane for Count {
//!     type Error = std::io::Error;
//!     fn sync(&mut self, p: &Plan, _: &PlanDiff) -> Result<SyncReport, Self::Error> {
//!         self.resync(p)
//!     }
//!     fn resync(&mut self, p: &Plan) -> Result<SyncReport, Self::Error> {
//!         self.0 += 1;
//!         Ok(SyncReport::of_plan(p, true, 1))
//!     }
//!     fn cleanup(&mut self) -> Result<(), Self::Error> {
//!         Ok(())
//!     }
//! }
//!
//! let mut both = DualStack::new(Count::default(), Count::default());
//! let report = both.resync(&Plan::empty(NodeContext::new("n", Vec::new(), Vec::new()))).unwrap();
//! assert_eq!(report.written, 2);
//! assert_eq!(both.member(IpFamily::V6).map(|c| c.0), Some(1));
//! ```

use crate::model::IpFamily;
use crate::plan::{Dataplane, Plan, PlanDiff, SyncReport};

/// A dataplane per address family, synced together (kube-proxy's "meta proxier").
#[derive(Debug)]
pub struct DualStack<D> {
    v4: Option<D>,
    v6: Option<D>,
}

/// A member's error, with the family it programs.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", family_name(*.family))]
pub struct FamilyError<E: std::error::Error + 'static> {
    /// The family whose dataplane failed.
    pub family: IpFamily,
    /// What it said.
    #[source]
    pub source: E,
}

fn family_name(f: IpFamily) -> &'static str {
    match f {
        IpFamily::V4 => "IPv4",
        IpFamily::V6 => "IPv6",
    }
}

impl<D> DualStack<D> {
    /// Both families.
    pub fn new(v4: D, v6: D) -> DualStack<D> {
        DualStack {
            v4: Some(v4),
            v6: Some(v6),
        }
    }

    /// One family only (the other is not programmed at all).
    pub fn single(family: IpFamily, d: D) -> DualStack<D> {
        match family {
            IpFamily::V4 => DualStack {
                v4: Some(d),
                v6: None,
            },
            IpFamily::V6 => DualStack {
                v4: None,
                v6: Some(d),
            },
        }
    }

    /// The families programmed, IPv4 first.
    pub fn families(&self) -> Vec<IpFamily> {
        self.members().map(|(f, _)| f).collect()
    }

    /// The member programming `family`, if there is one.
    pub fn member(&self, family: IpFamily) -> Option<&D> {
        match family {
            IpFamily::V4 => self.v4.as_ref(),
            IpFamily::V6 => self.v6.as_ref(),
        }
    }

    fn members(&self) -> impl Iterator<Item = (IpFamily, &D)> {
        [(IpFamily::V4, &self.v4), (IpFamily::V6, &self.v6)]
            .into_iter()
            .filter_map(|(f, d)| d.as_ref().map(|d| (f, d)))
    }

    fn members_mut(&mut self) -> impl Iterator<Item = (IpFamily, &mut D)> {
        [(IpFamily::V4, &mut self.v4), (IpFamily::V6, &mut self.v6)]
            .into_iter()
            .filter_map(|(f, d)| d.as_mut().map(|d| (f, d)))
    }

    /// Runs `op` on every member, all of them even when one fails; the merged result, or
    /// the first failure.
    fn each<T, E: std::error::Error + 'static>(
        &mut self,
        mut op: impl FnMut(&mut D) -> Result<T, E>,
        merge: impl Fn(T, T) -> T,
    ) -> Result<Option<T>, FamilyError<E>> {
        let mut out: Option<T> = None;
        let mut failed = None;
        for (family, d) in self.members_mut() {
            match op(d) {
                Ok(v) => {
                    out = Some(match out.take() {
                        Some(prev) => merge(prev, v),
                        None => v,
                    })
                }
                Err(source) => {
                    failed.get_or_insert(FamilyError { family, source });
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

/// Two members' reports as one: counts of work add up, the plan's frontends and endpoints
/// (each member counts what it programmed of the plan) are the larger of the two.
fn merge(a: SyncReport, b: SyncReport) -> SyncReport {
    let mut out = SyncReport::new(
        a.full || b.full,
        a.written + b.written,
        a.frontends.max(b.frontends),
        a.endpoints.max(b.endpoints),
    );
    out.conntrack_deleted = a.conntrack_deleted + b.conntrack_deleted;
    out.conntrack_errors = a.conntrack_errors;
    out.conntrack_errors.extend(b.conntrack_errors);
    out.warnings = a.warnings;
    out.warnings.extend(b.warnings);
    out
}

impl<D: Dataplane> Dataplane for DualStack<D> {
    type Error = FamilyError<D::Error>;

    fn sync(&mut self, plan: &Plan, diff: &PlanDiff) -> Result<SyncReport, Self::Error> {
        let report = self.each(|d| d.sync(plan, diff), merge)?;
        Ok(report.unwrap_or_else(|| SyncReport::new(false, 0, 0, 0)))
    }

    fn resync(&mut self, plan: &Plan) -> Result<SyncReport, Self::Error> {
        let report = self.each(|d| d.resync(plan), merge)?;
        Ok(report.unwrap_or_else(|| SyncReport::new(true, 0, 0, 0)))
    }

    fn cleanup(&mut self) -> Result<(), Self::Error> {
        self.each(|d| d.cleanup(), |(), ()| ())?;
        Ok(())
    }

    /// Either member drifted (both are asked, so each keeps its own check schedule).
    fn drifted(&mut self) -> Result<bool, Self::Error> {
        Ok(self.each(|d| d.drifted(), |a, b| a || b)?.unwrap_or(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::NodeContext;

    #[derive(Debug, thiserror::Error)]
    #[error("broken")]
    struct Broken;

    #[derive(Default)]
    struct Fake {
        fail: bool,
        synced: usize,
        drift: bool,
    }

    impl Dataplane for Fake {
        type Error = Broken;
        fn sync(&mut self, plan: &Plan, _diff: &PlanDiff) -> Result<SyncReport, Broken> {
            self.resync(plan)
        }
        fn resync(&mut self, plan: &Plan) -> Result<SyncReport, Broken> {
            self.synced += 1;
            if self.fail {
                return Err(Broken);
            }
            let mut r = SyncReport::of_plan(plan, false, 3);
            r.conntrack_deleted = 1;
            Ok(r)
        }
        fn cleanup(&mut self) -> Result<(), Broken> {
            Ok(())
        }
        fn drifted(&mut self) -> Result<bool, Broken> {
            Ok(self.drift)
        }
    }

    #[test]
    fn both_families_are_synced_and_reports_merge() {
        let mut d = DualStack::new(Fake::default(), Fake::default());
        let r = d
            .resync(&Plan::empty(NodeContext::new("n", Vec::new(), Vec::new())))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.written, r.conntrack_deleted), (6, 2));
        assert_eq!(d.families(), [IpFamily::V4, IpFamily::V6]);
    }

    #[test]
    fn one_family_failing_still_programs_the_other_and_is_named() {
        let v4 = Fake {
            fail: true,
            ..Fake::default()
        };
        let mut d = DualStack::new(v4, Fake::default());
        let e = match d.resync(&Plan::empty(NodeContext::new("n", Vec::new(), Vec::new()))) {
            Err(e) => e,
            Ok(_) => panic!("a failed member must fail the sync"),
        };
        assert_eq!(e.family, IpFamily::V4);
        assert_eq!(e.to_string(), "IPv4: broken");
        assert_eq!(d.member(IpFamily::V6).map(|f| f.synced), Some(1));
    }

    #[test]
    fn drift_of_either_member_counts() {
        let v6 = Fake {
            drift: true,
            ..Fake::default()
        };
        let mut d = DualStack::new(Fake::default(), v6);
        assert!(d.drifted().unwrap_or(false));
        let mut one = DualStack::single(IpFamily::V4, Fake::default());
        assert!(!one.drifted().unwrap_or(true));
        assert_eq!(one.families(), [IpFamily::V4]);
    }
}
