# Shared by quickstart.sh and test.sh: run as root or through sudo, install Debian
# packages only when missing, and keep Python packages in ./.venv (Debian 12 and
# Raspberry Pi OS refuse `pip install` into the system Python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
}

# 32-bit ARM (Raspberry Pi OS armhf, also on a 64-bit kernel): PyPI has no armv7l
# wheels for PyYAML, and the broker extra's psutil, cffi and argon2-cffi-bindings, so pip
# compiles them (piwheels.org, which Raspberry Pi OS configures in /etc/pip.conf, has most
# of them prebuilt); cbor2 6 is Rust-only, so the 5.x line is used.
arm32() {
    case "$(uname -m)" in
        armv6l | armv7l | armv8l) return 0 ;;
        aarch64) [ "$(getconf LONG_BIT)" = 32 ] ;;
        *) return 1 ;;
    esac
}

make_venv() {
    local extra=()
    if arm32; then
        apt_install build-essential python3-dev libffi-dev
        extra=("cbor2>=5.6,<6")
    fi
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv 2>/dev/null || { apt_install python3-venv; python3 -m venv .venv; }
    fi
    # No -q: pip shows its progress, and when a package fails to build, the real error.
    .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install --disable-pip-version-check -e "$1" "${extra[@]}"
}
