//! Katapult's wire format: frames, CRC, commands, responses and a streaming decoder.
//!
//! Owns the byte-level protocol of Katapult (reference/katapult.md): a frame is
//! `01 88 | code | len | payload (len*4 bytes) | crc lo | crc hi | 99 03`, the CRC is
//! CRC-16/MCRF4XX over code, len and payload, integers are little-endian.
//!
//! Invariants: a [`Frame`]'s payload is always a whole number of 32-bit words and at most
//! 255 words, so [`Frame::encode`] cannot fail; [`Decoder`] never panics on any input, never
//! buffers more than one maximal frame plus what was pushed, and after garbage it resumes at
//! the next `0x01` byte without skipping past the start of a valid frame.
//!
//! Thread-safety: plain data; a `Decoder` is owned by one reader.

use std::fmt;

/// First two bytes of every frame.
pub const HEADER: [u8; 2] = [0x01, 0x88];
/// Last two bytes of every frame.
pub const TRAILER: [u8; 2] = [0x99, 0x03];
/// Smallest frame (no payload).
pub const MIN_FRAME: usize = 8;
/// Largest frame the format can express (len = 255 words).
pub const MAX_FRAME: usize = MIN_FRAME + 4 * 255;
/// Largest frame a real Katapult device accepts.
pub const DEVICE_MAX_FRAME: usize = 128;
/// Protocol version 1.1.0, the first that reports the bootloader's software version.
pub const PROTO_1_1_0: u32 = 0x0001_0100;

/// Command and response codes (byte 2 of a frame).
pub mod code {
    pub const CONNECT: u8 = 0x11;
    pub const SEND_BLOCK: u8 = 0x12;
    pub const SEND_EOF: u8 = 0x13;
    pub const REQUEST_BLOCK: u8 = 0x14;
    pub const COMPLETE: u8 = 0x15;
    /// The bogus command flashtool sends to prime double-buffered STM32 USB endpoints.
    pub const PRIME: u8 = 0x90;
    pub const ACK: u8 = 0xa0;
    pub const NACK: u8 = 0xf1;
    pub const COMMAND_ERROR: u8 = 0xf2;
    pub const BUSY: u8 = 0xf3;
}

/// CRC-16/MCRF4XX (Klipper's `crc16_ccitt`): reflected poly 0x8408, init 0xFFFF, no xorout.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xffff;
    for &byte in data {
        let mut b = byte ^ (crc & 0xff) as u8;
        b ^= b << 4;
        let b = u16::from(b);
        crc = (b << 8 | crc >> 8) ^ (b >> 4) ^ (b << 3);
    }
    crc
}

/// Why bytes could not be turned into a frame or a frame into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Bytes were discarded while looking for the next frame.
    #[error("discarded {skipped} byte(s) of garbage ({reason})")]
    Garbage { skipped: usize, reason: Garbage },
    /// A well-formed frame whose payload does not fit its code.
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
}

/// What was wrong with the first bytes of a discarded run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Garbage {
    NoHeader,
    BadLength(usize),
    BadTrailer,
    BadCrc { expected: u16, found: u16 },
}

impl fmt::Display for Garbage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Garbage::NoHeader => write!(f, "no frame header"),
            Garbage::BadLength(n) => write!(f, "frame length {n} out of range"),
            Garbage::BadTrailer => write!(f, "bad frame trailer"),
            Garbage::BadCrc { expected, found } => {
                write!(f, "CRC {found:#06x}, expected {expected:#06x}")
            }
        }
    }
}

/// A payload that cannot be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("payload of {0} bytes is not a whole number of 32-bit words")]
    NotWords(usize),
    #[error("payload of {0} bytes is longer than a frame can carry (1020)")]
    TooLong(usize),
}

/// One frame: a code and its payload (a whole number of words, at most 255 of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    code: u8,
    payload: Vec<u8>,
}

impl Frame {
    /// A frame, if the payload is a whole number of words and short enough.
    pub fn new(code: u8, payload: Vec<u8>) -> Result<Self, EncodeError> {
        if payload.len() % 4 != 0 {
            return Err(EncodeError::NotWords(payload.len()));
        }
        if payload.len() > 4 * 255 {
            return Err(EncodeError::TooLong(payload.len()));
        }
        Ok(Self { code, payload })
    }
    /// The command or response code.
    pub fn code(&self) -> u8 {
        self.code
    }
    /// The payload bytes (without header, CRC and trailer).
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
    /// The frame's bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MIN_FRAME + self.payload.len());
        out.extend_from_slice(&HEADER);
        out.push(self.code);
        // The constructor guarantees at most 255 words.
        out.push((self.payload.len() / 4) as u8);
        out.extend_from_slice(&self.payload);
        let crc = crc16(&out[2..]);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&TRAILER);
        out
    }
}

