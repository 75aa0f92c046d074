//! MAPI over HTTP (MS-OXCMAPIHTTP) for the mailbox endpoint: the request and response
//! bodies of Connect, Execute, Disconnect and NotificationWait, and the meta-tag stream
//! (`PROCESSING`, `PENDING`, `DONE`) every response body travels in.

use crate::wire::{DecodeError, EncodeError, Put, Reader};

/// The largest auxiliary buffer a request may carry (MS-OXCRPC 3.1.4.2).
pub const MAX_AUX: usize = 0x1008;
/// The largest ROP buffer a request may carry.
pub const MAX_ROP_BUFFER: usize = 0x40000;

fn aux<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], DecodeError> {
    let at = r.offset();
    let n = r.u32("AuxiliaryBufferSize")? as usize;
    if n > MAX_AUX {
        return Err(DecodeError::Invalid {
            field: "AuxiliaryBufferSize",
            offset: at,
            value: n as u64,
            why: "over 0x1008 bytes",
        });
    }
    r.bytes(n, "AuxiliaryBuffer")
}

/// Reads `StatusCode`: `Some(status)` when it is a failure (non-zero), which ends the body.
fn failed(r: &mut Reader<'_>) -> Result<Option<u32>, DecodeError> {
    let status = r.u32("StatusCode")?;
    Ok((status != 0).then_some(status))
}

/// Writes a success's `StatusCode` (0) and `ErrorCode`.
fn put_success(out: &mut Vec<u8>, error_code: u32) {
    out.put_u32(0);
    out.put_u32(error_code);
}

fn put_aux(out: &mut Vec<u8>, a: &[u8]) {
    out.put_u32(a.len() as u32);
    out.put(a);
}

/// Connect request (EcDoConnectEx's inputs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The user's legacy DN.
    pub user_dn: String,
    /// 0 normal, 0x1 admin.
    pub flags: u32,
    /// The code page (1252).
    pub code_page: u32,
    /// Sort locale.
    pub lcid_sort: u32,
    /// String locale.
    pub lcid_string: u32,
    /// Auxiliary blocks (skipped).
    pub aux: Vec<u8>,
}

impl ConnectRequest {
    /// Reads the body.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let c = ConnectRequest {
            user_dn: r.asciiz("UserDn")?,
            flags: r.u32("Flags")?,
            code_page: r.u32("DefaultCodePage")?,
            lcid_sort: r.u32("LcidSort")?,
            lcid_string: r.u32("LcidString")?,
            aux: aux(&mut r)?.to_vec(),
        };
        r.finish("the Connect request")?;
        Ok(c)
    }

    /// Writes the body.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::new();
        out.put_asciiz(&self.user_dn, "UserDn")?;
        out.put_u32(self.flags);
        out.put_u32(self.code_page);
        out.put_u32(self.lcid_sort);
        out.put_u32(self.lcid_string);
        put_aux(&mut out, &self.aux);
        Ok(out)
    }
}

/// Connect's success body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectResponse {
    /// EcDoConnectEx's return value (0: connected).
    pub error_code: u32,
    /// Longest the client should wait between polls (ms).
    pub polls_max: u32,
    /// Retries the client should make.
    pub retry_count: u32,
    /// Delay between retries (ms).
    pub retry_delay: u32,
    /// The DN prefix.
    pub dn_prefix: String,
    /// The user's display name.
    pub display_name: String,
}

impl ConnectResponse {
    /// Writes the body (StatusCode 0).
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::new();
        put_success(&mut out, self.error_code);
        out.put_u32(self.polls_max);
        out.put_u32(self.retry_count);
        out.put_u32(self.retry_delay);
        out.put_asciiz(&self.dn_prefix, "DnPrefix")?;
        out.put_utf16z(&self.display_name, "DisplayName")?;
        put_aux(&mut out, &[]);
        Ok(out)
    }

    /// Reads the body; a non-zero StatusCode is returned as `Err(Ok(status))`.
    pub fn decode(buf: &[u8]) -> Result<Result<Self, u32>, DecodeError> {
        let mut r = Reader::new(buf);
        if let Some(status) = failed(&mut r)? {
            return Ok(Err(status));
        }
        let c = ConnectResponse {
            error_code: r.u32("ErrorCode")?,
            polls_max: r.u32("PollsMax")?,
            retry_count: r.u32("RetryCount")?,
            retry_delay: r.u32("RetryDelay")?,
            dn_prefix: r.asciiz("DnPrefix")?,
            display_name: r.utf16z("DisplayName")?,
        };
        aux(&mut r)?;
        Ok(Ok(c))
    }
}

