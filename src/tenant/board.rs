//! What each tenant actor shows of itself to the outside (the gRPC `TenantService`):
//! its health, its pace and the outcomes of its events on this member. Written by the
//! tenant actors when these change, read at any time.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::Recipient;
use dashmap::DashMap;

use super::Hold;

/// One tenant as shown.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    /// closed, open, half_open, auth_failed or paused.
    pub state: &'static str,
    pub pace_per_sec: f64,
    pub max_concurrency: usize,
    pub outcomes: BTreeMap<&'static str, u64>,
}

/// Who paused a tenant: an operator with the admin token, or the tenant's own token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PausedBy {
    Admin,
    Tenant,
}

impl PausedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            PausedBy::Admin => "admin",
            PausedBy::Tenant => "tenant",
        }
    }

    pub fn parse(s: &str) -> Option<PausedBy> {
        match s {
            "admin" => Some(PausedBy::Admin),
            "tenant" => Some(PausedBy::Tenant),
            _ => None,
        }
    }
}

/// Every tenant's view, where to ask each tenant actor to follow its pause flags, and
/// those flags (see `tenant::pauses`); cheap to clone.
#[derive(Clone, Default)]
pub struct Board(
    Arc<DashMap<Arc<str>, View>>,
    Arc<DashMap<String, Recipient<Hold>>>,
    Arc<DashMap<(String, PausedBy), bool>>,
);

impl Board {
    /// Sets one of `tenant`'s pause flags; returns whether the tenant's paused state
    /// (either flag set) changed.
    pub fn set_paused(&self, tenant: &str, by: PausedBy, paused: bool) -> bool {
        let before = self.paused(tenant);
        if paused {
            self.2.insert((tenant.to_string(), by), true);
        } else {
            self.2.remove(&(tenant.to_string(), by));
        }
        before != self.paused(tenant)
    }

    /// Whether `tenant` is paused by `by`.
    pub fn paused_by(&self, tenant: &str, by: PausedBy) -> bool {
        self.2.contains_key(&(tenant.to_string(), by))
    }

    /// Whether `tenant` is paused (by either).
    pub fn paused(&self, tenant: &str) -> bool {
        self.paused_by(tenant, PausedBy::Admin) || self.paused_by(tenant, PausedBy::Tenant)
    }

    /// Where `tenant`'s actor takes pause and resume requests.
    pub fn register(&self, tenant: &str, actor: Recipient<Hold>) {
        self.1.insert(tenant.to_string(), actor);
    }

    /// Where to send `tenant`'s actor a [`Hold`], if it has one on this member.
    pub fn actor(&self, tenant: &str) -> Option<Recipient<Hold>> {
        self.1.get(tenant).map(|a| a.clone())
    }

    pub fn state(&self, tenant: &Arc<str>, state: &'static str) {
        self.0.entry(tenant.clone()).or_default().state = state;
    }

    pub fn pace(&self, tenant: &Arc<str>, per_sec: f64, concurrency: usize) {
        let mut view = self.0.entry(tenant.clone()).or_default();
        view.pace_per_sec = per_sec;
        view.max_concurrency = concurrency;
    }

    pub fn outcome(&self, tenant: &Arc<str>, outcome: &'static str) {
        *self
            .0
            .entry(tenant.clone())
            .or_default()
            .outcomes
            .entry(outcome)
            .or_default() += 1;
    }

    pub fn get(&self, tenant: &str) -> Option<View> {
        self.0.get(tenant).map(|v| v.clone())
    }
}
