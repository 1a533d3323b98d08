#!/usr/bin/env bash
# Set up SeeChange on a fresh machine and run the demo or the test suite.
#
#   bash util/bootstrap.sh demo            # synthetic images through the pipeline, on SQLite
#   bash util/bootstrap.sh test [ARGS...]  # the test suite (SQLite and a throwaway PostgreSQL)
#
# It creates a virtual environment (.venv, or $SEECHANGE_VENV), installs the package into it,
# and for the tests installs the PostgreSQL server and the q3c extension from the system's
# packages when they are missing (with apt-get; sudo is used when not root).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode="${1:-}"
shift || true
venv="${SEECHANGE_VENV:-.venv}"
python="${PYTHON:-python3}"

log() { printf '[bootstrap] %s\n' "$*" >&2; }

install_python_env() {
    if [ ! -x "$venv/bin/python" ]; then
        log "creating virtual environment $venv"
        "$python" -m venv "$venv"
    fi
    local stamp="$venv/.seechange-installed-$(sha256sum pyproject.toml | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        log "installing seechange and its dependencies into $venv"
        "$venv/bin/python" -m pip install --quiet --upgrade pip
        "$venv/bin/python" -m pip install --quiet -e ".[test]"
        rm -f "$venv"/.seechange-installed-*
        touch "$stamp"
    fi
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi
}

pg_bindir() {
    if command -v initdb >/dev/null; then dirname "$(readlink -f "$(command -v initdb)")"; return; fi
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

apt_install() {
    command -v apt-get >/dev/null || return 1
    log "installing system packages: $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_postgres() {
    local bindir
    bindir="$(pg_bindir)"
    if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
        apt_install postgresql || { log "ERROR: PostgreSQL server not installed and cannot install it"; exit 1; }
        bindir="$(pg_bindir)"
    fi
    local major
    major="$(basename "$(dirname "$bindir")")"
    if [ ! -f "/usr/share/postgresql/$major/extension/q3c.control" ]; then
        apt_install "postgresql-$major-q3c" ||
            log "WARNING: q3c extension not available; PostgreSQL spatial queries will use the bounding-box index"
    fi
    export PATH="$bindir:$PATH"
}

case "$mode" in
    demo)
        install_python_env
        exec "$venv/bin/seechange" demo "$@"
        ;;
    test)
        install_python_env
        ensure_postgres
        exec "$venv/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: bash util/bootstrap.sh demo | test [pytest arguments]" >&2
        exit 2
        ;;
esac
