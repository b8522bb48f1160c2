//! Dataverse batches: `$batch` with `Prefer: odata.continue-on-error`.
//!
//! `POST /api/data/v9.2/$batch` with a `multipart/mixed` body, one `application/http` part
//! per record (its own PATCH or DELETE by alternate key), up to 1000 parts. No change
//! sets: a change set is atomic, and one bad record must not fail its batch-mates. With
//! continue-on-error the answer is 200 and a `multipart/mixed` body with one part per
//! request, in order, each a full HTTP response (`HTTP/1.1 204 No Content`, headers, an
//! optional JSON body); each part's status and body become that record's outcome. A
//! top-level 429, 401 or 5xx is every record's; any other top-level refusal (a 400 for
//! the batch as a whole) names no record, so the batch's records are then written one by
//! one, each with its own answer.

use std::time::Duration;

use reqwest::{Method, StatusCode};

use super::client::{outcome, DynamicsClient};
use crate::connectors::http::parse_retry_after;
use crate::connectors::{DeliveryError, ErrorCode, WriteOk, WriteRequest};
use crate::event::Op;

/// Most requests one `$batch` may carry.
pub const BATCH_LIMIT: usize = 1000;

/// Writes records in `$batch` calls of up to [`BATCH_LIMIT`]; one result per request, in
/// order.
pub async fn write_batch(client: &DynamicsClient, requests: Vec<WriteRequest>) -> Vec<Result<WriteOk, DeliveryError>> {
    let mut out = Vec::with_capacity(requests.len());
    if requests.len() == 1 {
        for r in requests {
            out.push(client.write(r).await);
        }
        return out;
    }
    let mut rest = requests;
    while !rest.is_empty() {
        let chunk: Vec<WriteRequest> = rest.drain(..rest.len().min(BATCH_LIMIT)).collect();
        out.extend(batch(client, chunk).await);
    }
    out
}

async fn batch(client: &DynamicsClient, requests: Vec<WriteRequest>) -> Vec<Result<WriteOk, DeliveryError>> {
    let n = requests.len();
    let boundary = format!("batch_{:032x}", rand::random::<u128>());
    let body = encode(client, &boundary, &requests);
    let url = format!("{}/$batch", client.api_url);
    let answer = client
        .call(|token| {
            client
                .http
                .request(Method::POST, &url)
                .bearer_auth(token)
                .header("Content-Type", format!("multipart/mixed; boundary={boundary}"))
                .header("Prefer", "odata.continue-on-error")
                .body(body.clone())
        })
        .await;
    let answer = match answer {
        Ok(a) => a,
        Err(e) => return vec![Err(e); n],
    };
    if answer.status != StatusCode::OK {
        let e = outcome(Op::Upsert, answer.status.as_u16(), &answer.body, answer.retry_after)
            .err()
            .unwrap_or_else(|| DeliveryError::unexpected_retryable(format!("$batch answered {}", answer.status)));
        if e.is_retryable() || e.code == ErrorCode::CrmAuth {
            // Throttling, an outage, a token: the whole call's, so every record's.
            return vec![Err(e); n];
        }
        // A refusal of the batch as a whole (or, had continue-on-error not been applied,
        // of the first failing operation, with the ones before it committed and the
        // ones after it never run): which record it concerns cannot be told, and it
        // must not dead-letter its batch-mates. Each record is written alone (upserts
        // and deletes by key are safe to repeat) and gets its own answer.
        tracing::warn!(error = %e, records = n, "Dataverse refused a $batch as a whole; writing its records one by one.");
        let mut out: Vec<Result<WriteOk, DeliveryError>> = Vec::with_capacity(n);
        for r in requests {
            // A throttle or an outage on the way is every remaining record's too.
            let result = match out.last() {
                Some(Err(e)) if e.is_retryable() => Err(e.clone()),
                _ => client.write(r).await,
            };
            out.push(result);
        }
        return out;
    }
    let content_type = answer
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let parts = boundary_of(content_type)
        .map(|b| decode(&answer.body, &b))
        .unwrap_or_default();
    if parts.len() != n {
        let message = format!("$batch answered {} parts for {n} requests", parts.len());
        return vec![Err(DeliveryError::unexpected_retryable(message)); n];
    }
    requests
        .iter()
        .zip(parts)
        .map(|(req, part)| outcome(req.op, part.status, &part.body, part.retry_after))
        .collect()
}

