//! The gRPC interface against the real server: status of a record from any member,
//! outcomes watched as they happen, tenants, health and reflection, and the token check
//! on every call.

// tonic's `Status` is the error of every gRPC call and interceptor, large as it is.
#![allow(clippy::result_large_err)]

mod common;

use std::time::Duration;

use common::*;
use crm_sync::config::Config;
use crm_sync::consume::StopMode;
use crm_sync::grpc::pb;
use crm_sync::grpc::pb::status_service_client::StatusServiceClient;
use crm_sync::grpc::pb::tenant_service_client::TenantServiceClient;
use crm_sync::pipeline;
use crm_sync::sandbox::common::Faults;
use crm_sync::sandbox::kafka::tools;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const WAIT: Duration = Duration::from_secs(60);
const ADMIN: &str = "admin-token-never-logged";
const ACME: &str = "acme-token-never-logged";

fn config(env: &Env, status: &str, group: &str) -> Config {
    let text = env.config_toml().replace(
        &format!("group_id = \"{}\"", env.group),
        &format!("group_id = \"{group}\""),
    )
        + "\n[grpc]\naddr = \"127.0.0.1:0\"\nadmin_token = \"${ADMIN}\"\n[grpc.tenant_tokens]\nacme = \"${ACME}\"\n";
    let mut config = Config::from_toml_with_env(&text, |v| match v {
        "ADMIN" => Some(ADMIN.into()),
        "ACME" => Some(ACME.into()),
        _ => Some(CLIENT_SECRET.into()),
    })
    .unwrap();
    config.kafka.status_topic = Some(status.to_string());
    config
}

/// One runtime for the whole test: a channel lives on the runtime it was made on.
fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap()
        })
        .block_on(f)
}

/// Adds the caller's token to each request.
type AddToken = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;
type Authed = InterceptedService<Channel, AddToken>;

fn channel(addr: std::net::SocketAddr) -> Channel {
    run(Channel::from_shared(format!("http://{addr}")).unwrap().connect()).unwrap()
}

fn with_token(token: Option<&str>) -> AddToken {
    let token = token.map(|t| MetadataValue::try_from(format!("Bearer {t}")).unwrap());
    Box::new(move |mut r: Request<()>| {
        if let Some(t) = &token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        Ok(r)
    })
}

fn status_client(addr: std::net::SocketAddr, token: Option<&str>) -> StatusServiceClient<Authed> {
    StatusServiceClient::with_interceptor(channel(addr), with_token(token))
}

fn tenant_client(addr: std::net::SocketAddr, token: Option<&str>) -> TenantServiceClient<Authed> {
    TenantServiceClient::with_interceptor(channel(addr), with_token(token))
}

fn ask(addr: std::net::SocketAddr, token: &str, key: &str) -> Result<pb::RecordStatus, Status> {
    let mut c = status_client(addr, Some(token));
    run(c.get_record_status(pb::GetRecordStatusRequest {
        tenant: "acme".into(),
        entity: "contact".into(),
        key: key.into(),
    }))
    .map(|r| r.into_inner())
}

