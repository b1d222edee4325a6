#!/usr/bin/env bash
# System-level (non-Python) pieces the test suite needs, in one place. Idempotent: what is there is left alone.
#
#   bash tests/system/ensure_test_system.sh [chromium] [slurm]      (no argument: both)
#
#   chromium  Debian's Chromium, for tests/test_report_browser.py (the HTML report opened in a browser)
#   slurm     a running one-node SLURM cluster (tests/slurm/start_local_slurm.sh), for tests/test_workflow_slurm.py
#
# As root (CI, `bash .ci/run`, or `sudo make test`) it installs and starts what is missing. As another user it
# installs nothing: it prints what is missing and the command that provides it, and exits 0, so that the tests
# that need the piece run and fail naming it (they never skip).
set -euo pipefail
cd "$(dirname "$0")/../.."

components=("$@")
[[ ${#components[@]} -gt 0 ]] || components=(chromium slurm)
for component in "${components[@]}"; do
    case $component in chromium|slurm) ;; *) echo "ensure_test_system.sh: unknown component '$component' (chromium, slurm)" >&2; exit 2;; esac
done

have_chromium() { command -v chromium >/dev/null || command -v chromium-browser >/dev/null || [[ -n "${CHROMIUM:-}" && -x "${CHROMIUM}" ]]; }
slurm_up() { command -v sinfo >/dev/null && sinfo -h -o "%T" 2>/dev/null | grep -qE "idle|mixed|allocated"; }

missing=()
for component in "${components[@]}"; do
    case $component in
        chromium) have_chromium || missing+=(chromium) ;;
        slurm) slurm_up || missing+=(slurm) ;;
    esac
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "ensure_test_system: ready (${components[*]})"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "ensure_test_system: not root, so nothing is installed; missing: ${missing[*]}" >&2
    for component in "${missing[@]}"; do
        case $component in
            chromium) echo "  chromium (tests/test_report_browser.py): sudo apt-get install chromium   (or set CHROMIUM=/path/to/chrome)" >&2 ;;
            slurm) echo "  slurm (tests/test_workflow_slurm.py): sudo bash tests/slurm/start_local_slurm.sh" >&2 ;;
        esac
    done
    echo "  or all at once: sudo bash tests/system/ensure_test_system.sh. The tests needing them will fail until then." >&2
    exit 0
fi

for component in "${missing[@]}"; do
    case $component in
        chromium)
            echo "ensure_test_system: installing chromium (apt)"
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq
            apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
            have_chromium || { echo "ensure_test_system: chromium still missing after apt-get install" >&2; exit 1; }
            echo "ensure_test_system: $(chromium --version 2>/dev/null | tail -1)"
            ;;
        slurm)
            bash tests/slurm/start_local_slurm.sh
            ;;
    esac
done
echo "ensure_test_system: ready (${components[*]})"
