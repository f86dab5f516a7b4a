//! Katapult over CAN: the admin sequence and a byte port over a CAN node, behind a
//! transport seam.
//!
//! Owns the admin messages on id 0x3f0 (answers on 0x3f1): QUERY_UNASSIGNED `[00]`,
//! REQUEST_BOOTLOADER `[02, uuid(6)]`, SET_NODEID `[11, uuid(6), nodeid]`, CLEAR_NODEID
//! `[12]`, and the node answer `[20, uuid(6), app]`; node `n` is addressed on 0x100+2n and
//! answers on 0x101+2n. [`CanPort`] turns a node into a [`Port`] (frames of up to 8 bytes),
//! so the same flash session as serial runs over it.
//!
//! No real CAN socket here (containers have no AF_CAN): a real transport implements
//! [`CanTransport`] over a raw socket; the tests use a fake. Thread-safety: one thread.

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::events::Sink;
use crate::process::Cancel;

use super::flasher::{flash_connected, sleep_cancellable, FlashReport, Session, Timing};
use super::image::{image_info, read_image};
use super::port::Port;
use super::{Error, Step};

/// Admin messages from the host to every node.
pub const ADMIN_ID: u32 = 0x3f0;
/// Admin answers from nodes.
pub const ADMIN_RESP_ID: u32 = 0x3f1;
pub const CMD_QUERY_UNASSIGNED: u8 = 0x00;
pub const CMD_REQUEST_BOOTLOADER: u8 = 0x02;
pub const CMD_SET_NODEID: u8 = 0x11;
pub const CMD_CLEAR_NODEID: u8 = 0x12;
pub const RESP_NEED_NODEID: u8 = 0x20;
/// The node id flashtool assigns to the node it flashes (talks on 0x202/0x203).
pub const FLASH_NODE_ID: u8 = 129;

/// Raw CAN frames in and out (a SocketCAN socket in production, a fake in tests).
pub trait CanTransport: Send {
    /// Send one frame (at most 8 data bytes).
    fn send(&mut self, id: u32, data: &[u8]) -> io::Result<()>;
    /// The next frame received within `timeout`, if any.
    fn recv(&mut self, timeout: Duration) -> io::Result<Option<(u32, Vec<u8>)>>;
}

/// What runs on a node that answered QUERY_UNASSIGNED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum App {
    Klipper,
    Katapult,
    Unknown(u8),
}

/// A node waiting for a node id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnassignedNode {
    pub uuid: [u8; 6],
    pub app: App,
}

/// The (host -> node, node -> host) CAN ids of node `node_id`.
pub fn node_can_ids(node_id: u8) -> (u32, u32) {
    let base = 0x100 + 2 * u32::from(node_id);
    (base, base + 1)
}

/// Parse a uuid written as 12 hex digits.
pub fn parse_uuid(text: &str) -> Option<[u8; 6]> {
    let text = text.trim().trim_start_matches("0x");
    if text.len() != 12 {
        return None;
    }
    let mut uuid = [0u8; 6];
    for (i, byte) in uuid.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(uuid)
}

fn admin_err(source: io::Error) -> Error {
    Error::Io {
        path: "can".into(),
        step: Step::CanAdmin,
        source,
    }
}

/// Ask every unassigned node to identify itself; collect answers for `window`.
pub fn query_unassigned(
    t: &mut dyn CanTransport,
    window: Duration,
) -> Result<Vec<UnassignedNode>, Error> {
    t.send(ADMIN_ID, &[CMD_QUERY_UNASSIGNED])
        .map_err(admin_err)?;
    let end = Instant::now() + window;
    let mut nodes: Vec<UnassignedNode> = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let Some((id, data)) = t.recv(left).map_err(admin_err)? else {
            break;
        };
        if id != ADMIN_RESP_ID || data.len() < 7 || data[0] != RESP_NEED_NODEID {
            continue;
        }
        let mut uuid = [0u8; 6];
        uuid.copy_from_slice(&data[1..7]);
        let app = match data.get(7) {
            Some(0x01) => App::Klipper,
            Some(&CMD_SET_NODEID) => App::Katapult,
            Some(&other) => App::Unknown(other),
            None => App::Unknown(0),
        };
        if !nodes.iter().any(|n| n.uuid == uuid) {
            nodes.push(UnassignedNode { uuid, app });
        }
    }
    Ok(nodes)
}

/// Ask the Klipper application with `uuid` to reboot into Katapult.
pub fn request_bootloader(t: &mut dyn CanTransport, uuid: [u8; 6]) -> Result<(), Error> {
    let mut msg = vec![CMD_REQUEST_BOOTLOADER];
    msg.extend_from_slice(&uuid);
    t.send(ADMIN_ID, &msg).map_err(admin_err)
}

/// Make every node forget its node id.
pub fn clear_node_ids(t: &mut dyn CanTransport) -> Result<(), Error> {
    t.send(ADMIN_ID, &[CMD_CLEAR_NODEID]).map_err(admin_err)
}

