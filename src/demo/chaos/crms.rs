//! The chaos harness's CRM side: one tenant on each CRM plus a slow one, each on its own
//! in-process sandbox, with the faults the chaos phase injects — 5xx, row locks and
//! expiring tokens all along; 429 storms, bursts of 5xx and latency spikes at random
//! moments.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;

use super::ChaosError;
use crate::sandbox::common::Faults;
use crate::sandbox::dynamics::{DynamicsSandbox, DynamicsSetup};
use crate::sandbox::salesforce::{SalesforceSandbox, SandboxOrg};
use crate::sandbox::zendesk::{ZendeskSandbox, ZendeskSetup};
use crate::sandbox::CrmSandbox;

const CLIENT_ID: &str = "chaos-client";

/// Latency of the slow tenant's CRM on every call: well below the session timeout, so a
/// write sent by a member that is then killed lands before another member can take its
/// partition over.
pub const SLOW_LATENCY_MS: u64 = 250;

/// A tenant of the chaos run and the sandbox standing in for its CRM.
pub struct Tenant {
    pub name: &'static str,
    pub sandbox: Box<dyn CrmSandbox>,
    /// Environment variable the members read the tenant's secret from.
    pub secret_var: &'static str,
    /// Entities the workload spreads this tenant's records over.
    pub entities: &'static [&'static str],
    /// `[[tenants]]` keys that come before the CRM section.
    settings: &'static str,
    /// Entity mappings beyond the sandbox's own `contact`.
    extra_entities: &'static str,
    /// Faults while the chaos lasts.
    chaos_faults: Faults,
    /// Faults once it is over: none, but a slow tenant stays slow.
    calm_faults: Faults,
    /// Until when a latency spike lasts.
    spike_until: Option<Instant>,
}

/// A fault injected at a random moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// The next requests answered with the CRM's throttle (429 with `Retry-After`, or
    /// Salesforce's `REQUEST_LIMIT_EXCEEDED`).
    ThrottleStorm,
    /// The next requests answered with a 5xx.
    ServerErrorBurst,
    /// Every call answered up to a second later, for a few seconds.
    LatencySpike,
    /// Every issued token stops working.
    TokenExpiry,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::ThrottleStorm => "429 storms",
            FaultKind::ServerErrorBurst => "5xx bursts",
            FaultKind::LatencySpike => "latency spikes",
            FaultKind::TokenExpiry => "token expiries",
        }
    }
}

const FAST_SETTINGS: &str =
    "rate_limit_per_sec = 2000\nmax_concurrency = 8\nrequest_timeout_ms = 5000\nbatch_size = 50\n";
const SLOW_SETTINGS: &str =
    "rate_limit_per_sec = 2000\nmax_concurrency = 2\nrequest_timeout_ms = 5000\nbatch_size = 20\n";

