#!/usr/bin/env bash
# The packaging check (CI runs it after the tests): build the sdist and the wheel with `python -m build`,
# check the wheel's metadata and files, install it without its dependencies (pip --no-deps) into a new,
# empty virtual environment, and from there import every public entry point and run tiny CPU calls.
#
# The clean environment downloads nothing: its interpreter is .venv's base Python (not .venv, whose
# packages it does not see), and a .pth file puts on its path a folder of links to the distributions
# the wheel declares (torch and triton, transformers and the bench extra's, with what they require)
# in .venv. So flashattn can only come from the wheel (the check verifies flashattn.__file__), and an
# import of anything the wheel does not declare fails. Steps: scripts/check_wheel.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
start=$SECONDS
repo=$PWD
work=$(mktemp -d "${TMPDIR:-/tmp}/flashattn-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
check=("$repo/scripts/check_wheel.py")

# 1. build (isolated: setuptools is fetched into a throwaway environment, as a user's build does)
if ! .venv/bin/python -m build --outdir "$work/dist" . >"$work/build.log" 2>&1; then
    cat "$work/build.log"
    echo "check_wheel: FAILED: python -m build" >&2
    exit 1
fi
if grep -iE -A10 "deprecat" "$work/build.log"; then   # e.g. setuptools' notice that a pyproject field goes away
    echo "check_wheel: FAILED: python -m build reports a deprecation (above)" >&2
    exit 1
fi
wheel=$(ls "$work"/dist/*.whl)
sdist=$(ls "$work"/dist/*.tar.gz)
echo "ok: python -m build: $(basename "$sdist"), $(basename "$wheel") ($((SECONDS - start)) s)"
.venv/bin/python "${check[@]}" inspect "$wheel" "$sdist" "$repo"

# 2. a clean environment, the wheel installed alone
.venv/bin/python -m venv --without-pip "$work/clean"
clean="$work/clean/bin/python"
.venv/bin/python -m pip --python "$clean" install -q --no-deps --no-index "$wheel"
site=$("$clean" -I -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
installed=$("$clean" -I -c 'from importlib import metadata; print(sorted(d.metadata["Name"] for d in metadata.distributions()))')
[ "$installed" = "['flashattn']" ] || { echo "check_wheel: FAILED: the clean environment holds $installed" >&2; exit 1; }
echo "ok: pip install --no-deps $(basename "$wheel") into an empty environment ($work/clean): it holds flashattn alone"
.venv/bin/python "${check[@]}" link "$wheel" "$site" "$work/deps"

# 3. from the wheel: -I (isolated: no PYTHON* variables, no user site, not the script's folder on the path),
#    run from outside the checkout
cd "$work"
"$clean" -I "${check[@]}" smoke "$repo"
TRITON_INTERPRET=1 FLASHATTN_BACKEND=triton "$clean" -I "${check[@]}" interpret
"$clean" -I "${check[@]}" notriton
echo "check_wheel: the wheel $(basename "$wheel") builds, installs alone and works ($((SECONDS - start)) s)"