#[test]
fn any_member_answers_for_any_record_and_every_call_checks_its_token() {
    let env = Env::new(1);
    let status = unique("status");
    env.kafka.as_ref().unwrap().create_topic(&status, 2).unwrap();
    env.sf.set_faults(Faults {
        rejected_keys: vec!["G-BAD".into()],
        ..Faults::default()
    });
    let first = pipeline::start(config(&env, &status, &env.group)).unwrap();
    let a = first.grpc_addr().expect("[grpc] is configured");
    // A watcher of acme's outcomes, from before they happen.
    let mut watch = run(status_client(a, Some(ACME)).watch_outcomes(pb::WatchOutcomesRequest {
        tenant: "acme".into(),
        statuses: vec!["delivered".into()],
        entity: String::new(),
    }))
    .unwrap()
    .into_inner();
    env.produce(&[
        upsert("g1", "G-1", 1, "Grace", "Hopper"),
        upsert("g2", "G-1", 2, "Grace", "Brewster Hopper"),
        upsert("gb", "G-BAD", 1, "Bad", "Record"),
    ]);
    assert!(wait_until(WAIT, || ask(a, ACME, "G-1").is_ok_and(|s| s.version == 2)));
    let s = ask(a, ACME, "G-1").unwrap();
    assert_eq!((s.status.as_str(), s.event_id.as_str()), ("delivered", "g2"));
    assert_eq!(s.source.unwrap().topic, env.topic);
    assert!(wait_until(WAIT, || ask(a, ACME, "G-BAD").is_ok()));
    let bad = ask(a, ACME, "G-BAD").unwrap();
    assert_eq!(
        (bad.status.as_str(), bad.error_code.as_str()),
        ("dead_lettered", "crm_validation")
    );
    assert_eq!(ask(a, ACME, "NEVER").unwrap_err().code(), Code::NotFound);

    // The watcher saw the delivery, and only deliveries.
    let seen = run(async {
        tokio::time::timeout(WAIT, watch.message())
            .await
            .expect("an outcome within a minute")
    })
    .unwrap()
    .unwrap();
    match seen.kind {
        Some(pb::watch_outcomes_response::Kind::Outcome(o)) => {
            assert_eq!((o.tenant.as_str(), o.status.as_str()), ("acme", "delivered"))
        }
        other => panic!("{other:?}"),
    }

    // A second member of the group, which owns no partition (the only one is taken),
    // answers for records it never processed.
    let second = pipeline::start(config(&env, &status, &env.group)).unwrap();
    let b = second.grpc_addr().unwrap();
    assert!(wait_until(WAIT, || ask(b, ADMIN, "G-1").is_ok_and(|s| s.version == 2)));
    assert_eq!(second.assigned_partitions(), 0, "the second member processed nothing");

    // Tokens: none, unknown, another tenant's record, another tenant's watch.
    let code = |r: Result<pb::RecordStatus, Status>| r.unwrap_err().code();
    let mut anonymous = status_client(a, None);
    let request = pb::GetRecordStatusRequest {
        tenant: "acme".into(),
        entity: "contact".into(),
        key: "G-1".into(),
    };
    assert_eq!(
        code(run(anonymous.get_record_status(request.clone())).map(|r| r.into_inner())),
        Code::Unauthenticated
    );
    assert_eq!(code(ask(a, "not-a-token", "G-1")), Code::Unauthenticated);
    let mut acme = status_client(a, Some(ACME));
    let other = pb::GetRecordStatusRequest {
        tenant: "globex".into(),
        ..request
    };
    assert_eq!(
        code(run(acme.get_record_status(other)).map(|r| r.into_inner())),
        Code::PermissionDenied
    );
    let everyone = run(acme.watch_outcomes(pb::WatchOutcomesRequest::default()))
        .map(|_| ())
        .unwrap_err();
    assert_eq!(everyone.code(), Code::PermissionDenied);

    // Tenants: a tenant's token sees itself; the admin sees all.
    let listed = run(tenant_client(a, Some(ACME)).list_tenants(pb::ListTenantsRequest {}))
        .unwrap()
        .into_inner()
        .tenants;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].name.as_str(),
            listed[0].crm.as_str(),
            listed[0].state.as_str()
        ),
        ("acme", "salesforce", "closed")
    );
    assert!(
        listed[0].outcomes.get("delivered").copied().unwrap_or(0) >= 1,
        "{:?}",
        listed[0].outcomes
    );
    let denied = run(tenant_client(a, Some(ACME)).get_tenant(pb::GetTenantRequest {
        tenant: "globex".into(),
    }));
    assert_eq!(denied.unwrap_err().code(), Code::PermissionDenied);
    let admin = run(tenant_client(a, Some(ADMIN)).get_tenant(pb::GetTenantRequest { tenant: "acme".into() }));
    assert!(admin.unwrap().into_inner().pace_per_sec > 0.0);

    // Standard health checking and reflection, without a token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(a));
    let serving = run(health.check(tonic_health::pb::HealthCheckRequest {
        service: "crmsync.v1.StatusService".into(),
    }))
    .unwrap()
    .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // A client in another language, its stubs generated from proto/ (Python's grpcio).
    let python = |token: &str, tenant: &str| {
        let root = env!("CARGO_MANIFEST_DIR");
        std::process::Command::new("python3")
            .arg(format!("{root}/tests/support/grpc_client.py"))
            .args([
                &format!("{root}/proto"),
                &a.to_string(),
                token,
                tenant,
                "contact",
                "G-1",
            ])
            .env("PYTHONPATH", common::webhooks::python_path())
            .output()
            .unwrap()
    };
    let out = python(ACME, "acme");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["status"]["status"], "delivered");
    assert_eq!(answer["status"]["version"], 2);
    assert_eq!(answer["tenants"], serde_json::json!(["acme"]));
    let out = python(ACME, "globex");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("PERMISSION_DENIED"));

    // The command line a support engineer uses.
    let cli = |token: &str, args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_crm-sync"))
            .args(args)
            .args(["--addr", &b.to_string()])
            .env("CRM_SYNC_TOKEN", token)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, said, _) = cli(
        ACME,
        &["status", "--tenant", "acme", "--entity", "contact", "--key", "G-1"],
    );
    assert!(
        ok && said.contains("acme/contact/G-1: delivered (version 2, event g2"),
        "{said}"
    );
    let (ok, said, _) = cli(
        ACME,
        &["status", "--tenant", "acme", "--entity", "contact", "--key", "G-BAD"],
    );
    assert!(
        ok && said.contains("dead_lettered") && said.contains("crm_validation"),
        "{said}"
    );
    let (ok, _, err) = cli(
        ACME,
        &["status", "--tenant", "globex", "--entity", "contact", "--key", "G-1"],
    );
    assert!(!ok && err.contains("PermissionDenied"), "{err}");
    let (ok, said, _) = cli(ADMIN, &["tenants"]);
    assert!(ok && said.starts_with("acme") && said.contains("salesforce"), "{said}");

    second.stop(StopMode::Graceful);
    first.stop(StopMode::Graceful);
}

