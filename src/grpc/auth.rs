//! Who is calling: every gRPC call carries `authorization: Bearer <token>`. The admin
//! token may act on every tenant; a tenant's token on that tenant only. A missing or
//! unknown token is UNAUTHENTICATED; a known token asking about another tenant is
//! PERMISSION_DENIED. Tokens are compared in constant time and never logged.

use std::sync::Arc;

use tonic::{Request, Status};

use crate::config::GrpcConfig;

/// The caller, as its token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Admin,
    Tenant(String),
}

impl Principal {
    /// May it see and act on `tenant`?
    pub fn may(&self, tenant: &str) -> Result<(), Status> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Tenant(own) if own == tenant => Ok(()),
            Principal::Tenant(_) => Err(Status::permission_denied("this token may not act on that tenant")),
        }
    }
}

/// The configured tokens.
#[derive(Clone)]
pub struct Tokens(Arc<Vec<(Vec<u8>, Principal)>>);

impl Tokens {
    pub fn new(config: &GrpcConfig) -> Tokens {
        let mut tokens = Vec::new();
        if let Some(t) = &config.admin_token {
            tokens.push((t.expose().as_bytes().to_vec(), Principal::Admin));
        }
        for (tenant, t) in &config.tenant_tokens {
            tokens.push((t.expose().as_bytes().to_vec(), Principal::Tenant(tenant.clone())));
        }
        Tokens(Arc::new(tokens))
    }

    fn principal(&self, token: &[u8]) -> Option<Principal> {
        // Every token is compared, each in time independent of where they differ.
        let mut found = None;
        for (known, principal) in self.0.iter() {
            if constant_time_eq(known, token) {
                found = Some(principal.clone());
            }
        }
        found
    }

    /// The interceptor every service runs: puts the caller's [`Principal`] in the
    /// request's extensions.
    pub fn check(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .ok_or_else(|| Status::unauthenticated("an authorization: Bearer <token> header is required"))?;
        let principal = self
            .principal(token)
            .ok_or_else(|| Status::unauthenticated("unknown token"))?;
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The caller of a request that went through [`Tokens::check`].
pub fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no token checked"))
}
