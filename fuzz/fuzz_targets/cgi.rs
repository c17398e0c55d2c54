//! The parser of a CGI guest's response (`agora_fn_api::cgi::parse_response`): any
//! bytes a function writes on stdout give either a response or an error sentence,
//! never a panic. What parses keeps its promises: a status of three digits, no
//! header that frames the body or describes the connection, at most
//! `MAX_RESPONSE_HEADERS` headers, and a body that is the end of the output.
#![no_main]
use agora_fn_api::cgi::{parse_response, MAX_RESPONSE_HEADERS};
use agora_fn_api::Error;
use bytes::Bytes;
use http::header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_response(Bytes::copy_from_slice(data)) {
        Ok(response) => {
            let status = response.status().as_u16();
            assert!((100..=999).contains(&status), "status {status}");
            let headers = response.headers();
            assert!(
                headers.len() <= MAX_RESPONSE_HEADERS,
                "{} headers",
                headers.len()
            );
            for name in [
                header::CONNECTION,
                header::TRANSFER_ENCODING,
                header::CONTENT_LENGTH,
                header::UPGRADE,
            ] {
                assert!(!headers.contains_key(&name), "{name} was kept");
            }
            assert!(
                data.ends_with(response.body()),
                "the body is not the output's end"
            );
            assert!(
                response.body().len() < data.len(),
                "no head before the body"
            );
        }
        Err(Error::BadCgiResponse(why)) => assert!(!why.is_empty()),
        Err(other) => panic!("unexpected error kind: {other}"),
    }
});