fn le32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn malformed(what: &'static str, detail: impl Into<String>) -> DecodeError {
    DecodeError::Malformed {
        what,
        detail: detail.into(),
    }
}

/// A host -> device command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Connect,
    /// Write one block at `addr` (the data is exactly one block, padded with 0xFF).
    SendBlock {
        addr: u32,
        data: Vec<u8>,
    },
    SendEof,
    RequestBlock {
        addr: u32,
    },
    Complete,
    /// Any other code (e.g. flashtool's priming command 0x90); devices answer a command error.
    Other {
        code: u8,
        payload: Vec<u8>,
    },
}

impl Command {
    /// The frame for this command.
    pub fn to_frame(&self) -> Result<Frame, EncodeError> {
        match self {
            Command::Connect => Frame::new(code::CONNECT, Vec::new()),
            Command::SendBlock { addr, data } => {
                let mut payload = Vec::with_capacity(4 + data.len());
                payload.extend_from_slice(&addr.to_le_bytes());
                payload.extend_from_slice(data);
                Frame::new(code::SEND_BLOCK, payload)
            }
            Command::SendEof => Frame::new(code::SEND_EOF, Vec::new()),
            Command::RequestBlock { addr } => {
                Frame::new(code::REQUEST_BLOCK, addr.to_le_bytes().to_vec())
            }
            Command::Complete => Frame::new(code::COMPLETE, Vec::new()),
            Command::Other { code, payload } => Frame::new(*code, payload.clone()),
        }
    }
    /// The bytes on the wire.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        Ok(self.to_frame()?.encode())
    }
    /// The command a frame carries (what a device sees).
    pub fn from_frame(frame: &Frame) -> Result<Self, DecodeError> {
        let p = frame.payload();
        Ok(match frame.code() {
            code::CONNECT => Command::Connect,
            code::SEND_BLOCK => {
                let addr = le32(p, 0).ok_or_else(|| malformed("SEND_BLOCK", "no address"))?;
                Command::SendBlock {
                    addr,
                    data: p[4..].to_vec(),
                }
            }
            code::SEND_EOF => Command::SendEof,
            code::REQUEST_BLOCK => Command::RequestBlock {
                addr: le32(p, 0).ok_or_else(|| malformed("REQUEST_BLOCK", "no address"))?,
            },
            code::COMPLETE => Command::Complete,
            other => Command::Other {
                code: other,
                payload: p.to_vec(),
            },
        })
    }
    /// The command's code.
    pub fn code(&self) -> u8 {
        match self {
            Command::Connect => code::CONNECT,
            Command::SendBlock { .. } => code::SEND_BLOCK,
            Command::SendEof => code::SEND_EOF,
            Command::RequestBlock { .. } => code::REQUEST_BLOCK,
            Command::Complete => code::COMPLETE,
            Command::Other { code, .. } => *code,
        }
    }
    /// A short name for messages ("CONNECT", "SEND_BLOCK", ...).
    pub fn name(&self) -> &'static str {
        name_of(self.code())
    }
}

/// The protocol name of a command code.
fn name_of(code: u8) -> &'static str {
    match code {
        code::CONNECT => "CONNECT",
        code::SEND_BLOCK => "SEND_BLOCK",
        code::SEND_EOF => "SEND_EOF",
        code::REQUEST_BLOCK => "REQUEST_BLOCK",
        code::COMPLETE => "COMPLETE",
        _ => "unknown command",
    }
}

/// What a bootloader says about itself in its CONNECT answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectInfo {
    /// Protocol version, `0x00MMmmpp` (0x00010100 = 1.1.0).
    pub proto_version: u32,
    /// Flash address where the application starts.
    pub app_start: u32,
    /// Bytes per SEND_BLOCK / REQUEST_BLOCK.
    pub block_size: u32,
    /// The chip Katapult was built for (e.g. "stm32f103xe").
    pub mcu: String,
    /// Katapult's own software version (protocol >= 1.1.0).
    pub bootloader_version: Option<String>,
}