/// Execute request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecuteRequest {
    /// 0x1 NoCompression, 0x2 NoXorMagic, 0x4 Chain.
    pub flags: u32,
    /// The ROP buffer (RPC_HEADER_EXT and payload); empty for a bare poll.
    pub rop_buffer: Vec<u8>,
    /// The largest response ROP buffer the client takes.
    pub max_rop_out: u32,
    /// Auxiliary blocks (skipped).
    pub aux: Vec<u8>,
}

impl ExecuteRequest {
    /// Reads the body. Sizes beyond the protocol's limits are errors before anything is
    /// allocated.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let flags = r.u32("Flags")?;
        let at = r.offset();
        let n = r.u32("RopBufferSize")? as usize;
        if n > MAX_ROP_BUFFER {
            return Err(DecodeError::Invalid {
                field: "RopBufferSize",
                offset: at,
                value: n as u64,
                why: "over 0x40000 bytes",
            });
        }
        let rop_buffer = r.bytes(n, "RopBuffer")?.to_vec();
        let max_rop_out = r.u32("MaxRopOut")?;
        let aux = aux(&mut r)?.to_vec();
        r.finish("the Execute request")?;
        Ok(ExecuteRequest {
            flags,
            rop_buffer,
            max_rop_out,
            aux,
        })
    }

    /// Writes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_u32(self.flags);
        out.put_u32(self.rop_buffer.len() as u32);
        out.put(&self.rop_buffer);
        out.put_u32(self.max_rop_out);
        put_aux(&mut out, &self.aux);
        out
    }
}

/// Execute's success body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecuteResponse {
    /// 0, or ecRpcFormat for an unreadable buffer (then the ROP buffer is empty).
    pub error_code: u32,
    /// The response ROP buffer.
    pub rop_buffer: Vec<u8>,
}

impl ExecuteResponse {
    /// Writes the body (StatusCode 0, Flags 0, no auxiliary blocks).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_success(&mut out, self.error_code);
        out.put_u32(0);
        out.put_u32(self.rop_buffer.len() as u32);
        out.put(&self.rop_buffer);
        put_aux(&mut out, &[]);
        out
    }

    /// Reads the body; a non-zero StatusCode is returned as `Err(Ok(status))`.
    pub fn decode(buf: &[u8]) -> Result<Result<Self, u32>, DecodeError> {
        let mut r = Reader::new(buf);
        if let Some(status) = failed(&mut r)? {
            return Ok(Err(status));
        }
        let error_code = r.u32("ErrorCode")?;
        r.u32("Flags")?;
        let n = r.u32("RopBufferSize")? as usize;
        let rop_buffer = r.bytes(n, "RopBuffer")?.to_vec();
        aux(&mut r)?;
        Ok(Ok(ExecuteResponse {
            error_code,
            rop_buffer,
        }))
    }
}

/// NotificationWait's success body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NotificationWaitResponse {
    /// EcDoAsyncWaitEx's return value (0, ecRejected, ecExiting).
    pub error_code: u32,
    /// Whether notifications are pending (the client should Execute).
    pub event_pending: bool,
}

impl NotificationWaitResponse {
    /// Writes the body (StatusCode 0).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        put_success(&mut out, self.error_code);
        out.put_u32(u32::from(self.event_pending));
        put_aux(&mut out, &[]);
        out
    }

    /// Reads the body; a non-zero StatusCode is returned as `Err(Ok(status))`.
    pub fn decode(buf: &[u8]) -> Result<Result<Self, u32>, DecodeError> {
        let mut r = Reader::new(buf);
        if let Some(status) = failed(&mut r)? {
            return Ok(Err(status));
        }
        let error_code = r.u32("ErrorCode")?;
        let at = r.offset();
        let pending = r.u32("EventPending")?;
        if pending > 1 {
            return Err(DecodeError::Invalid {
                field: "EventPending",
                offset: at,
                value: u64::from(pending),
                why: "must be 0 or 1",
            });
        }
        aux(&mut r)?;
        Ok(Ok(NotificationWaitResponse {
            error_code,
            event_pending: pending == 1,
        }))
    }
}

/// The cookie naming a session (MS-OXCMAPIHTTP leaves the name to the server; its 4.2 example
/// uses this one).
pub const CONTEXT_COOKIE: &str = "MapiContext";
/// The cookie that orders a session's Executes: each must carry the value the last one (or
/// Connect) set.
pub const SEQUENCE_COOKIE: &str = "MapiSequence";

/// The `Cookie` header a client sends for its session's cookies, if it holds any.
pub fn cookie_header(context: Option<&str>, sequence: Option<&str>) -> Option<String> {
    let jar: Vec<String> = [(CONTEXT_COOKIE, context), (SEQUENCE_COOKIE, sequence)]
        .into_iter()
        .filter_map(|(name, v)| v.map(|v| format!("{name}={v}")))
        .collect();
    (!jar.is_empty()).then(|| jar.join("; "))
}

