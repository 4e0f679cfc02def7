#!/usr/bin/env bash
# Set up what is missing, then run the laptop demo or the whole test suite (README "Set-up: two commands"):
#
#   bash setup.sh demo   # .venv, torch, requirements.txt; then python toy/run.py
#   bash setup.sh test   # the same, plus tesseract (OCR reward), a C++ compiler and Python's headers
#                        # (torch.compile on a CPU); then python -m pytest -q: what CI runs (.ci/run)
#   bash setup.sh env    # set up what `test` needs, run nothing
#
# Each step checks first and says "there" when it has nothing to do, so a second call installs nothing.
# torch, in this order: the machine's own, if python3 imports one in requirements.txt's range (the venv then sees
# it: --system-site-packages); else the pinned build, CUDA where nvidia-smi answers, else the CPU build.
set -euo pipefail
cd "$(dirname "$0")"

what=${1:-}
case "$what" in
  demo|test|env) ;;
  *) echo "usage: bash setup.sh demo|test|env" >&2; exit 2 ;;
esac
TORCH_PIN=2.13.0  # the torch CI installs (requirements.txt states the supported range)
CPU_INDEX=https://download.pytorch.org/whl/cpu
# test-only packages, beyond requirements.txt (installed by `test` and `env`, so a clone tests what CI tests)
TEST_ONLY_PACKAGES=(tensorboard==2.21.0 wandb==0.31.0)  # the trackers tests/test_watch.py checks (--report_to); optional for users
say() { echo "setup: $*"; }

python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { say "needs Python 3.10 or newer as python3" >&2; exit 1; }

# "yes" if this python imports a torch inside requirements.txt's range (a line like torch>=2.11,<2.15), else why not
torch_in_range() {
  "$1" - <<'EOF' 2>/dev/null || echo "no: no torch"
import operator, re
spec = next(l.split("#")[0].strip() for l in open("requirements.txt") if re.match(r"torch\s*[<>=]", l))
import torch
ops = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq, "!=": operator.ne}
minor = lambda v: tuple(int(x) for x in re.findall(r"\d+", v)[:2])  # noqa: E731  (major, minor)
ok = all(ops[op](minor(torch.__version__), minor(v)) for op, v in re.findall(r"([<>=!]=?)\s*([\d.]+)", spec))
print("yes" if ok else f"no: its torch {torch.__version__} is outside {spec}")
EOF
}

# --- the virtual environment ---
if [ -x .venv/bin/python ]; then
  say ".venv there"
elif [ "$(torch_in_range python3)" = yes ]; then
  python3 -m venv --system-site-packages .venv
  say ".venv made; it uses this machine's torch $(python3 -c 'import torch; print(torch.__version__)')"
else
  python3 -m venv .venv
  say ".venv made (python3 itself: $(torch_in_range python3 | sed 's/^no: //'))"
fi
PY=.venv/bin/python

# --- torch ---
if [ "$(torch_in_range $PY)" = yes ]; then
  say "torch there ($($PY -c 'import torch; print(torch.__version__)'))"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  say "installing torch $TORCH_PIN (CUDA build, about 3 GB with its libraries)"
  $PY -m pip install -q "torch==$TORCH_PIN"
else
  say "installing torch $TORCH_PIN (CPU build: no GPU answered nvidia-smi)"
  # a CPU wheel that pip's own configuration already finds (a local wheel folder: no network, fails at once if
  # there is none), else PyTorch's CPU index; never plain PyPI, whose Linux wheel is the multi-GB CUDA build
  $PY -m pip install -q --no-index --no-deps "torch==$TORCH_PIN+cpu" 2>/dev/null ||
    $PY -m pip install -q "torch==$TORCH_PIN" --index-url "$CPU_INDEX"
fi

# --- requirements.txt (and the test-only packages): skipped while the file is unchanged since it was installed ---
stamp=.venv/.requirements-installed
want="$(cat requirements.txt; [ "$what" = demo ] || echo "${TEST_ONLY_PACKAGES[@]:-}")"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  say "requirements there"
else
  $PY -m pip install -q -r requirements.txt
  [ "$what" = demo ] || [ ${#TEST_ONLY_PACKAGES[@]} -eq 0 ] || $PY -m pip install -q "${TEST_ONLY_PACKAGES[@]}"
  printf '%s' "$want" >"$stamp"
  say "requirements installed"
fi

# --- system packages for the tests: tesseract (OCR reward), g++ and Python's headers (torch.compile on a CPU) ---
if [ "$what" != demo ]; then
  missing=()
  command -v tesseract >/dev/null 2>&1 || missing+=(tesseract-ocr tesseract-ocr-eng)
  command -v g++ >/dev/null 2>&1 || missing+=(g++)
  [ -f "$($PY -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] || missing+=(python3-dev)
  if [ ${#missing[@]} -eq 0 ]; then
    say "tesseract, g++ and Python's headers there"
  else
    if [ "$(id -u)" = 0 ]; then sudo=(); elif command -v sudo >/dev/null 2>&1; then sudo=(sudo); else sudo=(none); fi
    if [ "${sudo[*]:-}" = none ] || ! command -v apt-get >/dev/null 2>&1; then
      say "missing ${missing[*]}: install them with your system's package manager (Debian/Ubuntu, as root:" \
        "apt-get install ${missing[*]}); the tests that need them are skipped until then" >&2
    else
      say "installing ${missing[*]} (apt-get)"
      ${sudo[@]+"${sudo[@]}"} apt-get update -qq
      ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
  fi
fi

case "$what" in
  demo) exec $PY toy/run.py ;;
  test) exec $PY -m pytest -q ;;
  env) say "done: . .venv/bin/activate" ;;
esac