impl ConnectInfo {
    /// The protocol version as "major.minor.patch".
    pub fn proto_version_string(&self) -> String {
        let [_, major, minor, patch] = self.proto_version.to_be_bytes();
        format!("{major}.{minor}.{patch}")
    }
}

/// The payload of an ACK, by the command it acknowledges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ack {
    Connect(ConnectInfo),
    SendBlock {
        addr: u32,
    },
    SendEof {
        pages: u32,
    },
    RequestBlock {
        addr: u32,
        data: Vec<u8>,
    },
    Complete,
    /// An ACK of some other command (kept raw).
    Other {
        cmd: u32,
        payload: Vec<u8>,
    },
}

impl Ack {
    /// The code of the command this ACK acknowledges.
    pub fn acked(&self) -> u32 {
        u32::from(match self {
            Ack::Connect(_) => code::CONNECT,
            Ack::SendBlock { .. } => code::SEND_BLOCK,
            Ack::SendEof { .. } => code::SEND_EOF,
            Ack::RequestBlock { .. } => code::REQUEST_BLOCK,
            Ack::Complete => code::COMPLETE,
            Ack::Other { cmd, .. } => return *cmd,
        })
    }
}

/// A device -> host response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Ack(Ack),
    /// The device could not read our frame (bad header, length, CRC or trailer).
    Nack,
    /// The device read the frame but refused the command.
    CommandError,
    /// The device is busy (older firmware only).
    Busy,
}

fn pad_words(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

impl Response {
    /// The response a frame carries (what a host sees).
    pub fn from_frame(frame: &Frame) -> Result<Self, DecodeError> {
        match frame.code() {
            code::NACK => return Ok(Response::Nack),
            code::COMMAND_ERROR => return Ok(Response::CommandError),
            code::BUSY => return Ok(Response::Busy),
            code::ACK => {}
            other => return Err(malformed("response", format!("unknown code {other:#04x}"))),
        }
        let p = frame.payload();
        let cmd = le32(p, 0).ok_or_else(|| malformed("ACK", "no acknowledged command"))?;
        let rest = &p[4..];
        let ack = match u8::try_from(cmd) {
            Ok(code::CONNECT) => Ack::Connect(parse_connect(rest)?),
            Ok(code::SEND_BLOCK) => Ack::SendBlock {
                addr: le32(rest, 0).ok_or_else(|| malformed("SEND_BLOCK ACK", "no address"))?,
            },
            Ok(code::SEND_EOF) => Ack::SendEof {
                pages: le32(rest, 0).ok_or_else(|| malformed("SEND_EOF ACK", "no page count"))?,
            },
            Ok(code::REQUEST_BLOCK) => Ack::RequestBlock {
                addr: le32(rest, 0).ok_or_else(|| malformed("REQUEST_BLOCK ACK", "no address"))?,
                data: rest[4..].to_vec(),
            },
            Ok(code::COMPLETE) => Ack::Complete,
            _ => Ack::Other {
                cmd,
                payload: rest.to_vec(),
            },
        };
        Ok(Response::Ack(ack))
    }

    /// The frame for this response (what a device sends).
    pub fn to_frame(&self) -> Result<Frame, EncodeError> {
        let ack = match self {
            Response::Nack => return Frame::new(code::NACK, Vec::new()),
            Response::CommandError => return Frame::new(code::COMMAND_ERROR, Vec::new()),
            Response::Busy => return Frame::new(code::BUSY, Vec::new()),
            Response::Ack(ack) => ack,
        };
        let mut p = ack.acked().to_le_bytes().to_vec();
        match ack {
            Ack::Connect(info) => {
                p.extend_from_slice(&info.proto_version.to_le_bytes());
                p.extend_from_slice(&info.app_start.to_le_bytes());
                p.extend_from_slice(&info.block_size.to_le_bytes());
                p.extend_from_slice(info.mcu.as_bytes());
                pad_words(&mut p);
                p.extend_from_slice(&[0; 4]);
                if let Some(version) = &info.bootloader_version {
                    p.extend_from_slice(version.as_bytes());
                    pad_words(&mut p);
                }
            }
            Ack::SendBlock { addr } => p.extend_from_slice(&addr.to_le_bytes()),
            Ack::SendEof { pages } => p.extend_from_slice(&pages.to_le_bytes()),
            Ack::RequestBlock { addr, data } => {
                p.extend_from_slice(&addr.to_le_bytes());
                p.extend_from_slice(data);
            }
            Ack::Complete => {}
            Ack::Other { payload, .. } => p.extend_from_slice(payload),
        }
        Frame::new(code::ACK, p)
    }

    /// The bytes on the wire.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        Ok(self.to_frame()?.encode())
    }
}

