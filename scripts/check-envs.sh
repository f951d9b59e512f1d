#!/usr/bin/env bash
# Resolve every backend env of an accelerator against the package registry without installing
# anything (pip install --dry-run) and print what each would install:
#   scripts/check-envs.sh cuda      # or cpu (the default)
# Not a test: it downloads package metadata. pip's configuration files and local wheel folders
# are ignored (this build machine's find-links hold a CPU torch), so every pin resolves from the
# registry alone, as on a cluster.
set -euo pipefail
accelerator=${1:-cpu}
root=$(cd "$(dirname "$0")/.." && pwd)
py=$root/.venv/bin/python
[ -x "$py" ] || { echo "check-envs: no $py; run 'make .venv/bin/.installed' first" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
for name in $("$py" -c "from dpscale import envs; print(*envs.names(accelerator='$accelerator'))"); do
  mapfile -t files < <("$py" -c "from dpscale import envs
for f in envs.requirement_files('$name', accelerator='$accelerator'): print(f)")
  echo "== $name ($accelerator): ${files[*]#"$root/"}"
  flags=()
  for f in "${files[@]}"; do
    report=$tmp/$name-$(basename "$f").json
    if ! env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$py" -m pip install --dry-run --ignore-installed --quiet \
        --disable-pip-version-check "${flags[@]}" --report "$report" -r "$f" 2>"$tmp/err"; then
      echo "   FAILED to resolve $f:"; sed 's/^/   /' "$tmp/err"; status=1; continue
    fi
    "$py" - "$report" "${flags[*]}" <<'PY'
import json, sys
items = json.load(open(sys.argv[1]))["install"]
pins = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in items)
print(f"   {sys.argv[2] or 'resolved'} ({len(pins)}):", " ".join(pins))
PY
    flags=(--no-deps)  # the nodeps file, as envs.build installs it
  done
done
exit $status