/// A gRPC address that cannot be had stops the start, before anything is consumed.
#[test]
fn a_grpc_address_in_use_stops_the_start() {
    let env = Env::new(1);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = config(&env, &unique("status"), &env.group);
    config.grpc.as_mut().unwrap().addr = taken.local_addr().unwrap().to_string();
    env.produce(&[upsert("x1", "X-1", 1, "Not", "Written")]);
    let err = pipeline::start(config).err().expect("the start fails");
    assert!(err.to_string().contains("grpc.addr"), "{err}");
    // Nothing is consumed or written: a service left running would write X-1 within
    // a second; none comes in three.
    assert!(
        !wait_until(Duration::from_secs(3), || !env.sf.records("Contact").is_empty()),
        "a service was left running"
    );
    assert_eq!(
        tools::committed(&env.bootstrap, &env.group, &env.topic, 1).unwrap(),
        [None]
    );
}

/// An operator pauses a tenant over gRPC: nothing of it is written meanwhile, and every
/// event goes through once it is resumed; a tenant's token pauses no other tenant and
/// redrives its own events only.
#[test]
fn a_paused_tenant_writes_nothing_until_resumed_and_redrive_answers_over_grpc() {
    use crm_sync::grpc::pb::admin_service_client::AdminServiceClient;
    let env = Env::new(1);
    let status = unique("status");
    env.kafka.as_ref().unwrap().create_topic(&status, 1).unwrap();
    let mut config = config(&env, &status, &env.group);
    config.kafka.retry_topic = Some(env.retry.clone());
    let service = pipeline::start(config).unwrap();
    let a = service.grpc_addr().unwrap();
    let admin = |token: &str| AdminServiceClient::with_interceptor(channel(a), with_token(Some(token)));
    let paused = run(admin(ACME).pause_tenant(pb::PauseTenantRequest { tenant: "acme".into() }))
        .unwrap()
        .into_inner();
    assert_eq!(paused.state, "paused");
    env.produce(&[upsert("h1", "H-1", 1, "Held", "Back")]);
    // Parked while the tenant is paused (its input offset released), not held in memory.
    assert!(
        wait_until(WAIT, || ask(a, ACME, "H-1")
            .is_ok_and(|s| s.status == "tenant_paused" && s.reason == "paused")),
        "{:?}",
        ask(a, ACME, "H-1")
    );
    assert!(env.contact("H-1").is_none(), "written while paused");
    let resumed = run(admin(ADMIN).resume_tenant(pb::ResumeTenantRequest { tenant: "acme".into() }))
        .unwrap()
        .into_inner();
    assert_eq!(resumed.state, "closed");
    // An operator's pause is not the tenant's to lift.
    run(admin(ADMIN).pause_tenant(pb::PauseTenantRequest { tenant: "acme".into() })).unwrap();
    let refused = run(admin(ACME).resume_tenant(pb::ResumeTenantRequest { tenant: "acme".into() }));
    assert_eq!(refused.unwrap_err().code(), Code::PermissionDenied);
    // A tenant this member does not serve.
    let missing = run(admin(ADMIN).pause_tenant(pb::PauseTenantRequest {
        tenant: "nobody".into(),
    }));
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);
    let resumed = run(admin(ADMIN).resume_tenant(pb::ResumeTenantRequest { tenant: "acme".into() }))
        .unwrap()
        .into_inner();
    assert_eq!(resumed.state, "closed");
    assert!(
        wait_until(WAIT, || env.contact("H-1").is_some()),
        "delivered once resumed"
    );
    assert!(env.wait_drained(WAIT));

    let denied = run(admin(ACME).pause_tenant(pb::PauseTenantRequest {
        tenant: "globex".into(),
    }));
    assert_eq!(denied.unwrap_err().code(), Code::PermissionDenied);
    let everyone = run(admin(ACME).redrive(pb::RedriveRequest {
        dry_run: true,
        ..Default::default()
    }));
    assert_eq!(everyone.unwrap_err().code(), Code::PermissionDenied);
    let report = run(admin(ACME).redrive(pb::RedriveRequest {
        tenant: "acme".into(),
        dry_run: true,
        ..Default::default()
    }))
    .unwrap()
    .into_inner();
    assert_eq!((report.read, report.redriven, report.error.as_str()), (0, 0, ""));
    service.stop(StopMode::Graceful);
}