/// One `Set-Cookie` value as its name and value (`None`: the cookie is cleared), or `None`
/// when it is not `name=value…`.
pub fn parse_set_cookie(set_cookie: &str) -> Option<(&str, Option<&str>)> {
    let (name, rest) = set_cookie.split_once('=')?;
    let value = rest.split(';').next().unwrap_or_default();
    Some((name, (!value.is_empty()).then_some(value)))
}

/// Reads a NotificationWait request body (`Flags`, auxiliary buffer); returns the flags.
pub fn decode_notification_wait_request(buf: &[u8]) -> Result<u32, DecodeError> {
    let mut r = Reader::new(buf);
    let flags = r.u32("Flags")?;
    aux(&mut r)?;
    r.finish("the NotificationWait request")?;
    Ok(flags)
}

/// A NotificationWait request body: Flags 0, no auxiliary blocks.
pub fn notification_wait_request() -> Vec<u8> {
    vec![0; 8]
}

/// Reads a Disconnect request body: an auxiliary buffer, or nothing at all.
pub fn decode_disconnect_request(buf: &[u8]) -> Result<(), DecodeError> {
    if buf.is_empty() {
        return Ok(());
    }
    let mut r = Reader::new(buf);
    aux(&mut r)?;
    r.finish("the Disconnect request")
}

/// Disconnect's success body (and any request's bare success: StatusCode, ErrorCode, aux).
pub fn status_error_body(error_code: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    put_success(&mut out, error_code);
    put_aux(&mut out, &[]);
    out
}

/// A failure body: a non-zero StatusCode and no auxiliary blocks.
pub fn failure_body(status: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(8);
    out.put_u32(status);
    put_aux(&mut out, &[]);
    out
}

/// The first meta-tag of every response.
pub const PROCESSING: &[u8] = b"PROCESSING\r\n";
/// A keep-alive meta-tag.
pub const PENDING: &[u8] = b"PENDING\r\n";

/// The final part of a response stream: `DONE`, the additional headers, a blank line, the
/// body.
pub fn done(response_code: u32, elapsed_ms: u64, start: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DONE\r\nX-ResponseCode: {response_code}\r\nX-ElapsedTime: {elapsed_ms}\r\nX-StartTime: {start}\r\n\r\n"
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A response stream read back (the client's side).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseStream {
    /// How many PENDING keep-alives came before DONE.
    pub pendings: usize,
    /// The headers after DONE, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The binary body.
    pub body: Vec<u8>,
}

impl ResponseStream {
    /// The value of an additional header.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Reads a de-chunked response body: PROCESSING (any number), PENDING (any number),
    /// DONE, headers, a blank line, the body.
    pub fn parse(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut pos = 0;
        let mut pendings = 0;
        let line = |pos: &mut usize| -> Result<&[u8], DecodeError> {
            let rest = &buf[*pos..];
            let end = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or(DecodeError::Truncated {
                    field: "meta-tag line",
                    offset: *pos,
                    needed: rest.len() + 2,
                    available: rest.len(),
                })?;
            let l = &rest[..end];
            *pos += end + 2;
            Ok(l)
        };
        loop {
            let at = pos;
            match line(&mut pos)? {
                b"PROCESSING" => {}
                b"PENDING" => pendings += 1,
                b"DONE" => break,
                other => {
                    return Err(DecodeError::Invalid {
                        field: "meta-tag",
                        offset: at,
                        value: other.len() as u64,
                        why: "not PROCESSING, PENDING or DONE",
                    });
                }
            }
        }
        let mut headers = Vec::new();
        loop {
            let at = pos;
            let l = line(&mut pos)?;
            if l.is_empty() {
                break;
            }
            let text = String::from_utf8_lossy(l);
            let (n, v) = text.split_once(':').ok_or(DecodeError::Invalid {
                field: "additional header",
                offset: at,
                value: l.len() as u64,
                why: "no colon",
            })?;
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        Ok(ResponseStream {
            pendings,
            headers,
            body: buf[pos..].to_vec(),
        })
    }
}

/// A UDP push registration (EcRRegisterPushNotification's inputs), carried by Herald's
/// `X-RequestType: RegisterPushNotification`: `ContextSize` u16, `Context`, `AdviseBits` u32
/// (0xFFFFFFFF), `AddressSize` u16, `Address` (a Windows SOCKADDR).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterPush {
    /// The opaque bytes every datagram carries (at most 16).
    pub context: Vec<u8>,
    /// `grbitAdviseBits`: MUST be 0xFFFFFFFF.
    pub advise_bits: u32,
    /// The raw SOCKADDR.
    pub address: Vec<u8>,
}

/// The only `grbitAdviseBits` EcRRegisterPushNotification accepts.
pub const ADVISE_BITS_ALL: u32 = 0xFFFF_FFFF;

/// Herald's RegisterPushNotification response body: StatusCode 0, ErrorCode (the RPC's
/// return value), `hNotification` (0 unless it succeeded), no auxiliary blocks.
pub fn register_push_body(error_code: u32, handle: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    put_success(&mut out, error_code);
    out.put_u32(handle);
    put_aux(&mut out, &[]);
    out
}

/// Reads [`register_push_body`]: (ErrorCode, hNotification).
pub fn decode_register_push_body(buf: &[u8]) -> Result<(u32, u32), DecodeError> {
    let mut r = Reader::new(buf);
    let status = r.u32("StatusCode")?;
    if status != 0 {
        return Err(DecodeError::Invalid {
            field: "StatusCode",
            offset: 0,
            value: u64::from(status),
            why: "a failure has no ErrorCode",
        });
    }
    let error = r.u32("ErrorCode")?;
    let handle = r.u32("NotificationHandle")?;
    let n = r.u32("AuxiliaryBufferSize")?;
    r.bytes(n as usize, "AuxiliaryBuffer")?;
    r.finish("the RegisterPushNotification response")?;
    Ok((error, handle))
}

/// Why a push registration is refused, as EcRRegisterPushNotification's return values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushRefused {
    /// The context is over 16 bytes (ecTooBig).
    TooBig,
    /// The advise bits are not 0xFFFFFFFF, or the family is not AF_INET or AF_INET6, or the
    /// size does not match it (ecInvalidParam).
    InvalidParam,
}

