//! The services of `proto/crmsync/v1/crmsync.proto`, behind the token check.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use super::auth::{principal, Principal, Tokens};
use super::pb;
use super::pb::admin_service_server::{AdminService, AdminServiceServer};
use super::pb::ingest_service_server::{IngestService, IngestServiceServer};
use super::pb::status_service_server::{StatusService, StatusServiceServer};
use super::pb::tenant_service_server::{TenantService, TenantServiceServer};
use super::view::StatusView;
use crate::config::Config;
use crate::tenant::board::{Board, PausedBy};
use crate::tenant::pauses::Pauses;

struct Status_ {
    view: Arc<StatusView>,
}

#[tonic::async_trait]
impl StatusService for Status_ {
    async fn get_record_status(
        &self,
        request: Request<pb::GetRecordStatusRequest>,
    ) -> Result<Response<pb::RecordStatus>, Status> {
        let who = principal(&request)?;
        let r = request.into_inner();
        who.may(&r.tenant)?;
        if !self.view.enabled {
            return Err(Status::failed_precondition("no kafka.status_topic is configured"));
        }
        match self.view.get(&r.tenant, &r.entity, &r.key) {
            Some(status) => Ok(Response::new((*status).clone())),
            None => Err(Status::not_found(
                "no status for this record on this member (never seen, or not among the most recently updated it keeps)",
            )),
        }
    }

    type WatchOutcomesStream = Pin<Box<dyn Stream<Item = Result<pb::WatchOutcomesResponse, Status>> + Send>>;

