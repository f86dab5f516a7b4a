"""How kflash's plans, reports and runs read, for every front end.

The CLI prints tables (``plan_table``, ``report_table``); klippy's ``[kflash]``
extra posts a run's summary to the console (``summary``) and shows the plan as
a Mainsail/Fluidd dialog (``plan_prompt``: the ``// action:prompt_*`` lines
without their prefix, one console line each). Both say the outage the same way
(``outage``: the report's own sentence, ``service.outage``, when the core gives
one). Pure functions of the core's JSON (``kflash.results``): no I/O.
"""

__all__ = [
    "outage",
    "plan_devices",
    "plan_prompt",
    "plan_table",
    "report_table",
    "result_summary",
    "summary",
    "table",
    "text",
    "version_arrow",
]

#: Plan states that want a flash.
TODO_STATES = ("outdated", "unknown")


def text(value, default="?"):
    """A value for one line of text ("?" for nothing)."""
    if value is None or value == "":
        return default
    return str(value).replace("\n", " ")


def table(rows, headers):
    """A plain text table (rows of cells; None shows as "-")."""
    cells = [[str(c) if c is not None else "-" for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))

    def line(row):
        return "  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip()

    return "\n".join([line(headers)] + [line(row) for row in cells])


def version_arrow(before, after):
    before = before or "?"
    return f"{before} -> {after}" if after else before


def outage(report):
    """The sentence about klipper's outage, or None when it was not stopped."""
    svc = (report or {}).get("service") or {}
    if not svc.get("stopped"):
        return None
    if svc.get("outage"):
        return str(svc["outage"])
    flashing = sum(d.get("flash_s") or 0 for d in report.get("devices") or []
                   if isinstance(d, dict))
    return (f"klipper was stopped for {svc.get('downtime_s') or 0:.1f} s "
            f"(flashing {flashing:.1f} s, stop {svc.get('stop_s') or 0:.1f} s, "
            f"start {svc.get('start_s') or 0:.1f} s)")


def what_to_do(hint, indent="  "):
    """A hint: its first line after ``what to do:``, the command below it."""
    first, *rest = str(hint).splitlines() or [""]
    lines = [f"{indent}what to do: {first}"]
    lines += [f"{indent}  {line.strip()}" for line in rest]
    return "\n".join(lines)


def recovered_lines(recovered):
    """What a run did first with the boards an earlier run left behind."""
    lines = []
    for r in recovered or []:
        lines.append(f"{r['key']}: {r['detail']}")
        if r.get("hint"):
            lines.append(what_to_do(r["hint"]))
    return lines


# ----------------------------------------------------------------- the plan


def plan_table(plan):
    """``kflash plan``: a line about Moonraker or the printer, then the table."""
    lines = []
    if not plan.get("moonraker"):
        lines.append(f"Moonraker unreachable ({plan.get('moonraker_error')}): "
                     "current versions unknown, every device would be flashed.")
    elif plan.get("print_state"):
        lines.append(f"printer: {plan['print_state']}")
    rows = [[d["key"], d.get("mcu"), d.get("method"),
             d.get("resolved") or d.get("endpoint"), d.get("version_before"),
             d.get("version_target"), d.get("state"), d.get("action"),
             d.get("reason")] for d in plan.get("devices") or []]
    lines.append(table(rows, ["DEVICE", "MCU", "METHOD", "ENDPOINT", "CURRENT",
                              "TARGET", "STATE", "ACTION", "WHY"]))
    for d in plan.get("devices") or []:
        if d.get("hint"):
            lines.append(f"\n{d['key']}: {d['reason']}")
            lines.append(what_to_do(d["hint"]))
    return lines


def plan_devices(plan):
    """The plan's devices as the dialog shows them: key, mcu, current,
    target, state, action, reason, bootloader (where a board sits in one)."""
    out = []
    for d in (plan or {}).get("devices") or []:
        if not isinstance(d, dict) or not d.get("key"):
            continue
        out.append({"key": str(d["key"]), "mcu": d.get("mcu"),
                    "current": d.get("version_before"),
                    "target": d.get("version_target"),
                    "state": d.get("state") or "unknown",
                    "action": d.get("action"), "reason": d.get("reason"),
                    "bootloader": d.get("bootloader")})
    return out


def plan_prompt(plan):
    """The plan dialog: ``prompt_*`` lines, ``prompt_begin`` to
    ``prompt_show``; a Flash button per MCU, "Update all outdated", Close."""
    devices = plan_devices(plan)
    lines = ["prompt_begin kflash: MCU firmware"]
    if plan.get("target_version"):
        lines.append(f"prompt_text Firmware kflash builds: "
                     f"{text(plan['target_version'])}")
    if plan.get("moonraker") is False:
        lines.append("prompt_text Moonraker is unreachable: the MCUs' current "
                     "versions are unknown.")
    if not devices:
        lines.append("prompt_text No devices registered: run `kflash devices "
                     "import` on the host.")
    for d in devices:
        mcu = f" ({d['mcu']})" if d.get("mcu") else ""
        why = ""
        if d.get("reason") and (d.get("bootloader")
                                or d.get("action") not in (None, "flash")):
            why = f" ({text(d['reason'])})"
        lines.append(f"prompt_text {d['key']}{mcu}: {text(d['current'])} -> "
                     f"{text(d['target'])}: {d['state']}{why}")
    todo = sum(d["state"] in TODO_STATES for d in devices)
    if devices:
        lines.append("prompt_button_group_start")
        for d in devices:
            color = "warning" if d["state"] in TODO_STATES else "secondary"
            lines.append(f"prompt_button Flash {d['key']}|KFLASH DEVICE="
                         f"{d['key']}|{color}")
        lines.append("prompt_button_group_end")
    if todo:
        lines.append(f"prompt_footer_button Update all outdated ({todo})|"
                     "KFLASH_ALL ONLY_OUTDATED=1|primary")
    elif devices:
        lines.append("prompt_text Every MCU runs the firmware kflash would "
                     "build.")
    lines.append("prompt_footer_button Close|KFLASH_PLAN CLOSE=1|secondary")
    lines.append("prompt_show")
    return lines