/// Starts the four tenants' sandboxes: `acme` on Salesforce, `globex` on Zendesk,
/// `initech` on Dynamics 365, and `slowco` on a Salesforce that answers every call
/// after [`SLOW_LATENCY_MS`].
pub fn start(secret: &str, seed: u64) -> Result<Vec<Tenant>, ChaosError> {
    let started = |e: std::io::Error| ChaosError::Setup(format!("starting a CRM sandbox: {e}"));
    let salesforce = |faults: &Faults| -> Result<Box<dyn CrmSandbox>, ChaosError> {
        let mut org = SandboxOrg::standard(CLIENT_ID, secret);
        org.faults = faults.clone();
        Ok(Box::new(SalesforceSandbox::start("127.0.0.1:0", org).map_err(started)?))
    };

    let acme = Faults {
        server_error_rate: 0.03,
        lock_error_rate: 0.03,
        token_lifetime_ms: Some(2_000),
        seed,
        ..Faults::default()
    };
    let globex = Faults {
        server_error_rate: 0.03,
        token_lifetime_ms: Some(3_000),
        retry_after_secs: 1,
        seed: seed.wrapping_add(1),
        ..Faults::default()
    };
    let initech = Faults {
        server_error_rate: 0.03,
        token_lifetime_ms: Some(2_500),
        retry_after_secs: 1,
        seed: seed.wrapping_add(2),
        ..Faults::default()
    };
    let slowco = Faults {
        latency_ms: SLOW_LATENCY_MS,
        server_error_rate: 0.02,
        lock_error_rate: 0.02,
        seed: seed.wrapping_add(3),
        ..Faults::default()
    };

    let mut zendesk = ZendeskSetup::standard(CLIENT_ID, secret);
    zendesk.job_duration_ms = 30;
    zendesk.faults = globex.clone();
    let mut dynamics = DynamicsSetup::standard(CLIENT_ID, secret);
    dynamics.faults = initech.clone();

    Ok(vec![
        Tenant {
            name: "acme",
            sandbox: salesforce(&acme)?,
            secret_var: "CHAOS_ACME_SECRET",
            entities: &["contact", "account"],
            settings: FAST_SETTINGS,
            extra_entities: "[tenants.entities.account]\nobject = \"Account\"\nexternal_id_field = \"External_Id__c\"\nfields = { Name = \"name\", Industry = \"industry\", NumberOfEmployees = \"employees\" }\n",
            chaos_faults: acme,
            calm_faults: Faults::default(),
            spike_until: None,
        },
        Tenant {
            name: "globex",
            sandbox: Box::new(ZendeskSandbox::start("127.0.0.1:0", zendesk).map_err(started)?),
            secret_var: "CHAOS_GLOBEX_SECRET",
            entities: &["contact", "ticket"],
            settings: FAST_SETTINGS,
            extra_entities: "[tenants.entities.ticket]\nobject = \"tickets\"\nexternal_id_field = \"external_id\"\nfields = { subject = \"subject\", priority = \"priority\", description = \"description\" }\n",
            chaos_faults: globex,
            calm_faults: Faults::default(),
            spike_until: None,
        },
        Tenant {
            name: "initech",
            sandbox: Box::new(DynamicsSandbox::start("127.0.0.1:0", dynamics).map_err(started)?),
            secret_var: "CHAOS_INITECH_SECRET",
            entities: &["contact"],
            settings: FAST_SETTINGS,
            extra_entities: "",
            chaos_faults: initech,
            calm_faults: Faults::default(),
            spike_until: None,
        },
        Tenant {
            name: "slowco",
            sandbox: salesforce(&slowco)?,
            secret_var: "CHAOS_SLOWCO_SECRET",
            entities: &["contact"],
            settings: SLOW_SETTINGS,
            extra_entities: "",
            chaos_faults: slowco,
            calm_faults: Faults {
                latency_ms: SLOW_LATENCY_MS,
                ..Faults::default()
            },
            spike_until: None,
        },
    ])
}

impl Tenant {
    /// The tenant's `[[tenants]]` block.
    pub fn toml(&self) -> String {
        format!(
            "[[tenants]]\nname = \"{}\"\n{}{}{}",
            self.name,
            self.settings,
            self.sandbox.tenant_toml(self.secret_var),
            self.extra_entities
        )
    }

    /// Injects `kind` now; returns a description for the progress log.
    pub fn inject(&mut self, kind: FaultKind, rng: &mut StdRng) -> String {
        match kind {
            FaultKind::ThrottleStorm => {
                let n = rng.gen_range(3..12);
                self.sandbox.script_throttles(n);
                format!("{n} throttles")
            }
            FaultKind::ServerErrorBurst => {
                // For a while, not for a number of calls: a tenant whose breaker opens
                // makes few calls, and a count-bounded burst would last as long as its
                // probes take to use it up.
                let lasts = Duration::from_millis(rng.gen_range(500..2_500));
                self.sandbox.set_faults(Faults {
                    server_error_rate: 1.0,
                    ..self.chaos_faults.clone()
                });
                self.spike_until = Some(Instant::now() + lasts);
                format!("every call 5xx for {:.1} s", lasts.as_secs_f64())
            }
            FaultKind::LatencySpike => {
                let extra = rng.gen_range(300..1_000);
                let lasts = Duration::from_millis(rng.gen_range(1_000..3_000));
                self.sandbox.set_faults(Faults {
                    latency_ms: self.chaos_faults.latency_ms + extra,
                    ..self.chaos_faults.clone()
                });
                self.spike_until = Some(Instant::now() + lasts);
                format!("+{extra} ms latency for {:.1} s", lasts.as_secs_f64())
            }
            FaultKind::TokenExpiry => {
                self.sandbox.expire_tokens();
                "tokens expired".into()
            }
        }
    }

    /// Ends a latency spike or a 5xx burst that has run its course.
    pub fn end_spike_if_due(&mut self, now: Instant) {
        if self.spike_until.is_some_and(|until| now >= until) {
            self.spike_until = None;
            self.sandbox.set_faults(self.chaos_faults.clone());
        }
    }

    /// The chaos is over: no more injected faults (scripted answers already queued are
    /// still served).
    pub fn calm(&mut self) {
        self.spike_until = None;
        self.sandbox.set_faults(self.calm_faults.clone());
    }

    /// The chaos faults, for the summary.
    pub fn describe_faults(&self) -> String {
        self.chaos_faults.describe()
    }
}