    async fn watch_outcomes(
        &self,
        request: Request<pb::WatchOutcomesRequest>,
    ) -> Result<Response<Self::WatchOutcomesStream>, Status> {
        let who = principal(&request)?;
        let r = request.into_inner();
        match (&who, r.tenant.is_empty()) {
            // Every tenant: the admin only.
            (Principal::Admin, true) => {}
            (_, true) => return Err(Status::permission_denied("name your tenant")),
            (_, false) => who.may(&r.tenant)?,
        }
        if !self.view.enabled {
            return Err(Status::failed_precondition("no kafka.status_topic is configured"));
        }
        let wanted = move |s: &pb::RecordStatus| {
            (r.tenant.is_empty() || s.tenant == r.tenant)
                && (r.entity.is_empty() || s.entity == r.entity)
                && (r.statuses.is_empty() || r.statuses.contains(&s.status))
        };
        let stream = BroadcastStream::new(self.view.watch()).filter_map(move |item| {
            let out = match item {
                Ok(status) if wanted(&status) => Some(Ok(pb::WatchOutcomesResponse {
                    kind: Some(pb::watch_outcomes_response::Kind::Outcome((*status).clone())),
                })),
                Ok(_) => None,
                Err(BroadcastStreamRecvError::Lagged(missed)) => Some(Ok(pb::WatchOutcomesResponse {
                    kind: Some(pb::watch_outcomes_response::Kind::Missed(missed)),
                })),
            };
            futures::future::ready(out)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

struct Tenants {
    config: Arc<Config>,
    board: Board,
}

impl Tenants {
    fn tenant(&self, name: &str) -> Option<pb::Tenant> {
        let t = self.config.tenant(name)?;
        let view = self.board.get(name).unwrap_or_default();
        Some(pb::Tenant {
            name: t.name.clone(),
            crm: t.crm.as_str().to_string(),
            state: if view.state.is_empty() { "closed" } else { view.state }.to_string(),
            pace_per_sec: view.pace_per_sec,
            max_concurrency: view.max_concurrency as u32,
            outcomes: view.outcomes.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        })
    }
}

#[tonic::async_trait]
impl TenantService for Tenants {
    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let who = principal(&request)?;
        let tenants = self
            .config
            .tenants
            .iter()
            .filter(|t| who.may(&t.name).is_ok())
            .filter_map(|t| self.tenant(&t.name))
            .collect();
        Ok(Response::new(pb::ListTenantsResponse { tenants }))
    }

    async fn get_tenant(&self, request: Request<pb::GetTenantRequest>) -> Result<Response<pb::Tenant>, Status> {
        let who = principal(&request)?;
        let name = request.into_inner().tenant;
        who.may(&name)?;
        self.tenant(&name)
            .map(Response::new)
            .ok_or_else(|| Status::not_found("no such tenant"))
    }
}

struct Admin {
    tenants: Tenants,
    /// Where pause flags are kept (the pause topic, or this member).
    pauses: Pauses,
}

impl Admin {
    /// Pauses or resumes the tenant, and answers once this member's tenant actor has
    /// followed. The tenant's own token sets and clears its own flag; the admin token
    /// pauses with its flag and resumes by clearing both (see `tenant::pauses`).
    async fn hold(&self, principal: &Principal, tenant: &str, held: bool) -> Result<pb::Tenant, Status> {
        principal.may(tenant)?;
        let board = &self.tenants.board;
        if board.actor(tenant).is_none() {
            return Err(Status::not_found("no such tenant on this member"));
        }
        let admin = matches!(principal, Principal::Admin);
        if !admin && !held && board.paused_by(tenant, PausedBy::Admin) {
            return Err(Status::permission_denied(
                "an operator paused this tenant: only the admin token resumes it",
            ));
        }
        let flags: &[PausedBy] = match (admin, held) {
            (true, true) => &[PausedBy::Admin],
            (true, false) => &[PausedBy::Admin, PausedBy::Tenant],
            (false, _) => &[PausedBy::Tenant],
        };
        self.pauses
            .set(tenant, flags, held)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        self.tenants
            .tenant(tenant)
            .ok_or_else(|| Status::not_found("no such tenant"))
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn pause_tenant(&self, request: Request<pb::PauseTenantRequest>) -> Result<Response<pb::Tenant>, Status> {
        let who = principal(&request)?;
        self.hold(&who, &request.into_inner().tenant, true)
            .await
            .map(Response::new)
    }

    async fn resume_tenant(&self, request: Request<pb::ResumeTenantRequest>) -> Result<Response<pb::Tenant>, Status> {
        let who = principal(&request)?;
        self.hold(&who, &request.into_inner().tenant, false)
            .await
            .map(Response::new)
    }

    async fn redrive(&self, request: Request<pb::RedriveRequest>) -> Result<Response<pb::RedriveReport>, Status> {
        let who = principal(&request)?;
        let r = request.into_inner();
        match (&who, r.tenant.is_empty()) {
            (Principal::Admin, _) => {}
            (_, true) => return Err(Status::permission_denied("name your tenant")),
            (_, false) => who.may(&r.tenant)?,
        }
        let time = |field: &str, t: &str| -> Result<_, Status> {
            if t.is_empty() {
                return Ok(None);
            }
            chrono::DateTime::parse_from_rfc3339(t)
                .map(|t| Some(t.with_timezone(&chrono::Utc)))
                .map_err(|_| Status::invalid_argument(format!("{field} is not an RFC 3339 time")))
        };
        let some = |s: String| (!s.is_empty()).then_some(s);
        let filter = crate::redrive::Filter {
            since: time("since", &r.since)?,
            until: time("until", &r.until)?,
            tenant: some(r.tenant),
            entity: some(r.entity),
            error_code: some(r.error_code),
            stage: some(r.stage),
        };
        let config = self.tenants.config.clone();
        let dry = r.dry_run;
        let report = tokio::task::spawn_blocking(move || crate::redrive::redrive(&config, &filter, dry))
            .await
            .map_err(|_| Status::internal("the redrive task failed"))?
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(pb::RedriveReport {
            read: report.read as u64,
            selected: report.selected as u64,
            redriven: report.redriven as u64,
            already_delivered: report.already_delivered as u64,
            superseded: report.superseded as u64,
            duplicate: report.duplicate as u64,
            not_an_event: report.not_an_event as u64,
            unknown_source: report.unknown_source as u64,
            by_reason: report.by_reason.into_iter().map(|(k, v)| (k, v as u64)).collect(),
            error: report.error.unwrap_or_default(),
        }))
    }
}

struct Ingest {
    producer: rdkafka::producer::FutureProducer,
    topic: String,
    max_bytes: usize,
    routes: Arc<crate::pipeline::RouteTable>,
}

/// Answers in flight per Publish stream: the producer batches them.
const PUBLISH_WINDOW: usize = 1024;

impl Ingest {
    /// Checks one event as the consumer would, and writes it to the input topic.
    fn publish(
        &self,
        who: &Principal,
        request: pb::PublishRequest,
    ) -> impl std::future::Future<Output = pb::PublishResponse> + Send + 'static {
        let refuse = |id: String, reason: &str, message: String| pb::PublishResponse {
            id,
            accepted: false,
            reason: reason.to_string(),
            message,
            ..Default::default()
        };
        let checked = crate::event::decode(Some(&request.event), self.max_bytes, self.routes.as_ref())
            .map_err(|e| {
                // A tenant's token learns nothing of other tenants: not whether they exist,
                // nor what they map.
                let other = match (&who, &e) {
                    (Principal::Tenant(own), crate::event::DecodeError::UnknownTenant(t)) => t != own,
                    (Principal::Tenant(own), crate::event::DecodeError::UnknownEntity { tenant, .. }) => tenant != own,
                    _ => false,
                };
                if other {
                    refuse(
                        request.id.clone(),
                        "permission_denied",
                        "this token may not publish for that tenant".into(),
                    )
                } else {
                    refuse(request.id.clone(), e.code(), e.to_string())
                }
            })
            .and_then(|event| {
                // Permission first: a tenant's token learns nothing of another tenant's
                // events, not even that they would be too large.
                who.may(&event.record.tenant).map_err(|_| {
                    refuse(
                        request.id.clone(),
                        "permission_denied",
                        "this token may not publish for that tenant".into(),
                    )
                })?;
                // The consumer counts the key too.
                let r = &event.record;
                let key = crate::demo::workload::kafka_key(&r.tenant, &r.entity, &r.key);
                if key.len() + request.event.len() > self.max_bytes {
                    return Err(refuse(
                        request.id.clone(),
                        "too_large",
                        format!("event and key are more than {} bytes", self.max_bytes),
                    ));
                }
                Ok(event)
            });
        let (producer, topic) = (self.producer.clone(), self.topic.clone());
        // A refused event's bytes are not kept while its answer waits its turn.
        let (checked, request) = match checked {
            Ok(e) => (Ok(e), request),
            Err(refused) => (Err(refused), pb::PublishRequest::default()),
        };
        async move {
            let event = match checked {
                Ok(e) => e,
                Err(refused) => return refused,
            };
            let r = &event.record;
            let key = crate::demo::workload::kafka_key(&r.tenant, &r.entity, &r.key);
            let record = rdkafka::producer::FutureRecord::to(&topic)
                .key(&key)
                .payload(&request.event);
            match producer.send(record, std::time::Duration::from_secs(30)).await {
                Ok(delivery) => pb::PublishResponse {
                    id: request.id,
                    accepted: true,
                    topic,
                    partition: delivery.partition,
                    offset: delivery.offset,
                    ..Default::default()
                },
                Err((e, _)) => refuse(request.id, "not_written", e.to_string()),
            }
        }
    }
}

#[tonic::async_trait]
impl IngestService for Ingest {
    type PublishStream = Pin<Box<dyn Stream<Item = Result<pb::PublishResponse, Status>> + Send>>;

    async fn publish(
        &self,
        request: Request<tonic::Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        let who = principal(&request)?;
        let this = Ingest {
            producer: self.producer.clone(),
            topic: self.topic.clone(),
            max_bytes: self.max_bytes,
            routes: self.routes.clone(),
        };
        let answers = request
            .into_inner()
            .map(move |next| match next {
                Ok(r) => futures::future::Either::Left(this.publish(&who, r)),
                Err(status) => futures::future::Either::Right(futures::future::ready(pb::PublishResponse {
                    accepted: false,
                    reason: "bad_request".into(),
                    message: status.message().to_string(),
                    ..Default::default()
                })),
            })
            .buffered(PUBLISH_WINDOW)
            .map(Ok);
        Ok(Response::new(Box::pin(answers)))
    }
}

/// Every service, each behind the token check, plus health and reflection.
pub fn router(
    config: &Arc<Config>,
    view: Arc<StatusView>,
    board: Board,
    pauses: Pauses,
) -> anyhow::Result<tonic::transport::server::Router> {
    let grpc = config.grpc.as_ref().expect("started only with [grpc]");
    let tokens = Tokens::new(grpc);
    let check = |tokens: Tokens| move |r: Request<()>| tokens.check(r);
    let status = InterceptedService::new(StatusServiceServer::new(Status_ { view }), check(tokens.clone()));
    let tenants = InterceptedService::new(
        TenantServiceServer::new(Tenants {
            config: config.clone(),
            board: board.clone(),
        }),
        check(tokens.clone()),
    );
    let admin = InterceptedService::new(
        AdminServiceServer::new(Admin {
            tenants: Tenants {
                config: config.clone(),
                board,
            },
            pauses,
        }),
        check(tokens.clone()),
    );
    let producer: rdkafka::producer::FutureProducer = crate::consume::client_config(&config.kafka)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // Keys to partitions as Kafka's Java producers do, so that a record published
        // here and by the customers' own producers lands on one partition.
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()?;
    let ingest = InterceptedService::new(
        IngestServiceServer::new(Ingest {
            producer,
            topic: config.kafka.input_topics[0].clone(),
            max_bytes: config.kafka.max_message_bytes,
            routes: Arc::new(crate::pipeline::RouteTable::of(config)),
        })
        // One request is one event: no larger than the consumer takes, plus its framing.
        .max_decoding_message_size(config.kafka.max_message_bytes + 1024),
        check(tokens.clone()),
    );
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::DESCRIPTOR)
        .build_v1()?;
    let reporter = health_reporter.clone();
    tokio::spawn(async move {
        reporter.set_serving::<StatusServiceServer<Status_>>().await;
        reporter.set_serving::<TenantServiceServer<Tenants>>().await;
        reporter.set_serving::<AdminServiceServer<Admin>>().await;
        reporter.set_serving::<IngestServiceServer<Ingest>>().await;
    });
    let routes = Routes::new(health)
        .add_service(reflection)
        .add_service(status)
        .add_service(tenants)
        .add_service(admin)
        .add_service(ingest);
    let mut server = tonic::transport::Server::builder();
    if grpc.tls_cert_path.is_some() != grpc.tls_key_path.is_some() {
        anyhow::bail!("grpc.tls_cert_path and grpc.tls_key_path: set both, or neither");
    }
    if let (Some(cert), Some(key)) = (&grpc.tls_cert_path, &grpc.tls_key_path) {
        let read = |key: &str, path: &str| std::fs::read(path).map_err(|e| anyhow::anyhow!("{key} {path}: {e}"));
        let identity =
            tonic::transport::Identity::from_pem(read("grpc.tls_cert_path", cert)?, read("grpc.tls_key_path", key)?);
        server = server.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    Ok(server.add_routes(routes))
}