/// Services that do not speak Kafka publish events over gRPC: each is checked as the
/// consumer checks it and answered in order; the accepted ones are delivered.
#[test]
fn published_events_are_checked_answered_in_order_and_delivered() {
    use crm_sync::grpc::pb::ingest_service_client::IngestServiceClient;
    let env = Env::new(1);
    let status = unique("status");
    env.kafka.as_ref().unwrap().create_topic(&status, 1).unwrap();
    // A second tenant, beta, that acme's token may not publish for.
    let mut config = config(&env, &status, &env.group);
    let mut beta = config.tenants[0].clone();
    beta.name = "beta".into();
    config.tenants.push(beta);
    let max = config.kafka.max_message_bytes;
    let service = pipeline::start(config).unwrap();
    let a = service.grpc_addr().unwrap();
    let request = |id: &str, event: Vec<u8>| pb::PublishRequest { id: id.into(), event };
    let retenant = |event: Vec<u8>, tenant: &str| {
        String::from_utf8(event)
            .unwrap()
            .replace("\"acme\"", &format!("\"{tenant}\""))
            .into_bytes()
    };
    let invoice = String::from_utf8(upsert("p3", "P-3", 1, "Pub", "Three").1)
        .unwrap()
        .replace("\"contact\"", "\"invoice\"")
        .into_bytes();
    let requests = vec![
        request("ok-1", upsert("p1", "P-1", 1, "Pub", "One").1),
        request("bad-json", b"{nope".to_vec()),
        request("ok-2", upsert("p2", "P-2", 1, "Pub", "Two").1),
        request("unknown-entity", invoice),
        request(
            "foreign",
            retenant(upsert("o1", "O-1", 1, "Other", "Tenant").1, "globex"),
        ),
        request(
            "not-yours",
            retenant(upsert("b1", "B-1", 1, "Beta", "Tenant").1, "beta"),
        ),
        // Within the limit alone, over it with its key: refused for the tenant, not for
        // its size (which would tell acme's token that beta exists and maps contacts).
        request("not-yours-large", {
            let base = retenant(upsert("b2", "B-2", 1, "Beta", "").1, "beta").len();
            retenant(upsert("b2", "B-2", 1, "Beta", &"x".repeat(max - 5 - base)).1, "beta")
        }),
    ];
    let mut client = IngestServiceClient::with_interceptor(channel(a), with_token(Some(ACME)));
    let answers: Vec<pb::PublishResponse> = run(async {
        let mut stream = client.publish(tokio_stream::iter(requests)).await.unwrap().into_inner();
        let mut out = Vec::new();
        while let Some(a) = stream.message().await.unwrap() {
            out.push(a);
        }
        out
    });
    let got: Vec<(&str, bool, &str)> = answers
        .iter()
        .map(|a| (a.id.as_str(), a.accepted, a.reason.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("ok-1", true, ""),
            ("bad-json", false, "invalid_json"),
            ("ok-2", true, ""),
            ("unknown-entity", false, "unknown_entity"),
            // A tenant's token is not told whether another tenant exists.
            ("foreign", false, "permission_denied"),
            ("not-yours", false, "permission_denied"),
            ("not-yours-large", false, "permission_denied"),
        ]
    );
    // The admin token is.
    let mut admin = IngestServiceClient::with_interceptor(channel(a), with_token(Some(ADMIN)));
    let unknown = run(async {
        let foreign = request(
            "foreign",
            retenant(upsert("o2", "O-2", 1, "Other", "Tenant").1, "globex"),
        );
        let mut stream = admin
            .publish(tokio_stream::iter(vec![foreign]))
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().unwrap()
    });
    assert_eq!((unknown.accepted, unknown.reason.as_str()), (false, "unknown_tenant"));
    assert_eq!(answers[0].topic, env.topic);
    assert!(wait_until(WAIT, || env.contact("P-1").is_some() && env.contact("P-2").is_some()));
    assert_eq!(
        tools::end_offsets(&env.bootstrap, &env.topic, 1).unwrap(),
        [2],
        "only the accepted were written"
    );
    service.stop(StopMode::Graceful);
}