# --------------------------------------------------------------- the report


def report_table(report):
    """``kflash flash-all``: the table, each failure with what to do, the
    outage, the record, OK or FAILED."""
    devices = [d for d in report.get("devices") or [] if isinstance(d, dict)]
    rows = [[d["key"], d.get("method"), d.get("action"), d.get("build"),
             d.get("flash"), d.get("verify"),
             version_arrow(d.get("version_before"),
                           d.get("version_after") or d.get("version_target"))]
            for d in devices]
    lines = [table(rows, ["DEVICE", "METHOD", "ACTION", "BUILD", "FLASH",
                          "VERIFY", "VERSION"])]
    if report.get("recovered"):
        lines.append("\nleft behind by an earlier run:")
        lines += recovered_lines(report["recovered"])
    for d in devices:
        if d.get("error"):
            lines.append(f"\n{d['key']}: {d['error']}")
            if d.get("rollback"):
                lines.append(f"  automatic rollback: {d['rollback']}")
            if d.get("hint"):
                lines.append(what_to_do(d["hint"]))
        elif d.get("reason") and d.get("action") == "skip":
            lines.append(f"{d['key']}: skipped ({d['reason']})")
            if d.get("hint"):
                lines.append(what_to_do(d["hint"]))
    svc = report.get("service") or {}
    said = outage(report)
    if said:
        state = "restarted" if svc.get("restarted") else "NOT RESTARTED"
        lines.append(f"\n{said}; {state}")
    elif svc.get("error"):
        lines.append(f"\n{svc['error']}")
    else:
        lines.append("\nklipper was not stopped")
    if report.get("record"):
        lines.append(f"run record: {report['record']}")
    lines.append("OK" if report.get("ok") else "FAILED")
    return lines


# ------------------------------------------------------------------ a run


def _interruption_hint(record):
    svc = (record.get("report") or {}).get("service") or {}
    if record.get("state") == "interrupted" or not record.get("report"):
        return ("check that every MCU is back (KFLASH_PLAN) and run KFLASH_ALL "
                "again")
    if not svc.get("stopped"):
        return "klipper was not stopped; run KFLASH_ALL again"
    if svc.get("restarted"):
        return ("klipper was started again; run KFLASH_PLAN to see where each "
                "MCU stands")
    return "klipper could not be started again: start it by hand"


def summary(record):
    """A run's summary for the console: ``(info lines, error lines)``."""
    info, errors = [], []
    report = record.get("report") or {}
    svc = report.get("service") or {}
    devices = [d for d in report.get("devices") or [] if isinstance(d, dict)]
    run = ("rollback" if (record.get("options") or {}).get("rollback")
           else "flash run")
    if record.get("interrupted"):
        head = f"kflash: the last {run} was INTERRUPTED"
    elif record.get("ok"):
        head = f"kflash: {run} finished: all good"
    else:
        head = f"kflash: {run} FAILED (exit {record.get('exit_code')})"
    said = outage(report)
    if said:
        head += f"; {said}"
        if not svc.get("restarted"):
            errors.append("kflash: klipper could NOT be restarted: start it by "
                          "hand (systemctl start klipper)")
    info.append(head)
    if report.get("target_version"):
        info.append(f"  target firmware: {report['target_version']}")
    for d in devices:
        steps = ", ".join(f"{k} {d.get(k)}" for k in ("build", "flash", "verify")
                          if d.get(k))
        skipped = ""
        if d.get("action") == "skip" and d.get("reason"):
            skipped = " - " + text(d.get("reason"))
        info.append("  {}: {} -> {} ({}){}".format(
            text(d.get("key")), text(d.get("version_before")),
            text(d.get("version_after") or d.get("version_target")),
            steps or text(d.get("action")), skipped))
        if d.get("error"):
            err = f"kflash: {text(d.get('key'))}: {text(d.get('error'))}"
            if d.get("hint"):
                err += f" | hint: {text(d.get('hint'))}"
            errors.append(err)
    if record.get("interrupted"):
        why = text(record["interrupted"])
        sep = ": " if record.get("state") == "interrupted" else " ("
        end = "" if sep == ": " else ")"
        errors.append(f"kflash: the run was interrupted{sep}{why}{end} | hint: "
                      f"{_interruption_hint(record)}")
    elif record.get("error"):
        errors.append(f"kflash: {text(record['error'])}")
    return info, errors


def result_summary(record):
    """The ``last_result`` field of klippy's ``kflash`` object."""
    report = record.get("report") or {}
    devices = [{k: d.get(k) for k in ("key", "action", "build", "flash", "verify",
                                       "version_before", "version_after",
                                       "error")}
               for d in report.get("devices") or [] if isinstance(d, dict)]
    return {"run_id": record.get("run_id"), "ok": bool(record.get("ok")),
            "exit_code": record.get("exit_code"),
            "interrupted": bool(record.get("interrupted")),
            "finished": record.get("finished"), "error": record.get("error")
            or record.get("interrupted"), "devices": devices}
