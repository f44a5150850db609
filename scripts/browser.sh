#!/usr/bin/env bash
# `make test`'s browser set-up: the browser tests drive Debian's Chromium through its
# chromedriver (tests/browser.py). Installs the packages `chromium` and `chromium-driver` when
# either program is missing. When it cannot (not root and no password-less sudo, no apt-get,
# no network), it says what to run instead and exits 1 under CI=true; elsewhere the suite runs
# and skips the browser tests, saying why.
set -uo pipefail

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver
PACKAGES=(chromium chromium-driver)

if [[ -x $CHROMIUM && -x $CHROMEDRIVER ]]; then
    exit 0
fi

# How to run apt-get as root: directly, through password-less sudo, or not at all.
if [[ $(id -u) -eq 0 ]]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    as_root=(cannot)
fi

if [[ ${as_root[*]-} != cannot ]] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing Debian's ${PACKAGES[*]} for the browser tests..."
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be stale or absent on a fresh machine: refresh them only if needed.
    if "${as_root[@]}" apt-get install -y -qq "${PACKAGES[@]}" >/dev/null 2>&1 \
        || { "${as_root[@]}" apt-get update -qq && "${as_root[@]}" apt-get install -y -qq "${PACKAGES[@]}" >/dev/null; }; then
        [[ -x $CHROMIUM && -x $CHROMEDRIVER ]] && exit 0
    fi
    echo "Installing ${PACKAGES[*]} did not give $CHROMIUM and $CHROMEDRIVER." >&2
fi

cat >&2 <<EOF

The browser tests need Debian's Chromium and ChromeDriver ($CHROMIUM, $CHROMEDRIVER),
and this user cannot install them. Run, as root:

    apt-get update && apt-get install -y ${PACKAGES[*]}

then run \`make test\` again.
EOF
if [[ ${CI:-} =~ ^(1|true|yes)$ ]]; then
    exit 1
fi
echo "Without them the browser tests are SKIPPED." >&2
exit 0