fn parse_connect(rest: &[u8]) -> Result<ConnectInfo, DecodeError> {
    let (Some(proto_version), Some(app_start), Some(block_size)) =
        (le32(rest, 0), le32(rest, 4), le32(rest, 8))
    else {
        return Err(malformed("CONNECT ACK", "shorter than 12 bytes"));
    };
    // The tail holds the MCU name and (from 1.1.0) the bootloader version, NUL-separated and
    // NUL-padded: split on NULs and drop the empty parts.
    let mut parts = rest[12..]
        .split(|&b| b == 0)
        .filter(|part| !part.is_empty())
        .map(|part| String::from_utf8_lossy(part).into_owned());
    let mcu = parts
        .next()
        .ok_or_else(|| malformed("CONNECT ACK", "no MCU name"))?;
    let bootloader_version = parts.next();
    Ok(ConnectInfo {
        proto_version,
        app_start,
        block_size,
        mcu,
        bootloader_version,
    })
}

/// Streaming frame decoder: push bytes as they arrive, take frames out.
///
/// `next_frame` returns `Some(Ok(frame))` for each valid frame, one `Some(Err(Garbage))` per
/// run of discarded bytes (counting them), and `None` when it needs more bytes.
#[derive(Debug, Clone)]
pub struct Decoder {
    buf: Vec<u8>,
    max_frame: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

enum Scan {
    Frame(usize),
    NeedMore,
    Bad(Garbage),
}

impl Decoder {
    /// A decoder accepting any frame the format can express.
    pub fn new() -> Self {
        Self::with_max_frame(MAX_FRAME)
    }
    /// A decoder rejecting frames longer than `max_frame` bytes (a device uses 128).
    pub fn with_max_frame(max_frame: usize) -> Self {
        Self {
            buf: Vec::new(),
            max_frame: max_frame.clamp(MIN_FRAME, MAX_FRAME),
        }
    }
    /// Append received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }
    /// Forget everything buffered (after a timeout or before a retry).
    pub fn clear(&mut self) {
        self.buf.clear();
    }
    /// Bytes buffered but not yet returned (tests check the bound).
    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn scan(&self) -> Scan {
        let buf = &self.buf;
        if buf[0] != HEADER[0] {
            return Scan::Bad(Garbage::NoHeader);
        }
        if buf.len() < 2 {
            return Scan::NeedMore;
        }
        if buf[1] != HEADER[1] {
            return Scan::Bad(Garbage::NoHeader);
        }
        if buf.len() < 4 {
            return Scan::NeedMore;
        }
        let total = MIN_FRAME + 4 * usize::from(buf[3]);
        if total > self.max_frame {
            return Scan::Bad(Garbage::BadLength(total));
        }
        if buf.len() < total {
            return Scan::NeedMore;
        }
        if buf[total - 2..total] != TRAILER {
            return Scan::Bad(Garbage::BadTrailer);
        }
        let found = u16::from_le_bytes([buf[total - 4], buf[total - 3]]);
        let expected = crc16(&buf[2..total - 4]);
        if found != expected {
            return Scan::Bad(Garbage::BadCrc { expected, found });
        }
        Scan::Frame(total)
    }

    /// The next frame, a report of discarded garbage, or `None` if more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Result<Frame, DecodeError>> {
        let mut skipped = 0;
        let mut reason = None;
        while !self.buf.is_empty() {
            match self.scan() {
                Scan::Frame(total) => {
                    if let Some(reason) = reason {
                        // Report the garbage first; the frame stays buffered for the next call.
                        return Some(Err(DecodeError::Garbage { skipped, reason }));
                    }
                    let code = self.buf[2];
                    let payload = self.buf[4..total - 4].to_vec();
                    self.buf.drain(..total);
                    // scan() checked the length: at most 255 words.
                    return Some(Ok(Frame { code, payload }));
                }
                Scan::NeedMore => break,
                Scan::Bad(why) => {
                    reason.get_or_insert(why);
                    let next = self.buf[1..]
                        .iter()
                        .position(|&b| b == HEADER[0])
                        .map_or(self.buf.len(), |i| i + 1);
                    self.buf.drain(..next);
                    skipped += next;
                }
            }
        }
        reason.map(|reason| Err(DecodeError::Garbage { skipped, reason }))
    }
}