/// The request body: one `application/http` part per request. Each part is a whole HTTP
/// request: the request line and its headers, the blank line that ends them, the body
/// if any; then the CRLF that, under RFC 2046, belongs to the next delimiter. A request
/// without a body still ends its header block with a blank line (docs/crm-apis.md §3.4).
fn encode(client: &DynamicsClient, boundary: &str, requests: &[WriteRequest]) -> String {
    let mut body = String::new();
    for req in requests {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        ));
        let url = client.record_url(req);
        match req.op {
            Op::Upsert => {
                let json = serde_json::to_string(&req.fields).unwrap_or_else(|_| "{}".into());
                body.push_str(&format!(
                    "PATCH {url} HTTP/1.1\r\nContent-Type: application/json; type=entry\r\nContent-Length: {}\r\n\r\n{json}",
                    json.len()
                ));
            }
            Op::Delete => body.push_str(&format!("DELETE {url} HTTP/1.1\r\n\r\n")),
        }
        body.push_str("\r\n");
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    body
}

/// One response part of a `$batch` answer.
#[derive(Debug, Clone, PartialEq)]
pub struct PartResponse {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub body: Vec<u8>,
}

/// The `boundary` parameter of a `multipart/mixed` content type.
pub fn boundary_of(content_type: &str) -> Option<String> {
    content_type.split(';').find_map(|p| {
        let (name, value) = p.trim().split_once('=')?;
        name.eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"').to_string())
    })
}

/// The response parts of a `multipart/mixed` `$batch` answer, in order; the parts of a
/// change set response are flattened in place.
pub fn decode(body: &[u8], boundary: &str) -> Vec<PartResponse> {
    let text = String::from_utf8_lossy(body);
    let delimiter = format!("--{boundary}");
    let mut out = Vec::new();
    for raw in text.split(delimiter.as_str()).skip(1) {
        if raw.starts_with("--") {
            break;
        }
        let raw = raw.trim_start_matches("\r\n").trim_start_matches('\n');
        let Some((headers, rest)) = split_block(raw) else {
            continue;
        };
        let content_type = header(headers, "content-type").unwrap_or_default();
        if content_type.to_ascii_lowercase().starts_with("multipart/mixed") {
            if let Some(inner) = boundary_of(&content_type) {
                out.extend(decode(rest.as_bytes(), &inner));
            }
            continue;
        }
        let Some((head, body)) = split_block(rest) else {
            continue;
        };
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        out.push(PartResponse {
            status,
            retry_after: parse_retry_after(header(head, "retry-after").as_deref()),
            body: body.trim_end_matches(['\r', '\n']).as_bytes().to_vec(),
        });
    }
    out
}

/// Splits a header block from what follows its blank line.
fn split_block(text: &str) -> Option<(&str, &str)> {
    text.split_once("\r\n\r\n").or_else(|| text.split_once("\n\n"))
}

fn header(block: &str, name: &str) -> Option<String> {
    block.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_parts_in_order_with_nested_change_sets() {
        let body = "--batchresponse_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
HTTP/1.1 204 No Content\r\nOData-Version: 4.0\r\n\r\n\r\n\
--batchresponse_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
HTTP/1.1 400 Bad Request\r\nContent-Type: application/json; odata.metadata=minimal\r\n\r\n\
{\"error\":{\"code\":\"0x80044331\",\"message\":\"too long\"}}\r\n\
--batchresponse_1\r\nContent-Type: multipart/mixed; boundary=changesetresponse_2\r\n\r\n\
--changesetresponse_2\r\nContent-Type: application/http\r\nContent-ID: 1\r\n\r\n\
HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\n\r\n\r\n\
--changesetresponse_2--\r\n\
--batchresponse_1--\r\n";
        let parts = decode(body.as_bytes(), "batchresponse_1");
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].status, 204);
        assert_eq!(parts[1].status, 400);
        assert_eq!(
            parts[1].body,
            br#"{"error":{"code":"0x80044331","message":"too long"}}"#.to_vec()
        );
        assert_eq!(
            (parts[2].status, parts[2].retry_after),
            (429, Some(Duration::from_secs(3)))
        );
        assert_eq!(
            boundary_of("multipart/mixed; boundary=\"batchresponse_1\""),
            Some("batchresponse_1".into())
        );
    }
}