/// With `grpc.tls_cert_path` and `grpc.tls_key_path` the server speaks TLS (rustls): a
/// client that trusts the certificate gets its answers; a plaintext client gets none.
#[test]
fn the_server_speaks_tls_when_given_a_certificate() {
    let env = Env::new(1);
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_ca(dir.path());
    let status = unique("status");
    env.kafka.as_ref().unwrap().create_topic(&status, 1).unwrap();
    let mut config = config(&env, &status, &env.group);
    let grpc = config.grpc.as_mut().unwrap();
    grpc.tls_cert_path = Some(cert.clone());
    grpc.tls_key_path = Some(key.clone());
    let service = pipeline::start(config).unwrap();
    let a = service.grpc_addr().unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(&ca).unwrap()))
        .domain_name("localhost");
    let secure = run(Channel::from_shared(format!("https://{a}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect())
    .unwrap();
    let mut tenants = TenantServiceClient::with_interceptor(secure, with_token(Some(ADMIN)));
    let listed = run(tenants.list_tenants(pb::ListTenantsRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(listed.tenants.len(), 1);
    let plain = run(async {
        let channel = Channel::from_shared(format!("http://{a}")).unwrap().connect().await?;
        TenantServiceClient::with_interceptor(channel, with_token(Some(ADMIN)))
            .list_tenants(pb::ListTenantsRequest {})
            .await
            .map(|_| ())
            .map_err(|e| e.into())
    });
    let plain: Result<(), Box<dyn std::error::Error>> = plain;
    assert!(plain.is_err(), "a plaintext client got an answer");
    // The command line over TLS: an https:// address and the CA in CRM_SYNC_CA.
    let cli_at = |addr: String, ca: Option<&str>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_crm-sync"));
        c.args(["tenants", "--addr", &addr])
            .env("CRM_SYNC_TOKEN", ADMIN)
            .env_remove("CRM_SYNC_CA");
        if let Some(ca) = ca {
            c.env("CRM_SYNC_CA", ca);
        }
        c.output().unwrap()
    };
    let cli = |ca: Option<&str>| cli_at(format!("https://localhost:{}", a.port()), ca);
    let listed = cli(Some(&ca));
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    assert!(String::from_utf8_lossy(&listed.stdout).contains("acme"));
    let unset = cli(None);
    assert!(!unset.status.success());
    assert!(String::from_utf8_lossy(&unset.stderr).contains("CRM_SYNC_CA"));
    // With a CA set, a plaintext address is refused before the token is sent; a bare
    // host:port is taken as https.
    let plaintext = cli_at(format!("http://localhost:{}", a.port()), Some(&ca));
    assert!(!plaintext.status.success());
    assert!(String::from_utf8_lossy(&plaintext.stderr).contains("in clear"));
    let bare = cli_at(format!("localhost:{}", a.port()), Some(&ca));
    assert!(bare.status.success(), "{}", String::from_utf8_lossy(&bare.stderr));
    service.stop(StopMode::Graceful);
}

/// With `kafka.pause_topic`, a pause taken through one member holds on every member of
/// the group, and after the whole group restarted (a member started alone with events
/// waiting is paused before it handles them); the tenant's own token cannot lift an
/// operator's pause through another member; and the admin's resume through one member
/// ends it on the others and lets everything through.
#[test]
fn a_pause_holds_on_every_member_and_after_a_restart() {
    use crm_sync::grpc::pb::admin_service_client::AdminServiceClient;
    let env = Env::new(2);
    let status = unique("status");
    let pauses = unique("pauses");
    let broker = env.kafka.as_ref().unwrap();
    broker.create_topic(&status, 1).unwrap();
    broker.create_topic(&pauses, 1).unwrap();
    let member = || {
        let mut config = config(&env, &status, &env.group);
        config.kafka.retry_topic = Some(env.retry.clone());
        config.kafka.pause_topic = Some(pauses.clone());
        pipeline::start(config).unwrap()
    };
    let state = |addr, token: &str| {
        run(tenant_client(addr, Some(token)).get_tenant(pb::GetTenantRequest { tenant: "acme".into() }))
            .map(|t| t.into_inner().state)
            .unwrap_or_default()
    };
    let admin = |addr, token: &str| AdminServiceClient::with_interceptor(channel(addr), with_token(Some(token)));
    let (a, b) = (member(), member());
    let (a_addr, b_addr) = (a.grpc_addr().unwrap(), b.grpc_addr().unwrap());
    let paused = run(admin(a_addr, ADMIN).pause_tenant(pb::PauseTenantRequest { tenant: "acme".into() }))
        .unwrap()
        .into_inner();
    assert_eq!(paused.state, "paused");
    assert!(
        wait_until(WAIT, || state(b_addr, ADMIN) == "paused"),
        "the other member follows the pause: {}",
        state(b_addr, ADMIN)
    );
    // Events on both partitions, whichever member holds them: all parked, none written.
    env.produce_to(0, &[upsert("p0", "P-0", 1, "Paused", "Zero")]);
    env.produce_to(1, &[upsert("p1", "P-1", 1, "Paused", "One")]);
    assert!(env.wait_all_committed(WAIT), "parked while paused");
    assert!(
        env.contact("P-0").is_none() && env.contact("P-1").is_none(),
        "written while paused"
    );

    // The group restarted: a member that starts alone, with events waiting on both
    // partitions, is paused before it handles any of them.
    a.stop(StopMode::Graceful);
    b.stop(StopMode::Graceful);
    env.produce_to(0, &[upsert("p2", "P-2", 1, "Paused", "Two")]);
    env.produce_to(1, &[upsert("p3", "P-3", 1, "Paused", "Three")]);
    let c = member();
    let c_addr = c.grpc_addr().unwrap();
    assert!(env.wait_all_committed(WAIT));
    assert!(
        env.contact("P-2").is_none() && env.contact("P-3").is_none(),
        "written by a member started after the pause"
    );
    let d = member();
    let d_addr = d.grpc_addr().unwrap();
    assert!(
        wait_until(WAIT, || state(d_addr, ADMIN) == "paused"),
        "{}",
        state(d_addr, ADMIN)
    );

    // The tenant's token cannot lift the operator's pause; the admin's resume through one
    // member ends it on the other too.
    let refused = run(admin(c_addr, ACME).resume_tenant(pb::ResumeTenantRequest { tenant: "acme".into() }));
    assert_eq!(refused.unwrap_err().code(), Code::PermissionDenied);
    let resumed = run(admin(c_addr, ADMIN).resume_tenant(pb::ResumeTenantRequest { tenant: "acme".into() }))
        .unwrap()
        .into_inner();
    assert_eq!(resumed.state, "closed");
    assert!(
        wait_until(WAIT, || state(d_addr, ADMIN) == "closed"),
        "{}",
        state(d_addr, ADMIN)
    );
    assert!(
        wait_until(WAIT, || ["P-0", "P-1", "P-2", "P-3"]
            .iter()
            .all(|k| env.contact(k).is_some())),
        "delivered once resumed"
    );
    c.stop(StopMode::Graceful);
    d.stop(StopMode::Graceful);
}