/// One thing a host reads off the wire, in the shape front ends show (`decode_all`):
/// `response` is `ack` (with the acknowledged `command`, the `payload` after it, and what
/// that ACK carries), `nack`, `command_error`, `busy`, `garbage` or `malformed`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Read {
    Ack {
        command: u32,
        #[serde(serialize_with = "as_bytes")]
        payload: Vec<u8>,
        #[serde(flatten)]
        carries: AckCarries,
    },
    Nack,
    CommandError,
    Busy,
    /// `bytes` were skipped before the next frame, for `reason`.
    Garbage {
        bytes: usize,
        reason: String,
    },
    Malformed {
        detail: String,
    },
}

/// What an ACK carries beyond the acknowledged command, by command.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum AckCarries {
    Connect {
        proto_version: String,
        app_start: u32,
        block_size: u32,
        mcu: String,
        bootloader_version: Option<String>,
    },
    Address {
        address: u32,
    },
    Pages {
        pages: u32,
    },
    Block {
        address: u32,
        #[serde(serialize_with = "as_bytes")]
        data: Vec<u8>,
    },
    Nothing {},
}

fn as_bytes<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(bytes)
}

/// Every frame in `data`, in order, as a host reads them; an unfinished frame at the end
/// is left out.
pub fn decode_all(data: &[u8]) -> Vec<Read> {
    let mut decoder = Decoder::new();
    decoder.push(data);
    let mut out = Vec::new();
    while let Some(item) = decoder.next_frame() {
        let found = item.and_then(|frame| Ok((Response::from_frame(&frame)?, frame)));
        out.push(match found {
            Ok((Response::Nack, _)) => Read::Nack,
            Ok((Response::CommandError, _)) => Read::CommandError,
            Ok((Response::Busy, _)) => Read::Busy,
            Ok((Response::Ack(ack), frame)) => Read::Ack {
                command: ack.acked(),
                // An ACK's payload starts with the acknowledged command (checked).
                payload: frame.payload()[4..].to_vec(),
                carries: match ack {
                    Ack::Connect(info) => AckCarries::Connect {
                        proto_version: info.proto_version_string(),
                        app_start: info.app_start,
                        block_size: info.block_size,
                        mcu: info.mcu,
                        bootloader_version: info.bootloader_version,
                    },
                    Ack::SendBlock { addr } => AckCarries::Address { address: addr },
                    Ack::SendEof { pages } => AckCarries::Pages { pages },
                    Ack::RequestBlock { addr, data } => AckCarries::Block {
                        address: addr,
                        data,
                    },
                    Ack::Complete | Ack::Other { .. } => AckCarries::Nothing {},
                },
            },
            Err(DecodeError::Garbage { skipped, reason }) => Read::Garbage {
                bytes: skipped,
                reason: reason.to_string(),
            },
            Err(err @ DecodeError::Malformed { .. }) => Read::Malformed {
                detail: err.to_string(),
            },
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        let digits: String = s.split_whitespace().collect();
        (0..digits.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
            .collect()
    }

    fn decode_all(bytes: &[u8]) -> Vec<Result<Frame, DecodeError>> {
        let mut d = Decoder::new();
        d.push(bytes);
        std::iter::from_fn(|| d.next_frame()).collect()
    }

    #[test]
    fn crc_check_value_is_mcrf4xx() {
        assert_eq!(crc16(b"123456789"), 0x6F91);
    }

    #[test]
    fn reference_command_vectors() {
        assert_eq!(
            Command::Connect.encode().unwrap(),
            hex("01 88 11 00 f1 7c 99 03")
        );
        assert_eq!(
            Command::Complete.encode().unwrap(),
            hex("01 88 15 00 91 1b 99 03")
        );
        assert_eq!(
            Command::SendEof.encode().unwrap(),
            hex("01 88 13 00 41 4f 99 03")
        );
        assert_eq!(
            Command::RequestBlock { addr: 0x0800_2000 }
                .encode()
                .unwrap(),
            hex("01 88 14 01 00 20 00 08 5b de 99 03")
        );
    }

    #[test]
    fn reference_response_vectors() {
        assert_eq!(
            Response::Nack.encode().unwrap(),
            hex("01 88 f1 00 68 95 99 03")
        );
        assert_eq!(
            Response::Ack(Ack::Complete).encode().unwrap(),
            hex("01 88 a0 01 15 00 00 00 00 2e 99 03")
        );
        let frames = decode_all(&hex(
            "01 88 f1 00 68 95 99 03 01 88 a0 01 15 00 00 00 00 2e 99 03",
        ));
        let responses: Vec<Response> = frames
            .iter()
            .map(|f| Response::from_frame(f.as_ref().unwrap()).unwrap())
            .collect();
        assert_eq!(
            responses,
            vec![Response::Nack, Response::Ack(Ack::Complete)]
        );
    }

    #[test]
    fn decodes_reference_commands_as_a_device_would() {
        let frames = decode_all(&hex(
            "01 88 11 00 f1 7c 99 03 01 88 14 01 00 20 00 08 5b de 99 03",
        ));
        let cmds: Vec<Command> = frames
            .iter()
            .map(|f| Command::from_frame(f.as_ref().unwrap()).unwrap())
            .collect();
        assert_eq!(
            cmds,
            vec![
                Command::Connect,
                Command::RequestBlock { addr: 0x0800_2000 }
            ]
        );
    }

    #[test]
    fn connect_ack_tail_parses_like_flashtool() {
        // MCU "stm32f103xe" (11 bytes -> 3 words), a zero word, version "v0.0.1-90-g5b" padded.
        let info = ConnectInfo {
            proto_version: PROTO_1_1_0,
            app_start: 0x0800_2000,
            block_size: 64,
            mcu: "stm32f103xe".into(),
            bootloader_version: Some("v0.0.1-90-g5b".into()),
        };
        let bytes = Response::Ack(Ack::Connect(info.clone())).encode().unwrap();
        assert_eq!(bytes[3] as usize * 4, bytes.len() - 8);
        // orig_cmd, proto, start, block size, 3 MCU words, zero word, 4 version words
        assert_eq!(bytes[3], 1 + 3 + 3 + 1 + 4);
        let frame = decode_all(&bytes).remove(0).unwrap();
        let Response::Ack(Ack::Connect(parsed)) = Response::from_frame(&frame).unwrap() else {
            panic!("not a CONNECT ack");
        };
        assert_eq!(parsed, info);
        assert_eq!(parsed.proto_version_string(), "1.1.0");
    }

    #[test]
    fn connect_ack_mcu_of_whole_words_and_no_version() {
        let info = ConnectInfo {
            proto_version: 0x0001_0000,
            app_start: 0x1000_0100,
            block_size: 64,
            mcu: "rp2040__".into(),
            bootloader_version: None,
        };
        let frame = Response::Ack(Ack::Connect(info.clone()))
            .to_frame()
            .unwrap();
        assert_eq!(
            Response::from_frame(&frame).unwrap(),
            Response::Ack(Ack::Connect(info))
        );
    }

    #[test]
    fn request_block_acks_carry_their_payload_and_others_stay_raw() {
        let data: Vec<u8> = (0..64).collect();
        let ack = Response::Ack(Ack::RequestBlock {
            addr: 0x0800_4000,
            data: data.clone(),
        });
        let frame = ack.to_frame().unwrap();
        assert_eq!(frame.payload().len(), 4 + 4 + 64);
        assert_eq!(Response::from_frame(&frame).unwrap(), ack);
        // GET_CANBUS_ID (0x16) is for CAN nodes, which flash through flashtool.py.
        let other = Response::Ack(Ack::Other {
            cmd: 0x16,
            payload: vec![0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0, 0],
        });
        let frame = other.to_frame().unwrap();
        assert_eq!(Response::from_frame(&frame).unwrap(), other);
    }

    #[test]
    fn connect_ack_bytes_as_real_katapult_sends_them() {
        // Katapult's command_connect: proto, app start, block size, the MCU name
        // zero-padded to whole words, ONE zero word, then the version zero-padded.
        let bytes = hex(
            "0188a00c 11000000 00010100 00400010 40000000 72703230 34300000 00000000 \
             76302e30 2e312d39 352d6733 62316335 66340000 c72a 9903",
        );
        let frame = decode_all(&bytes).remove(0).unwrap();
        let Response::Ack(Ack::Connect(info)) = Response::from_frame(&frame).unwrap() else {
            panic!("not a CONNECT ack");
        };
        assert_eq!(
            info,
            ConnectInfo {
                proto_version: PROTO_1_1_0,
                app_start: 0x1000_4000,
                block_size: 64,
                mcu: "rp2040".into(),
                bootloader_version: Some("v0.0.1-95-g3b1c5f4".into()),
            }
        );
        // And the codec writes exactly those bytes (the bench's bootloader is checked
        // against the same layout).
        assert_eq!(Response::Ack(Ack::Connect(info)).encode().unwrap(), bytes);
    }

    #[test]
    fn send_block_frame_layout() {
        let cmd = Command::SendBlock {
            addr: 0x0800_2000,
            data: vec![0xAB; 64],
        };
        let bytes = cmd.encode().unwrap();
        assert_eq!(bytes.len(), 8 + 4 + 64);
        assert_eq!(bytes.len(), DEVICE_MAX_FRAME - 52);
        assert_eq!(&bytes[..8], &hex("01 88 12 11 00 20 00 08"));
        assert_eq!(
            Command::from_frame(&decode_all(&bytes)[0].clone().unwrap()).unwrap(),
            cmd
        );
    }

    #[test]
    fn payloads_that_cannot_be_framed_are_refused() {
        let odd = Command::SendBlock {
            addr: 0,
            data: vec![0; 3],
        };
        assert_eq!(odd.encode(), Err(EncodeError::NotWords(7)));
        let long = Command::SendBlock {
            addr: 0,
            data: vec![0; 1024],
        };
        assert_eq!(long.encode(), Err(EncodeError::TooLong(1028)));
    }

    #[test]
    fn truncated_acks_are_malformed_not_panics() {
        for (code_word, extra) in [(0x11u32, 4usize), (0x12, 0), (0x13, 0), (0x14, 0)] {
            let mut p = code_word.to_le_bytes().to_vec();
            p.extend(std::iter::repeat_n(0u8, extra));
            let frame = Frame::new(code::ACK, p).unwrap();
            assert!(matches!(
                Response::from_frame(&frame),
                Err(DecodeError::Malformed { .. })
            ));
        }
        let empty_ack = Frame::new(code::ACK, vec![]).unwrap();
        assert!(Response::from_frame(&empty_ack).is_err());
        let unknown = Frame::new(0x42, vec![]).unwrap();
        assert!(Response::from_frame(&unknown).is_err());
    }

    #[test]
    fn resynchronises_after_garbage_and_reports_it_once() {
        let mut bytes = b"Klipper says hi\x00\xff".to_vec();
        bytes.extend(Response::Nack.encode().unwrap());
        let out = decode_all(&bytes);
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0],
            Err(DecodeError::Garbage {
                skipped: 17,
                reason: Garbage::NoHeader
            })
        );
        assert_eq!(out[1].as_ref().unwrap().code(), code::NACK);
    }

    #[test]
    fn corrupted_frame_is_skipped_and_the_next_one_found() {
        let mut bad = Command::RequestBlock { addr: 0x0800_2000 }
            .encode()
            .unwrap();
        bad[5] ^= 0x40; // flip a payload bit: CRC fails
        let mut bytes = bad.clone();
        bytes.extend(Command::Complete.encode().unwrap());
        let out = decode_all(&bytes);
        assert!(matches!(
            out[0],
            Err(DecodeError::Garbage {
                skipped: 12,
                reason: Garbage::BadCrc { .. }
            })
        ));
        assert_eq!(out[1].as_ref().unwrap().code(), code::COMPLETE);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn device_limit_rejects_long_frames() {
        let long = Command::SendBlock {
            addr: 0,
            data: vec![0; 256],
        }
        .encode()
        .unwrap();
        let mut d = Decoder::with_max_frame(DEVICE_MAX_FRAME);
        d.push(&long);
        assert!(matches!(
            d.next_frame(),
            Some(Err(DecodeError::Garbage {
                reason: Garbage::BadLength(268),
                ..
            }))
        ));
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let bytes = Command::Connect.encode().unwrap();
        let mut d = Decoder::new();
        for b in &bytes[..7] {
            d.push(&[*b]);
            assert!(d.next_frame().is_none());
        }
        d.push(&bytes[7..]);
        assert_eq!(d.next_frame().unwrap().unwrap().code(), code::CONNECT);
        assert!(d.next_frame().is_none());
        assert_eq!(d.buffered(), 0);
    }

    fn any_response() -> impl Strategy<Value = Response> {
        let ack = prop_oneof![
            (
                any::<u32>(),
                any::<u32>(),
                prop_oneof![Just(64u32), Just(128), Just(256), Just(512)],
                "[a-z0-9_]{1,16}",
                proptest::option::of("[ -~]{1,40}")
            )
                .prop_map(
                    |(proto_version, app_start, block_size, mcu, bootloader_version)| {
                        Ack::Connect(ConnectInfo {
                            proto_version,
                            app_start,
                            block_size,
                            mcu,
                            bootloader_version: bootloader_version.filter(|v| !v.contains('\0')),
                        })
                    }
                ),
            any::<u32>().prop_map(|addr| Ack::SendBlock { addr }),
            any::<u32>().prop_map(|pages| Ack::SendEof { pages }),
            (
                any::<u32>(),
                prop::collection::vec(any::<[u8; 4]>(), 0..128)
            )
                .prop_map(|(addr, words)| Ack::RequestBlock {
                    addr,
                    data: words.concat()
                }),
            Just(Ack::Complete),
        ];
        prop_oneof![
            ack.prop_map(Response::Ack),
            Just(Response::Nack),
            Just(Response::CommandError),
            Just(Response::Busy),
        ]
    }

    fn any_command() -> impl Strategy<Value = Command> {
        prop_oneof![
            Just(Command::Connect),
            (
                any::<u32>(),
                prop::collection::vec(any::<[u8; 4]>(), 0..200)
            )
                .prop_map(|(addr, words)| Command::SendBlock {
                    addr,
                    data: words.concat()
                }),
            Just(Command::SendEof),
            any::<u32>().prop_map(|addr| Command::RequestBlock { addr }),
            Just(Command::Complete),
        ]
    }

    proptest! {
        #[test]
        fn decoder_never_panics_and_never_grows_past_input(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..20)
        ) {
            let mut d = Decoder::new();
            let mut pushed = 0;
            for chunk in &chunks {
                d.push(chunk);
                pushed += chunk.len();
                while let Some(item) = d.next_frame() {
                    if let Ok(frame) = item {
                        let _ = Response::from_frame(&frame);
                        let _ = Command::from_frame(&frame);
                    }
                }
                prop_assert!(d.buffered() <= pushed.min(MAX_FRAME));
            }
        }

        #[test]
        fn every_response_round_trips(resp in any_response(), split in 0usize..600) {
            let bytes = resp.encode().unwrap();
            let mut d = Decoder::new();
            let split = split.min(bytes.len());
            d.push(&bytes[..split]);
            let frame = if let Some(got) = d.next_frame() {
                got.unwrap()
            } else {
                d.push(&bytes[split..]);
                d.next_frame().unwrap().unwrap()
            };
            prop_assert_eq!(Response::from_frame(&frame).unwrap(), resp);
            prop_assert!(d.next_frame().is_none());
        }

        #[test]
        fn every_command_round_trips(cmd in any_command()) {
            let out = decode_all(&cmd.encode().unwrap());
            prop_assert_eq!(out.len(), 1);
            let frame = out[0].clone().unwrap();
            prop_assert_eq!(Command::from_frame(&frame).unwrap(), cmd);
        }

        #[test]
        fn a_frame_after_any_garbage_is_recovered(
            garbage in prop::collection::vec(any::<u8>(), 0..200),
            resp in any_response(),
        ) {
            // Garbage may fake a long header; trailing zeros let any fake length resolve.
            let mut bytes = garbage;
            bytes.extend(resp.encode().unwrap());
            bytes.extend(std::iter::repeat_n(0u8, MAX_FRAME));
            let frames: Vec<Response> = decode_all(&bytes)
                .into_iter()
                .filter_map(Result::ok)
                .filter_map(|f| Response::from_frame(&f).ok())
                .collect();
            prop_assert!(frames.contains(&resp));
        }
    }
}
