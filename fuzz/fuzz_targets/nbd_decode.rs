//! Feeds arbitrary bytes to the NBD decoders a server runs on untrusted input: client flags,
//! option headers and payloads (every option code), and request headers framed as the
//! transmission loop frames them (WRITE payloads skipped). No input may panic, and whatever
//! decodes must encode back to the same bytes (the codec has one encoding per message).
//! `tern_nbd_frontend::codec`'s proptest `decoders_never_panic` runs the same property on
//! every `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_nbd_frontend::codec::*;

fuzz_target!(|data: &[u8]| {
    let _ = decode_client_flags(data);

    // An option as it arrives on the socket: header, then `length` bytes of payload.
    if let Ok(header) = decode_option_header(data) {
        let rest = &data[OPTION_HEADER_LEN..];
        let payload = &rest[..rest.len().min(header.length as usize)];
        check_option(header.option, payload);
    }
    // Every option code against the rest of the input, so the payload parsers are reached
    // without the fuzzer first having to find IHAVEOPT.
    if let Some((&selector, payload)) = data.split_first() {
        check_option(u32::from(selector % 16), payload);
    }

    // Requests back to back, as the transmission loop reads them.
    let mut rest = data;
    while let Ok(req) = decode_request_header(rest) {
        let mut again = Vec::new();
        encode_request_header(&req, &mut again);
        assert_eq!(&again[..], &rest[..REQUEST_HEADER_LEN]);
        rest = &rest[REQUEST_HEADER_LEN..];
        if req.command == Command::Write {
            rest = &rest[rest.len().min(req.length as usize)..];
        }
    }
});

/// Decodes `payload` as option `code`; a parsed option must encode back to the same bytes.
fn check_option(code: u32, payload: &[u8]) {
    match decode_option(code, payload) {
        Ok(ClientOption::Unknown(c)) => assert_eq!(c, code),
        Ok(option) => {
            let mut again = Vec::new();
            encode_option(&option, &mut again);
            assert_eq!(&again[OPTION_HEADER_LEN..], payload);
        }
        Err(_) => {}
    }
}
