//! The Salesforce sandbox answers as the documented REST API does (docs/crm-apis.md §1
//! and §5), over plain HTTP — independently of the connector.

use crm_sync::sandbox::salesforce::{SalesforceSandbox, SandboxOrg, Scripted};
use serde_json::{json, Value};

struct Client {
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
    base: String,
}

impl Client {
    fn new(sandbox: &SalesforceSandbox) -> Self {
        Client {
            http: reqwest::Client::new(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            base: sandbox.base_url(),
        }
    }

    fn token(&self, id: &str, secret: &str) -> (u16, Value) {
        self.rt.block_on(async {
            let r = self
                .http
                .post(format!("{}/services/oauth2/token", self.base))
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", id),
                    ("client_secret", secret),
                ])
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
        })
    }

    /// Returns status, `Sforce-Limit-Info`, and the body as JSON (Null when empty).
    fn call(&self, method: reqwest::Method, path: &str, token: &str, body: Option<Value>) -> (u16, String, Value) {
        self.rt.block_on(async {
            let mut req = self
                .http
                .request(method, format!("{}{}", self.base, path))
                .bearer_auth(token);
            if let Some(b) = body {
                req = req.json(&b);
            }
            let r = req.send().await.unwrap();
            let limit = r
                .headers()
                .get("sforce-limit-info")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            (status, limit, serde_json::from_str(&text).unwrap_or(Value::Null))
        })
    }
}

const CONTACT: &str = "/services/data/v60.0/sobjects/Contact/External_Id__c";

#[test]
fn token_endpoint_issues_tokens_and_refuses_bad_credentials() {
    let sf = SalesforceSandbox::start("127.0.0.1:0", SandboxOrg::standard("id", "secret")).unwrap();
    let c = Client::new(&sf);
    let (status, body) = c.token("id", "secret");
    assert_eq!(status, 200);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["instance_url"], sf.base_url());
    assert!(body.get("expires_in").is_none(), "Salesforce sends no expires_in");
    assert!(body["issued_at"].is_string());
    let (status, body) = c.token("id", "wrong");
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"error": "invalid_grant", "error_description": "authentication failure"})
    );
}

#[test]
fn upsert_by_external_id_creates_updates_and_reports_by_api_version() {
    let sf = SalesforceSandbox::start("127.0.0.1:0", SandboxOrg::standard("id", "secret")).unwrap();
    let c = Client::new(&sf);
    let token = c.token("id", "secret").1["access_token"].as_str().unwrap().to_string();
    // 1. Created: 201 with `created: true` (v46+), and the usage header on every answer.
    let (status, limit, body) = c.call(
        reqwest::Method::PATCH,
        &format!("{CONTACT}/C%2F1"),
        &token,
        Some(json!({"LastName": "Lovelace"})),
    );
    assert_eq!(status, 201);
    assert_eq!(body["created"], true);
    assert!(limit.starts_with("api-usage=1/"), "{limit}");
    // The percent-encoded key was decoded: the record's external id is "C/1".
    assert!(sf.find("Contact", "External_Id__c", "C/1").is_some());
    // 2. Updated: 200 with `created: false` on v60, 204 without a body before v46.
    let (status, _, body) = c.call(
        reqwest::Method::PATCH,
        &format!("{CONTACT}/C%2F1"),
        &token,
        Some(json!({"FirstName": "Ada"})),
    );
    assert_eq!((status, body["created"].clone()), (200, json!(false)));
    let (status, _, body) = c.call(
        reqwest::Method::PATCH,
        "/services/data/v45.0/sobjects/Contact/External_Id__c/C%2F1",
        &token,
        Some(json!({"FirstName": "Ada"})),
    );
    assert_eq!((status, body), (204, Value::Null));
    // 3. A required field missing on create: 400 REQUIRED_FIELD_MISSING with the field.
    let (status, _, body) = c.call(
        reqwest::Method::PATCH,
        &format!("{CONTACT}/C-2"),
        &token,
        Some(json!({"FirstName": "Grace"})),
    );
    assert_eq!(status, 400);
    assert_eq!(body[0]["errorCode"], "REQUIRED_FIELD_MISSING");
    assert_eq!(body[0]["fields"], json!(["LastName"]));
    // 4. Unknown external id field: 404 NOT_FOUND.
    let (status, _, body) = c.call(
        reqwest::Method::PATCH,
        "/services/data/v60.0/sobjects/Contact/Nope__c/C-1",
        &token,
        Some(json!({"LastName": "X"})),
    );
    assert_eq!((status, body[0]["errorCode"].clone()), (404, json!("NOT_FOUND")));
}

