//! Conformance of the Zendesk and Dynamics 365 sandboxes to the documented behaviour the
//! connectors rely on (docs/crm-apis.md §2, §3 and the checklist in §5), over HTTP.

mod common;

use common::{block, CLIENT_ID, CLIENT_SECRET};
use crm_sync::sandbox::dynamics::{DynamicsSandbox, DynamicsSetup};
use crm_sync::sandbox::zendesk::{ZendeskSandbox, ZendeskSetup};
use reqwest::header::HeaderMap;
use serde_json::{json, Value};

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

fn send(request: reqwest::RequestBuilder) -> Answer {
    block(async {
        let r = request.send().await.unwrap();
        let (status, headers) = (r.status().as_u16(), r.headers().clone());
        Answer {
            status,
            headers,
            body: r.text().await.unwrap(),
        }
    })
}

fn zendesk() -> (ZendeskSandbox, reqwest::Client, String) {
    let mut setup = ZendeskSetup::standard(CLIENT_ID, CLIENT_SECRET);
    setup.rate_limit_per_minute = 12;
    let zd = ZendeskSandbox::start("127.0.0.1:0", setup).unwrap();
    let token = send(reqwest::Client::new().post(format!("{}/oauth/tokens", zd.base_url())).json(&json!({
        "grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "scope": "read write"
    })))
    .json()["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    (zd, reqwest::Client::new(), token)
}

#[test]
fn zendesk_upserts_jobs_idempotency_and_limits() {
    let (zd, http, token) = zendesk();
    let api = |path: &str| format!("{}/api/v2{path}", zd.base_url());
    let post = |path: &str, body: Value| http.post(api(path)).bearer_auth(&token).json(&body);
    // create_or_update: 201, then 200 matched by external id ignoring case, with both
    // spellings of the rate-limit headers.
    let user = json!({"user": {"name": "Ada", "email": "ada@example.com", "external_id": "crm-1"}});
    let created = send(post("/users/create_or_update", user));
    assert_eq!(created.status, 201);
    assert!(created.header("location").unwrap().ends_with(".json"));
    for h in [
        "x-rate-limit",
        "x-rate-limit-remaining",
        "ratelimit-remaining",
        "ratelimit-reset",
        "rate-limit-remaining",
    ] {
        assert!(created.header(h).is_some(), "{h}");
    }
    let updated = send(post(
        "/users/create_or_update",
        json!({"user": {"name": "Ada L", "external_id": "CRM-1"}}),
    ));
    assert_eq!(updated.status, 200);
    assert_eq!(
        updated.json()["user"]["external_id"],
        "CRM-1",
        "the stored external id takes the sent case"
    );
    // 422 RecordInvalid with field details.
    let invalid = send(post(
        "/users/create_or_update",
        json!({"user": {"name": "X", "email": "nope", "external_id": "crm-2"}}),
    ));
    assert_eq!(invalid.status, 422);
    assert_eq!(invalid.json()["error"], "RecordInvalid");
    assert_eq!(invalid.json()["details"]["email"][0]["error"], "InvalidFormat");
    // A bulk job: queued, then completed with a result per item.
    let job = send(post(
        "/users/create_or_update_many",
        json!({"users": [{"name": "B", "external_id": "crm-3"}, {"name": "", "external_id": "crm-4"}]}),
    ));
    let status = &job.json()["job_status"];
    assert_eq!(status["status"], "queued");
    let id = status["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("V3-") && id.len() == 35, "{id}");
    let done = send(http.get(api(&format!("/job_statuses/{id}"))).bearer_auth(&token)).json();
    assert_eq!(done["job_status"]["status"], "completed");
    let results = done["job_status"]["results"].as_array().unwrap().clone();
    assert_eq!(
        (results[0]["index"].clone(), results[0]["status"].clone()),
        (json!(0), json!("Created"))
    );
    assert_eq!(
        (results[1]["index"].clone(), results[1]["status"].clone()),
        (json!(1), json!("Failed"))
    );
    // Tickets: Idempotency-Key replays the first answer; another body with it is refused.
    let ticket = json!({"ticket": {"subject": "S", "comment": {"body": "B"}, "external_id": "t-1"}});
    let key = |body: Value| post("/tickets", body).header("Idempotency-Key", "k-1");
    let first = send(key(ticket.clone()));
    assert_eq!(
        (first.status, first.header("x-idempotency-lookup")),
        (201, Some("miss"))
    );
    let again = send(key(ticket.clone()));
    assert_eq!((again.status, again.header("x-idempotency-lookup")), (201, Some("hit")));
    assert_eq!(again.json()["ticket"]["id"], first.json()["ticket"]["id"]);
    let other = send(key(json!({"ticket": {"subject": "Other", "comment": {"body": "B"}}})));
    assert_eq!(
        (other.status, other.json()["error"].clone()),
        (400, json!("IdempotentRequestError"))
    );
    assert_eq!(zd.find("tickets", "t-1").len(), 1);
    // Past the per-minute limit (12, eight used above): 429 with Retry-After.
    let mut last = None;
    for _ in 0..5 {
        last = Some(send(http.get(api("/tickets?external_id=t-1")).bearer_auth(&token)));
    }
    let limited = last.unwrap();
    assert_eq!(limited.status, 429);
    assert!(limited.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(limited.header("x-rate-limit-remaining"), Some("0"));
    // Wrong API token, expired OAuth token.
    let basic = send(
        http.get(api("/users/search?external_id=crm-1"))
            .basic_auth("sync@example.com/token", Some("wrong")),
    );
    assert_eq!(
        (basic.status, basic.json()["error"].clone()),
        (401, json!("Couldn't authenticate you"))
    );
    zd.expire_tokens();
    let expired = send(http.get(api("/users/search?external_id=crm-1")).bearer_auth(&token));
    assert_eq!(
        (expired.status, expired.json()["error"].clone()),
        (401, json!("invalid_token"))
    );
}

fn dynamics() -> (DynamicsSandbox, reqwest::Client, String) {
    let d = DynamicsSandbox::start("127.0.0.1:0", DynamicsSetup::standard(CLIENT_ID, CLIENT_SECRET)).unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/sandbox.onmicrosoft.com/oauth2/v2.0/token", d.base_url());
    let form = |scope: String| {
        vec![
            ("client_id", CLIENT_ID.to_string()),
            ("client_secret", CLIENT_SECRET.to_string()),
            ("grant_type", "client_credentials".to_string()),
            ("scope", scope),
        ]
    };
    let bad = send(
        http.post(&url)
            .form(&form("https://other.crm.dynamics.com/.default".into())),
    );
    assert_eq!((bad.status, bad.json()["error"].clone()), (400, json!("invalid_scope")));
    let good = send(http.post(&url).form(&form(format!("{}/.default", d.base_url())))).json();
    assert_eq!(good["token_type"], "Bearer");
    assert!(good["expires_in"].as_u64().unwrap() > 0);
    let token = good["access_token"].as_str().unwrap().to_string();
    (d, http, token)
}

#[test]
fn dynamics_upserts_by_alternate_key_with_conditions() {
    let (d, http, token) = dynamics();
    let url = |resource: &str| format!("{}/api/data/v9.2/{resource}", d.base_url());
    let patch = |resource: &str, body: Value| http.patch(url(resource)).bearer_auth(&token).json(&body);
    let created = send(patch("contacts(crm_externalid='C-1')", json!({"lastname": "Lovelace"})));
    assert_eq!(created.status, 204);
    assert!(created
        .header("odata-entityid")
        .unwrap()
        .ends_with("contacts(crm_externalid='C-1')"));
    assert!(created.header("x-ms-ratelimit-burst-remaining-xrm-requests").is_some());
    // Create only, on an existing record: 412. Update only, on a missing one: 404.
    let exists = send(patch("contacts(crm_externalid='C-1')", json!({"lastname": "X"})).header("If-None-Match", "*"));
    assert_eq!(exists.status, 412);
    let missing = send(patch("contacts(crm_externalid='C-9')", json!({"lastname": "X"})).header("If-Match", "*"));
    assert_eq!(
        (missing.status, missing.json()["error"]["code"].clone()),
        (404, json!("0x80060891"))
    );
    // Representation: 200 on update, with an etag.
    let repr = send(
        patch("contacts(crm_externalid='C-1')", json!({"firstname": "Ada"})).header("Prefer", "return=representation"),
    );
    assert_eq!(repr.status, 200);
    assert!(repr.json()["@odata.etag"].is_string());
    assert_eq!(d.find("contacts", "C-1").unwrap()["lastname"], "Lovelace");
    // A column that is not a declared key, and a quote inside a key value.
    let undeclared = send(patch("contacts(emailaddress1='a@b.c')", json!({"lastname": "X"})));
    assert_eq!(undeclared.status, 400);
    assert!(undeclared.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid for resource"));
    assert_eq!(
        send(patch("contacts(crm_externalid='O''Neil')", json!({"lastname": "O"}))).status,
        204
    );
    assert!(d.find("contacts", "O'Neil").is_some());
    // Delete: 204, then 404.
    let delete = || send(http.delete(url("contacts(crm_externalid='C-1')")).bearer_auth(&token));
    assert_eq!(delete().status, 204);
    assert_eq!(delete().status, 404);
    // No token: 401 with a challenge.
    let anonymous = send(http.patch(url("contacts(crm_externalid='C-2')")).json(&json!({})));
    assert_eq!(anonymous.status, 401);
    assert!(anonymous
        .header("www-authenticate")
        .unwrap()
        .starts_with("Bearer authorization_uri="));
}

fn batch_body(boundary: &str, parts: &[String]) -> String {
    let mut body = String::new();
    for p in parts {
        body.push_str(&format!("--{boundary}\r\n{p}"));
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    body
}

fn request_part(method: &str, resource: &str, json: &str) -> String {
    format!(
        "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n{method} /api/data/v9.2/{resource} HTTP/1.1\r\nContent-Type: application/json; type=entry\r\n\r\n{json}\r\n"
    )
}

#[test]
fn dynamics_batch_stops_or_continues_and_change_sets_are_atomic() {
    let (d, http, token) = dynamics();
    let batch = |body: String, boundary: &str, continue_on_error: bool| {
        let mut r = http
            .post(format!("{}/api/data/v9.2/$batch", d.base_url()))
            .bearer_auth(&token)
            .header("Content-Type", format!("multipart/mixed; boundary={boundary}"))
            .body(body);
        if continue_on_error {
            r = r.header("Prefer", "odata.continue-on-error");
        }
        send(r)
    };
    let too_long = format!("{{\"lastname\":\"{}\"}}", "x".repeat(101));
    let parts = [
        request_part("PATCH", "contacts(crm_externalid='B-1')", r#"{"lastname":"One"}"#),
        request_part("PATCH", "contacts(crm_externalid='B-2')", &too_long),
        request_part("PATCH", "contacts(crm_externalid='B-3')", r#"{"lastname":"Three"}"#),
    ];
    // Default: stops at the failure, whose status is the top-level one.
    let stopped = batch(batch_body("batch_a", &parts), "batch_a", false);
    assert_eq!(stopped.status, 400);
    assert!(stopped.body.contains("0x80044331"));
    assert!(d.find("contacts", "B-1").is_some() && d.find("contacts", "B-3").is_none());
    // Continue on error: 200 and one answer per part, in order.
    let all = batch(batch_body("batch_b", &parts), "batch_b", true);
    assert_eq!(all.status, 200);
    let boundary = crm_sync::connectors::dynamics::boundary_of(all.header("content-type").unwrap()).unwrap();
    let statuses: Vec<u16> = crm_sync::connectors::dynamics::decode(all.body.as_bytes(), &boundary)
        .iter()
        .map(|p| p.status)
        .collect();
    assert_eq!(statuses, vec![204, 400, 204]);
    assert!(d.find("contacts", "B-3").is_some());
    // A change set is all or nothing; Content-ID references resolve inside it.
    let changeset = |second: &str| {
        let inner = batch_body(
            "changeset_x",
            &[
                format!(
                    "Content-ID: 1\r\n{}",
                    request_part("PATCH", "contacts(crm_externalid='CS-1')", r#"{"lastname":"A"}"#)
                ),
                format!(
                    "Content-ID: 2\r\n{}",
                    request_part("PATCH", second, r#"{"firstname":"B"}"#)
                ),
            ],
        );
        batch_body(
            "batch_c",
            &[format!(
                "Content-Type: multipart/mixed; boundary=changeset_x\r\n\r\n{inner}"
            )],
        )
    };
    let rolled_back = batch(changeset("contacts(emailaddress1='bad')"), "batch_c", false);
    assert_eq!(rolled_back.status, 400);
    assert!(d.find("contacts", "CS-1").is_none(), "the change set was rolled back");
    let referenced = batch(changeset("$1"), "batch_c", false);
    assert_eq!(referenced.status, 200, "{}", referenced.body);
    assert_eq!(d.find("contacts", "CS-1").unwrap()["firstname"], "B");
}

#[test]
fn dynamics_batch_refuses_a_part_whose_header_block_is_not_ended() {
    let (d, http, token) = dynamics();
    let batch = |body: String| {
        send(
            http.post(format!("{}/api/data/v9.2/$batch", d.base_url()))
                .bearer_auth(&token)
                .header("Content-Type", "multipart/mixed; boundary=batch_t")
                .header("Prefer", "odata.continue-on-error")
                .body(body),
        )
    };
    let part = |request: &str| {
        format!("--batch_t\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n{request}\r\n--batch_t--\r\n")
    };
    // One CRLF after the request line: under RFC 2046 it belongs to the delimiter, so
    // the request's header block never ends.
    let unterminated = batch(part("DELETE /api/data/v9.2/contacts(crm_externalid='X') HTTP/1.1"));
    assert_eq!(unterminated.status, 400, "{}", unterminated.body);
    assert!(unterminated.body.contains("0x80048d19"), "{}", unterminated.body);
    // The request line, the blank line that ends its (empty) header block, no body.
    let terminated = batch(part(
        "DELETE /api/data/v9.2/contacts(crm_externalid='X') HTTP/1.1\r\n\r\n",
    ));
    assert_eq!(terminated.status, 200, "{}", terminated.body);
    // A delimiter must open its line.
    let glued = batch(
        "--batch_t\r\nContent-Type: application/http\r\n\r\nPATCH /api/data/v9.2/contacts(crm_externalid='Y') HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{}--batch_t--\r\n".to_string(),
    );
    assert_eq!(glued.status, 400, "{}", glued.body);
}

#[test]
fn dynamics_service_protection_answers_429_with_retry_after() {
    let (d, http, token) = dynamics();
    d.set_limits(2, 52);
    let call = || {
        send(
            http.patch(format!("{}/api/data/v9.2/contacts(crm_externalid='L-1')", d.base_url()))
                .bearer_auth(&token)
                .json(&json!({"lastname": "L"})),
        )
    };
    assert_eq!(call().status, 204);
    assert_eq!(call().status, 204);
    let limited = call();
    assert_eq!(limited.status, 429);
    assert_eq!(limited.json()["error"]["code"], "0x80072322");
    assert!(limited.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(limited.header("x-ms-ratelimit-burst-remaining-xrm-requests"), Some("0"));
}
