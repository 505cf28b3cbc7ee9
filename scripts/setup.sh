#!/bin/sh
# Set up everything Sealgate needs on a Debian machine (run as root for apt-get):
# the Debian packages the gateway and its tests use, and a virtualenv in .venv.
#   scripts/setup.sh           runtime + test dependencies (Postfix: a real recipient
#                              server in the interop test, and smtp-source for bench/)
set -eu
cd "$(dirname "$0")/.."
# The interpreter: PYTHON if set; else the distribution's own python3 when it is 3.11
# or newer (Debian builds it with profile-guided and link-time optimisation, and it
# is the one a Debian server runs); else the python3 on PATH.  A python3 earlier on
# PATH than Debian's - pyenv's, or one built from source without
# --enable-optimizations - ran the relay 12-14 % slower (bench/RESULTS.md,
# 2026-12-07).
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    PY=python3
    if /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        PY=/usr/bin/python3
    fi
fi

need=""
# swaks needs Net::SSLeay for --tls (only a Recommends of the swaks package)
# chromium and chromium-driver: the portal tests drive a real headless browser
# postgresql: the storage contract suites run against a private server of their own
# prometheus: its promtool checks and unit-tests contrib/prometheus/alerts.yml
# nginx-light: the webhook receiver of bench/integrations.py (its own instance, on loopback)
for pkg in gnupg openssl swaks libnet-ssleay-perl postfix chromium chromium-driver postgresql \
    prometheus nginx-light; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need="$need $pkg"
done
"$PY" -c "import ensurepip, venv" 2>/dev/null || need="$need python3-venv"
# Node runs the OpenID Connect provider the portal tests sign in with (oidc-provider)
command -v node >/dev/null 2>&1 || need="$need nodejs"
command -v npm >/dev/null 2>&1 || need="$need npm"
if [ -n "$need" ]; then
    echo "setup: installing Debian packages:$need"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # postfix asks debconf questions; "No configuration" leaves the system MTA off.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get install -y -q --no-install-recommends $need
    # only promtool and the nginx binary are wanted: the packages' own servers are
    # not left running
    case "$need" in *prometheus*)
        if command -v systemctl >/dev/null 2>&1; then
            systemctl disable --now prometheus >/dev/null 2>&1 || true
        fi
    esac
    case "$need" in *nginx*)
        if command -v systemctl >/dev/null 2>&1; then
            systemctl disable --now nginx >/dev/null 2>&1 || true
        fi
    esac
fi

# a virtualenv made from another interpreter is made again (with its packages)
want=$("$PY" -c 'import os, sys; print(os.path.realpath(sys.executable))')
if [ -f .venv/pyvenv.cfg ] && ! grep -qx "executable = $want" .venv/pyvenv.cfg; then
    echo "setup: .venv was made from another Python; making it again from $want"
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch .venv/.installed
fi
# the package's bytecode, written now: an editable install leaves it to the first
# import, and where that cannot write (PYTHONDONTWRITEBYTECODE, a read-only checkout)
# every `sealgate` command compiled the whole package again (0.5 s of each start)
.venv/bin/python -m compileall -q gateway
# the test OpenID Connect provider's packages, exactly as locked
if [ ! -d tests/support/oidc/node_modules ] \
    || [ tests/support/oidc/package-lock.json -nt tests/support/oidc/node_modules ]; then
    npm ci --prefix tests/support/oidc --no-audit --no-fund --loglevel=error
    touch tests/support/oidc/node_modules
fi
