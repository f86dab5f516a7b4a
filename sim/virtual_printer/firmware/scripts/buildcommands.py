#!/usr/bin/env python3
"""Turn the compile-time requests of the objects into the data dictionary.

  buildcommands.py -d OUT/klipper.dict -t "CC;LD;OBJCOPY" REQUESTS \
      OUT/compile_time_request.c

REQUESTS holds NUL-separated strings the C macros of src/command.h put in the
.compile_time_request section. The dictionary (klipper.dict) is JSON with keys app,
build_versions, commands, config, enumerations, license, responses, version; the C file
embeds it zlib-compressed (what identify serves) and the version string.
"""

import argparse
import datetime
import json
import os
import socket
import subprocess
import zlib

TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_version():
    try:
        out = subprocess.run(
            ["git", "-C", TREE, "describe", "--always", "--tags", "--long", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return out or None


def file_version():
    try:
        with open(os.path.join(TREE, "klippy", ".version")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def build_version():
    version = git_version()
    from_git = version is not None
    if version is None:
        version = file_version() or "?"
    if not from_git or version.endswith("-dirty"):
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        version = "{}-{}-{}".format(version, stamp, socket.gethostname().split(".")[0])
    return version


def tool_versions(tools):
    parts = []
    for tool in tools.split(";"):
        tool = tool.strip()
        if not tool:
            continue
        try:
            first = subprocess.run(
                [tool, "--version"], capture_output=True, text=True, check=True
            ).stdout.splitlines()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            continue
        name = os.path.basename(tool)
        parts.append("{}: {}".format(name, first.split(")")[-1].strip() or first))
    return " ".join(parts)


def parse_value(text):
    text = text.strip()
    if text.startswith('"') and text.endswith('"'):
        return text[1:-1]
    try:
        return int(text, 0)
    except ValueError:
        return text


def assign_ids(formats, fixed, fixed_id, first):
    """Ids for message formats: ``fixed`` keeps ``fixed_id``, the rest count from
    ``first`` in sorted order (responses from 90: those past 95 take two bytes)."""
    ids = {fixed: fixed_id}
    for fmt in sorted(f for f in formats if f != fixed):
        ids[fmt] = first + len(ids) - 1
    return ids


def main():
    p = argparse.ArgumentParser()
    p.add_argument("-d", dest="dict_out", required=True)
    p.add_argument("-t", dest="tools", default="")
    p.add_argument("requests")
    p.add_argument("c_out")
    args = p.parse_args()

    with open(args.requests, "rb") as f:
        raw = f.read().decode()
    commands, responses, config, enums, strings = {}, set(), {}, {}, set()
    for req in (r.strip() for r in raw.split("\0")):
        if not req:
            continue
        kind, _, rest = req.partition(" ")
        if kind == "_DECL_COMMAND":
            func, _, fmt = rest.partition(" ")
            commands[fmt] = func
        elif kind == "_DECL_RESPONSE":
            responses.add(rest)
        elif kind == "_DECL_CONSTANT":
            name, _, value = rest.partition(" ")
            config[name] = parse_value(value)
        elif kind == "_DECL_ENUMERATION":
            enum, name, value = rest.split(" ", 2)
            enums.setdefault(enum, {})[name] = parse_value(value)
        elif kind == "_DECL_ENUMERATION_RANGE":
            enum, name, value, count = rest.split(" ", 3)
            enums.setdefault(enum, {})[name] = [parse_value(value), parse_value(count)]
        elif kind == "_DECL_STATIC_STR":
            strings.add(rest)
        else:
            raise SystemExit(f"unknown compile time request {req!r}")

    # identify and identify_response have ids fixed by the host (klippy's defaults).
    cmd_ids = assign_ids(commands, "identify offset=%u count=%c", 1, 2)
    resp_ids = assign_ids(responses, "identify_response offset=%u data=%.*s", 0, 90)
    enums["static_string_id"] = {s: i for i, s in enumerate(sorted(strings), 2)}

    version = build_version()
    data = {
        "app": "Kalico",
        "build_versions": tool_versions(args.tools),
        "commands": cmd_ids,
        "config": config,
        "enumerations": enums,
        "license": "GNU GPLv3",
        "responses": resp_ids,
        "version": version,
    }
    text = json.dumps(data, indent=2, sort_keys=True)
    tmp = args.dict_out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, args.dict_out)

    blob = zlib.compress(
        json.dumps(data, separators=(",", ":"), sort_keys=True).encode(), 9
    )
    rows = []
    for i in range(0, len(blob), 16):
        rows.append("    " + ", ".join(f"0x{b:02x}" for b in blob[i : i + 16]) + ",")
    body = "\n".join(rows)
    c_code = (
        "/* Generated by scripts/buildcommands.py: the data dictionary. */\n"
        "#include <stdint.h>\n"
        f"const char command_version[] = {json.dumps(version)};\n"
        "const uint8_t command_identify_data[] __attribute__((used)) = {\n"
        f"{body}\n}};\n"
        "const uint32_t command_identify_size = sizeof(command_identify_data);\n"
    )
    tmp = args.c_out + ".tmp"
    with open(tmp, "w") as f:
        f.write(c_code)
    os.replace(tmp, args.c_out)


if __name__ == "__main__":
    main()