#[test]
fn several_matches_expired_tokens_limits_and_deletes_answer_as_documented() {
    let sf = SalesforceSandbox::start("127.0.0.1:0", SandboxOrg::standard("id", "secret")).unwrap();
    let c = Client::new(&sf);
    let token = c.token("id", "secret").1["access_token"].as_str().unwrap().to_string();
    // 1. Two records share an external id: 300 with their URLs, nothing changed.
    for _ in 0..2 {
        let mut fields = serde_json::Map::new();
        fields.insert("External_Id__c".into(), json!("DUP"));
        fields.insert("LastName".into(), json!("Twin"));
        sf.seed_record("Contact", fields);
    }
    let (status, _, body) = c.call(
        reqwest::Method::PATCH,
        &format!("{CONTACT}/DUP"),
        &token,
        Some(json!({"LastName": "X"})),
    );
    assert_eq!(status, 300);
    assert_eq!(body.as_array().unwrap().len(), 2);
    assert!(body[0]
        .as_str()
        .unwrap()
        .starts_with("/services/data/v60.0/sobjects/Contact/"));
    // 2. Delete: 204, then 404 NOT_FOUND for the same key.
    c.call(
        reqwest::Method::PATCH,
        &format!("{CONTACT}/D-1"),
        &token,
        Some(json!({"LastName": "Gone"})),
    );
    assert_eq!(
        c.call(reqwest::Method::DELETE, &format!("{CONTACT}/D-1"), &token, None)
            .0,
        204
    );
    assert_eq!(
        c.call(reqwest::Method::DELETE, &format!("{CONTACT}/D-1"), &token, None)
            .0,
        404
    );
    // 3. Scripted faults: 503, then UNABLE_TO_LOCK_ROW.
    sf.script([Scripted::ServerError, Scripted::LockError]);
    let body = Some(json!({"LastName": "L"}));
    assert_eq!(
        c.call(reqwest::Method::PATCH, &format!("{CONTACT}/L-1"), &token, body.clone())
            .0,
        503
    );
    let (status, _, err) = c.call(reqwest::Method::PATCH, &format!("{CONTACT}/L-1"), &token, body.clone());
    assert_eq!(
        (status, err[0]["errorCode"].clone()),
        (400, json!("UNABLE_TO_LOCK_ROW"))
    );
    // 4. An expired session: 401 INVALID_SESSION_ID.
    sf.expire_tokens();
    let (status, _, err) = c.call(reqwest::Method::PATCH, &format!("{CONTACT}/L-1"), &token, body.clone());
    assert_eq!(
        (status, err[0]["errorCode"].clone()),
        (401, json!("INVALID_SESSION_ID"))
    );
    // 5. The daily allocation used up: 403 REQUEST_LIMIT_EXCEEDED.
    let token = c.token("id", "secret").1["access_token"].as_str().unwrap().to_string();
    sf.set_daily_limit(sf.stats().api_requests);
    let (status, limit, err) = c.call(reqwest::Method::PATCH, &format!("{CONTACT}/L-1"), &token, body);
    assert_eq!(
        (status, err[0]["errorCode"].clone()),
        (403, json!("REQUEST_LIMIT_EXCEEDED"))
    );
    assert!(limit.starts_with("api-usage="));
    let stats = sf.stats();
    assert_eq!(stats.deletes_applied, 1);
    assert_eq!(stats.rejected.get(&300), Some(&1));
}
