"""The bench's wire codecs and protocol state machines, against reference vectors."""

import struct

import pytest

import kflash
from virtual_printer import proto
from virtual_printer.app import KlipperApp
from virtual_printer.katapult import KatapultBootloader

DICT = {
    "app": "Kalico",
    "version": "v0.13.0-7-gabc",
    "commands": {
        "identify offset=%u count=%c": 1,
        "get_uptime": 2,
        "get_clock": 3,
        "get_config": 4,
        "allocate_oids count=%c": 5,
        "finalize_config crc=%u": 6,
        "emergency_stop": 7,
        "clear_shutdown": 8,
        "config_reset": 9,
    },
    "responses": {
        "identify_response offset=%u data=%.*s": 0,
        "clock clock=%u": 81,
        "config is_config=%c crc=%u is_shutdown=%c move_count=%hu": 82,
        "shutdown clock=%u static_string_id=%hu": 83,
        "is_shutdown static_string_id=%hu": 84,
        "starting": 85,
    },
    "config": {"CLOCK_FREQ": 50000000, "STATS_SUMSQ_BASE": 256, "MCU": "linux"},
    "enumerations": {"static_string_id": {"Command request": 8}},
}


def test_crc_check_value():
    assert proto.crc16(b"123456789") == 0x6F91


@pytest.mark.parametrize(
    "value,encoded",
    [
        (0, "00"),
        (95, "5f"),
        (96, "8060"),
        (-1, "7f"),
        (-32, "60"),
        (-33, "ff5f"),
        (128, "8100"),
        (12288, "80e000"),
        (50000000, "97ebe100"),
    ],
)
def test_vlq_vectors(value, encoded):
    assert proto.encode_vlq(value).hex() == encoded
    assert proto.decode_vlq(bytes.fromhex(encoded), 0) == (value, len(encoded) // 2)


def test_vlq_decodes_the_hosts_unsigned_form():
    v, _ = proto.decode_vlq(bytes.fromhex("8ec9cdef14"), 0)
    assert v & 0xFFFFFFFF == 3912464276


def test_ack_frames_match_capture():
    assert proto.frame_block(0).hex() == "05109e817e"
    assert proto.frame_block(0xF).hex() == "051f66767e"


def test_katapult_frames_match_reference():
    # The bench's encoder and the core's agree with the reference vectors.
    assert kflash.katapult_encode(0x11) == proto.katapult_frame(0x11)
    assert kflash.katapult_encode(0xF1) == bytes.fromhex("0188f10068959903")
    assert proto.katapult_frame(0x11).hex() == "01881100f17c9903"
    assert proto.katapult_frame(0x15).hex() == "01881500911b9903"
    assert (
        proto.katapult_frame(0x14, struct.pack("<I", 0x08002000)).hex()
        == "01881401002000085bde9903"
    )


def host_block(seq, payload):
    head = bytes([len(payload) + 5, 0x10 | seq]) + payload
    crc = proto.crc16(head)
    return head + bytes([crc >> 8, crc & 0xFF, 0x7E])


def split_blocks(data):
    out = []
    while data:
        n = data[0]
        out.append(data[:n])
        data = data[n:]
    return out


def test_app_survives_stk500_junk_and_answers_before_ack():
    out = bytearray()
    app = KlipperApp(DICT, out.extend)
    app.feed(bytes.fromhex("1b0100010e1104"))  # stk500v2 junk first
    identify = bytes.fromhex("010028")
    for _ in range(5):  # the host retransmits (with a leading sync byte)
        app.feed(b"\x7e" + host_block(0, identify))
        blocks = split_blocks(bytes(out))
        if any(len(b) > 5 for b in blocks):
            break
    naks = [b for b in blocks if len(b) == 5 and b != proto.frame_block(1)]
    assert len(naks) <= 1  # one NAK per run of garbage
    data = [i for i, b in enumerate(blocks) if len(b) > 5]
    assert len(data) == 1
    assert blocks[data[0] + 1] == proto.frame_block(1)  # response first, then ACK


def test_app_config_handshake_and_shutdown():
    out = bytearray()
    app = KlipperApp(DICT, out.extend)
    app.feed(host_block(0, bytes([5, 0, 6]) + proto.encode_vlq(3912464276)))
    assert app.is_config and app.crc == 3912464276
    out.clear()
    app.feed(host_block(1, bytes([7])))  # emergency_stop
    msgid, pos = proto.decode_vlq(bytes(out), 2)
    assert msgid == 83
    app.feed(host_block(2, bytes([5, 0])))  # allocate_oids while shut down
    assert app.shutdown_reason == 8
    app.feed(host_block(3, bytes([9])))  # config_reset: a real reset
    assert not app.is_config and app.next_seq == 0 and app.shutdown_reason is None


def make_bootloader(tmp_path, faults=None):
    out = bytearray()
    done = []
    bl = KatapultBootloader(
        mcu="stm32f446xx",
        app_start=0x8008000,
        block_size=64,
        image_path=str(tmp_path / "flash.bin"),
        write=out.extend,
        faults=lambda: faults or {},
        on_complete=lambda: done.append(1),
    )
    return bl, out, done


def test_katapult_connect_is_laid_out_as_real_katapult_and_the_core_reads_it(
    tmp_path,
):
    bl, out, _ = make_bootloader(tmp_path)
    bl.feed(kflash.katapult_encode(0x11))
    # Katapult's command_connect: orig_cmd, proto, start, block size, the MCU name
    # zero-padded to whole words, ONE zero word, the version zero-padded.
    payload = struct.pack("<IIII", 0x11, 0x00010100, 0x8008000, 64)
    payload += b"stm32f446xx\0" + b"\0" * 4 + b"v0.0.1-sim\0\0"
    assert bytes(out) == kflash.katapult_encode(0xA0, payload)
    (ack,) = kflash.katapult_decode(bytes(out))
    assert ack["response"] == "ack" and ack["command"] == 0x11
    assert (ack["mcu"], ack["bootloader_version"], ack["proto_version"]) == (
        "stm32f446xx",
        "v0.0.1-sim",
        "1.1.0",
    )
    assert (ack["app_start"], ack["block_size"]) == (0x8008000, 64)


def test_katapult_priming_command_and_garbage(tmp_path):
    bl, out, _ = make_bootloader(tmp_path)
    bl.feed(kflash.katapult_encode(0x90))
    assert [r["response"] for r in kflash.katapult_decode(bytes(out))] == [
        "command_error"
    ]
    out.clear()
    bl.feed(b"\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd")
    # exactly one NACK for the run of garbage
    assert [r["response"] for r in kflash.katapult_decode(bytes(out))] == ["nack"]


def test_katapult_stores_blocks_and_rejects_low_addresses(tmp_path):
    bl, out, done = make_bootloader(tmp_path)
    block = bytes(range(64))
    bl.feed(proto.katapult_frame(0x12, struct.pack("<I", 0x8000000) + block))
    assert out[2] == 0xF2
    out.clear()
    bl.feed(proto.katapult_frame(0x12, struct.pack("<I", 0x8008040) + block))
    assert out[2] == 0xA0
    bl.feed(proto.katapult_frame(0x13))
    bl.feed(proto.katapult_frame(0x15))
    assert done == [1]
    assert (tmp_path / "flash.bin").read_bytes() == b"\xff" * 64 + block
