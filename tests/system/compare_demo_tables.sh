#!/usr/bin/env bash
# Compare the demo tables of two clones byte by byte (determinism check: `make demo` in two fresh clones must
# give identical tables).
#
#   tests/system/compare_demo_tables.sh CLONE_A CLONE_B
#
# Compares every results/tables/*.csv and *.md of the two clones (either argument may also be a results/tables
# folder itself). Prints each file that differs with a unified diff, and each file present in only one clone.
# Exit status: 0 identical, 1 differences, 2 usage error (a folder or its tables missing).
set -uo pipefail

usage() { echo "usage: $0 CLONE_A CLONE_B   (each a clone holding results/tables/, or such a tables folder)" >&2; exit 2; }
[[ $# -eq 2 ]] || usage

tables_dir() {
    local root=$1
    if [[ -d "$root/results/tables" ]]; then echo "$root/results/tables"
    elif [[ -d "$root" && "$(basename "$root")" == tables ]]; then echo "$root"
    else echo "compare_demo_tables: $root: no results/tables folder (has the demo run there?)" >&2; return 1
    fi
}
A=$(tables_dir "$1") || exit 2
B=$(tables_dir "$2") || exit 2

list() { (cd "$1" && find . -maxdepth 1 -type f \( -name '*.csv' -o -name '*.md' \) -printf '%f\n' | LC_ALL=C sort); }
names_a=$(list "$A"); names_b=$(list "$B")
if [[ -z "$names_a" && -z "$names_b" ]]; then
    echo "compare_demo_tables: no *.csv or *.md in $A or $B" >&2
    exit 2
fi

status=0 same=0
while IFS= read -r name; do
    [[ -n "$name" ]] || continue
    if [[ ! -f "$A/$name" ]]; then echo "only in $B: $name"; status=1; continue; fi
    if [[ ! -f "$B/$name" ]]; then echo "only in $A: $name"; status=1; continue; fi
    if cmp -s "$A/$name" "$B/$name"; then
        same=$((same + 1))
    else
        echo "differs: $name"
        diff -u --label "$A/$name" --label "$B/$name" "$A/$name" "$B/$name" || true
        # identical text with different bytes (line endings, trailing spaces) shows no diff above: say so
        if diff -q --strip-trailing-cr -b "$A/$name" "$B/$name" >/dev/null; then
            echo "  ($name: the bytes differ only in whitespace or line endings)"
        fi
        status=1
    fi
done < <(printf '%s\n%s\n' "$names_a" "$names_b" | LC_ALL=C sort -u)

if [[ $status -eq 0 ]]; then
    echo "identical: $same table files (*.csv, *.md) in $A and $B"
else
    echo "DIFFERENT: see above ($same files identical)"
fi
exit $status
