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

/// Every tenant's view, and where to ask each tenant actor to pause; cheap to clone.
#[derive(Clone, Default)]
pub struct Board(Arc<DashMap<Arc<str>, View>>, Arc<DashMap<String, Recipient<Hold>>>);

impl Board {
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