impl PushRefused {
    /// The return value.
    pub fn code(self) -> u32 {
        match self {
            PushRefused::TooBig => crate::ec::TOO_BIG,
            PushRefused::InvalidParam => crate::ec::INVALID_PARAM,
        }
    }
}

/// Windows' AF_INET.
pub const AF_INET: u16 = 2;
/// Windows' AF_INET6.
pub const AF_INET6: u16 = 23;

impl RegisterPush {
    /// Reads the body.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let n = r.u16("ContextSize")?;
        let context = r.bytes(usize::from(n), "Context")?.to_vec();
        let advise_bits = r.u32("AdviseBits")?;
        let n = r.u16("AddressSize")?;
        let address = r.bytes(usize::from(n), "Address")?.to_vec();
        r.finish("the RegisterPushNotification request")?;
        Ok(RegisterPush {
            context,
            advise_bits,
            address,
        })
    }

    /// Writes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_u16(self.context.len() as u16);
        out.put(&self.context);
        out.put_u32(self.advise_bits);
        out.put_u16(self.address.len() as u16);
        out.put(&self.address);
        out
    }

    /// The SOCKADDR of a socket address.
    pub fn sockaddr(addr: std::net::SocketAddr) -> Vec<u8> {
        let mut out = Vec::new();
        match addr {
            std::net::SocketAddr::V4(a) => {
                out.put_u16(AF_INET);
                out.put(&a.port().to_be_bytes());
                out.put(&a.ip().octets());
                out.put(&[0; 8]);
            }
            std::net::SocketAddr::V6(a) => {
                out.put_u16(AF_INET6);
                out.put(&a.port().to_be_bytes());
                out.put_u32(a.flowinfo());
                out.put(&a.ip().octets());
                out.put_u32(a.scope_id());
            }
        }
        out
    }

    /// Checks the registration: the advise bits, the context's size and the address's
    /// family and size.
    pub fn target(&self) -> Result<std::net::SocketAddr, PushRefused> {
        if self.advise_bits != ADVISE_BITS_ALL {
            return Err(PushRefused::InvalidParam);
        }
        if self.context.len() > 16 {
            return Err(PushRefused::TooBig);
        }
        let a = &self.address;
        if a.len() < 4 {
            return Err(PushRefused::InvalidParam);
        }
        let family = u16::from_le_bytes([a[0], a[1]]);
        let port = u16::from_be_bytes([a[2], a[3]]);
        match (family, a.len()) {
            (AF_INET, 16) => {
                let ip = std::net::Ipv4Addr::new(a[4], a[5], a[6], a[7]);
                Ok(std::net::SocketAddr::from((ip, port)))
            }
            (AF_INET6, 28) => {
                let mut o = [0u8; 16];
                o.copy_from_slice(&a[8..24]);
                Ok(std::net::SocketAddr::from((
                    std::net::Ipv6Addr::from(o),
                    port,
                )))
            }
            _ => Err(PushRefused::InvalidParam),
        }
    }
}