/// Give the node with `uuid` the node id `node_id`.
pub fn set_node_id(t: &mut dyn CanTransport, uuid: [u8; 6], node_id: u8) -> Result<(), Error> {
    let mut msg = vec![CMD_SET_NODEID];
    msg.extend_from_slice(&uuid);
    msg.push(node_id);
    t.send(ADMIN_ID, &msg).map_err(admin_err)
}

/// A byte stream to one node over CAN (the node's tx/rx ids), usable as a [`Port`].
pub struct CanPort<'a> {
    transport: &'a mut dyn CanTransport,
    tx: u32,
    rx: u32,
    pending: VecDeque<u8>,
}

impl<'a> CanPort<'a> {
    /// The port of node `node_id`.
    pub fn new(transport: &'a mut dyn CanTransport, node_id: u8) -> Self {
        let (tx, rx) = node_can_ids(node_id);
        Self {
            transport,
            tx,
            rx,
            pending: VecDeque::new(),
        }
    }
}

impl Port for CanPort<'_> {
    fn read(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        let mut budget = timeout;
        while self.pending.is_empty() {
            let t0 = Instant::now();
            match self.transport.recv(budget)? {
                Some((id, data)) if id == self.rx => self.pending.extend(data),
                Some(_) => budget = budget.saturating_sub(t0.elapsed()),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.pending.len());
        for (slot, byte) in buf.iter_mut().zip(self.pending.drain(..n)) {
            *slot = byte;
        }
        Ok(n)
    }
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        for chunk in data.chunks(8) {
            self.transport.send(self.tx, chunk)?;
        }
        Ok(())
    }
    fn drain(&mut self, _timeout: Duration) -> io::Result<()> {
        Ok(())
    }
    fn close(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Pauses of the CAN sequence (flashtool's: 1 s after the request, 0.5 s after clearing).
#[derive(Debug, Clone)]
pub struct CanTiming {
    pub after_request: Duration,
    pub after_clear: Duration,
}

impl Default for CanTiming {
    fn default() -> Self {
        Self {
            after_request: Duration::from_secs(1),
            after_clear: Duration::from_millis(500),
        }
    }
}

/// Flash `firmware` to the CAN node `uuid`: request the bootloader, clear and assign node
/// ids, CONNECT, check GET_CANBUS_ID equals `uuid`, then the same write/verify/COMPLETE as
/// serial.
#[allow(clippy::too_many_arguments)]
pub fn flash_can(
    t: &mut dyn CanTransport,
    uuid: [u8; 6],
    firmware: &Path,
    timing: &Timing,
    can_timing: &CanTiming,
    cancel: &Cancel,
    sink: &Sink,
) -> Result<FlashReport, Error> {
    let image = read_image(firmware)?;
    let dictionary = image_info(&image).ok();
    request_bootloader(t, uuid)?;
    sleep_cancellable(can_timing.after_request, Step::CanAdmin, cancel)?;
    clear_node_ids(t)?;
    sleep_cancellable(can_timing.after_clear, Step::CanAdmin, cancel)?;
    set_node_id(t, uuid, FLASH_NODE_ID)?;
    let label: std::path::PathBuf = format!("can:{}", hex(&uuid)).into();
    let mut port = CanPort::new(t, FLASH_NODE_ID);
    let mut session = Session::new(&mut port, &label, timing, cancel);
    let info = session.connect(timing.connect_tries, timing.connect)?;
    let got = session.canbus_id()?;
    if got != uuid {
        let _ = session.complete();
        return Err(Error::Protocol {
            step: Step::CanbusId,
            addr: None,
            detail: format!(
                "node answered with uuid {}, expected {}",
                hex(&got),
                hex(&uuid)
            ),
        });
    }
    flash_connected(
        &mut session,
        &info,
        &image,
        dictionary.as_ref(),
        &label,
        sink,
    )
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::katapult::fake::FakeBootloader;
    use crate::katapult::image::tests::fake_image;

    /// A CAN bus with one node: Klipper until REQUEST_BOOTLOADER, then Katapult.
    struct FakeBus {
        sent: Vec<(u32, Vec<u8>)>,
        inbox: VecDeque<(u32, Vec<u8>)>,
        node: FakeBootloader,
        node_id: Option<u8>,
        in_bootloader: bool,
    }

    impl CanTransport for FakeBus {
        fn send(&mut self, id: u32, data: &[u8]) -> io::Result<()> {
            assert!(data.len() <= 8, "CAN frames carry at most 8 bytes");
            self.sent.push((id, data.to_vec()));
            let uuid = self.node.uuid;
            if id == ADMIN_ID {
                match data[0] {
                    CMD_QUERY_UNASSIGNED if self.node_id.is_none() => {
                        let app = if self.in_bootloader {
                            CMD_SET_NODEID
                        } else {
                            0x01
                        };
                        let mut resp = vec![RESP_NEED_NODEID];
                        resp.extend_from_slice(&uuid);
                        resp.push(app);
                        self.inbox.push_back((ADMIN_RESP_ID, resp));
                    }
                    CMD_REQUEST_BOOTLOADER if data[1..7] == uuid => self.in_bootloader = true,
                    CMD_CLEAR_NODEID => self.node_id = None,
                    CMD_SET_NODEID if data[1..7] == uuid && self.in_bootloader => {
                        self.node_id = Some(data[7]);
                    }
                    _ => {}
                }
            } else if let Some(n) = self.node_id {
                let (tx, rx) = node_can_ids(n);
                if id == tx {
                    for (_, reply) in self.node.feed(data) {
                        for chunk in reply.chunks(8) {
                            self.inbox.push_back((rx, chunk.to_vec()));
                        }
                    }
                }
            }
            Ok(())
        }
        fn recv(&mut self, _timeout: Duration) -> io::Result<Option<(u32, Vec<u8>)>> {
            Ok(self.inbox.pop_front())
        }
    }

    fn bus() -> FakeBus {
        FakeBus {
            sent: Vec::new(),
            inbox: VecDeque::new(),
            node: FakeBootloader::new("stm32g0b1xx", 64),
            node_id: None,
            in_bootloader: false,
        }
    }

    #[test]
    fn admin_messages_have_the_reference_bytes() {
        let mut b = bus();
        let uuid = parse_uuid("0a1b2c3d4e5f").unwrap();
        let nodes = query_unassigned(&mut b, Duration::from_millis(50)).unwrap();
        assert_eq!(
            nodes,
            vec![UnassignedNode {
                uuid,
                app: App::Klipper
            }]
        );
        request_bootloader(&mut b, uuid).unwrap();
        clear_node_ids(&mut b).unwrap();
        set_node_id(&mut b, uuid, FLASH_NODE_ID).unwrap();
        let sent: Vec<(u32, Vec<u8>)> = b.sent.clone();
        assert_eq!(
            sent,
            vec![
                (0x3f0, vec![0x00]),
                (0x3f0, vec![0x02, 0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f]),
                (0x3f0, vec![0x12]),
                (0x3f0, vec![0x11, 0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f, 129]),
            ]
        );
        assert_eq!(node_can_ids(FLASH_NODE_ID), (0x202, 0x203));
        let nodes = query_unassigned(&mut b, Duration::from_millis(50)).unwrap();
        assert!(nodes.is_empty(), "an assigned node stays quiet");
        assert_eq!(parse_uuid("0a1b2c3d4e"), None);
        assert_eq!(parse_uuid("zz1b2c3d4e5f"), None);
    }

    #[test]
    fn flash_over_can_checks_the_uuid_then_writes_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let fw = dir.path().join("klipper.bin");
        let image = fake_image("stm32g0b1xx", "v0.13.0-1-gabc", 6, 3000);
        std::fs::write(&fw, &image).unwrap();
        let mut b = bus();
        let uuid = b.node.uuid;
        let quick = CanTiming {
            after_request: Duration::ZERO,
            after_clear: Duration::ZERO,
        };
        let report = flash_can(
            &mut b,
            uuid,
            &fw,
            &Timing::default(),
            &quick,
            &Cancel::new(),
            &crate::events::discard(),
        )
        .unwrap();
        assert_eq!(report.bytes, image.len());
        assert_eq!(b.node.read(0x0800_2000, image.len()), image);
        assert!(b.node.completed);
        assert!(b.sent.iter().skip(4).all(|(id, _)| *id == 0x202));
        assert!(matches!(
            b.node.log[1],
            crate::katapult::codec::Command::GetCanbusId
        ));

        // A node that reports another uuid is refused before anything is written.
        let mut b = bus();
        let real = b.node.uuid;
        b.node.uuid = [1, 2, 3, 4, 5, 6];
        let mut wrapped = Mismatched {
            inner: b,
            admin_uuid: real,
        };
        let err = flash_can(
            &mut wrapped,
            real,
            &fw,
            &Timing::default(),
            &quick,
            &Cancel::new(),
            &crate::events::discard(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("uuid 010203040506"), "{err}");
        assert!(wrapped.inner.node.flash.is_empty());
    }

    /// A bus whose node takes admin messages for `admin_uuid` but reports its own uuid.
    struct Mismatched {
        inner: FakeBus,
        admin_uuid: [u8; 6],
    }

    impl CanTransport for Mismatched {
        fn send(&mut self, id: u32, data: &[u8]) -> io::Result<()> {
            if id == ADMIN_ID && data.len() >= 7 && data[1..7] == self.admin_uuid {
                let mut d = data.to_vec();
                d[1..7].copy_from_slice(&self.inner.node.uuid);
                return self.inner.send(id, &d);
            }
            self.inner.send(id, data)
        }
        fn recv(&mut self, timeout: Duration) -> io::Result<Option<(u32, Vec<u8>)>> {
            self.inner.recv(timeout)
        }
    }
}
