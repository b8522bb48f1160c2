//! Kafka message headers as bytes, for messages written by producers we do not control.
//!
//! Promise: any header (name and value) that librdkafka hands over is read without
//! panicking and written back byte for byte. rdkafka's own `Headers::iter` turns every
//! name into a `&str` with an `unwrap`, so one header name that is not UTF-8 panics the
//! thread that reads it (measured with rdkafka 0.39: the consumer thread died and the
//! partition stopped on every member). So both directions go through librdkafka's C
//! calls here, the one place that does.
//!
//! librdkafka returns header names as C strings: a name with a NUL byte in it is read up
//! to that byte.

use std::ffi::CStr;
use std::os::raw::{c_char, c_void};

use rdkafka::bindings as rdsys;
use rdkafka::message::{BorrowedHeaders, OwnedHeaders};

/// One header: name and value as the producer sent them (a value may be absent).
pub type RawHeader = (Vec<u8>, Option<Vec<u8>>);

/// `BorrowedHeaders` is rdkafka's view of librdkafka's `rd_kafka_headers_t`: a reference
/// to it *is* the native pointer (rdkafka builds it by casting that pointer, and casts it
/// back the same way in its own calls).
fn native(headers: &BorrowedHeaders) -> *mut rdsys::rd_kafka_headers_t {
    headers as *const BorrowedHeaders as *mut rdsys::rd_kafka_headers_t
}

/// Every header of a message, in order, whatever its bytes.
pub fn read(headers: Option<&BorrowedHeaders>) -> Vec<RawHeader> {
    let Some(headers) = headers else {
        return Vec::new();
    };
    let ptr = native(headers);
    // SAFETY: `ptr` is a live headers list borrowed from the message for this call.
    let count = unsafe { rdsys::rd_kafka_header_cnt(ptr) };
    let mut out = Vec::with_capacity(count);
    for idx in 0..count {
        let mut name: *const c_char = std::ptr::null();
        let mut value: *const c_void = std::ptr::null();
        let mut size = 0usize;
        // SAFETY: as above; the out-pointers are valid for writes.
        let err = unsafe { rdsys::rd_kafka_header_get_all(ptr, idx, &mut name, &mut value, &mut size) };
        if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        // SAFETY: librdkafka NUL-terminates every header name and keeps name and value
        // alive as long as the message; both are copied out before it is released.
        let key = unsafe { CStr::from_ptr(name) }.to_bytes().to_vec();
        let value =
            (!value.is_null()).then(|| unsafe { std::slice::from_raw_parts(value as *const u8, size) }.to_vec());
        out.push((key, value));
    }
    out
}

/// Headers to produce, built from byte names (which `OwnedHeaders::insert`, taking `&str`,
/// cannot express).
pub struct HeaderList(OwnedHeaders);

impl HeaderList {
    pub fn with_capacity(n: usize) -> Self {
        HeaderList(OwnedHeaders::new_with_capacity(n))
    }

    pub fn add(&mut self, key: &[u8], value: Option<&[u8]>) {
        let ptr = native(self.0.as_borrowed());
        let (value_ptr, value_len) = match value {
            Some(v) => (v.as_ptr() as *const c_void, v.len() as isize),
            None => (std::ptr::null(), 0),
        };
        // SAFETY: `ptr` is the list this value owns; librdkafka copies name and value.
        // Adding to a list that was never handed to a producer cannot fail (rdkafka
        // asserts the same in `insert`), so the result is not inspected.
        unsafe {
            rdsys::rd_kafka_header_add(
                ptr,
                key.as_ptr() as *const c_char,
                key.len() as isize,
                value_ptr,
                value_len,
            );
        }
    }

    pub fn into_owned(self) -> OwnedHeaders {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_bytes_round_trip() {
        let mut list = HeaderList::with_capacity(3);
        list.add(b"bad\xffkey", Some(b"\xfe\x00value"));
        list.add(b"plain", None);
        list.add(b"", Some(b""));
        let owned = list.into_owned();
        let read = read(Some(owned.as_borrowed()));
        assert_eq!(
            read,
            vec![
                (b"bad\xffkey".to_vec(), Some(b"\xfe\x00value".to_vec())),
                (b"plain".to_vec(), None),
                (Vec::new(), Some(Vec::new())),
            ]
        );
    }
}
