#!/usr/bin/env bash
# Static checks of the deployment files that can run without systemd as init, without Nix's network and
# without a container runtime or cluster (see deploy/README.md for what this leaves unchecked):
#   - the systemd unit passes `systemd-analyze verify`, and `systemd-analyze security` rates it at most 2.0;
#   - flake.nix and the NixOS module parse (`nix-instantiate --parse`), and Nix reads assets/models.json the
#     way the flake does (builtins.fromJSON, the default models with 64-hex-digit pins), agreeing with Python;
#   - the unit's and the module's TasksMax and LimitNOFILE agree with each other and with the binary's
#     defaults (threads, connections; the arithmetic is in deploy/README.md);
#   - the Kubernetes manifests are valid YAML with the probes on /health.
# Usage: deploy/check.sh [BINARY]   (default: target/release/embedding-server; the unit's ExecStart must exist)
# Needs: systemd (systemd-analyze), nix-bin (nix-instantiate), python3 with PyYAML (python3-yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
binary=$(realpath "${1:-target/release/embedding-server}")
[ -x "$binary" ] || { echo "deploy/check.sh: no binary at $binary" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== systemd unit"
sed "s|/usr/local/bin/embedding-server|$binary|" deploy/systemd/embedding-server.service > "$work/embedding-server.service"
systemd-analyze verify "$work/embedding-server.service"
security=$(systemd-analyze security --offline=true "$work/embedding-server.service" 2>&1 | tail -1)
echo "$security"
score=$(echo "$security" | grep -oE 'level for [^:]+: [0-9.]+' | grep -oE '[0-9.]+$')
awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }' || { echo "exposure $score is above 2.0" >&2; exit 1; }

echo "== limits agree with the binary's defaults"
python3 - "$binary" <<'PY'
import re, subprocess, sys
help_text = subprocess.run([sys.argv[1], "--help"], capture_output=True, text=True, check=True).stdout
threads = int(re.search(r"--threads N .*\[default: (\d+)\]", help_text).group(1))
unit = open("deploy/systemd/embedding-server.service").read()
module = open("deploy/nix/module.nix").read()
unit_tasks = int(re.search(r"^TasksMax=(\d+)$", unit, re.M).group(1))
unit_files = int(re.search(r"^LimitNOFILE=(\d+)$", unit, re.M).group(1))
module_threads = int(re.search(r"threads = lib.mkOption \{[^}]*default = (\d+);", module, re.S).group(1))
module_tasks = re.search(r"TasksMax = 2 \* cfg.threads \+ (\d+);", module).group(1)
module_files = int(re.search(r"LimitNOFILE = (\d+);", module).group(1))
# Threads (deploy/README.md): 2 x workers + 7 + one per model + up to 2 per core for the engine.
assert module_threads == threads, f"the module's threads default {module_threads} is not the binary's {threads}"
assert unit_tasks == 2 * threads + int(module_tasks), f"TasksMax: unit {unit_tasks}, module 2 x {threads} + {module_tasks}"
assert unit_tasks >= 2 * threads + 7 + 1 + 2 * 100, f"TasksMax={unit_tasks} does not cover one model on 100 cores"
assert unit_files == module_files, f"LimitNOFILE: unit {unit_files}, module {module_files}"
connections = unit_files - (64 + 2 * (threads + 1))
assert connections >= 1024, f"LimitNOFILE={unit_files} leaves only {connections} connections"
print(f"threads {threads}: TasksMax {unit_tasks}; LimitNOFILE {unit_files}: default --max-connections {connections}")
PY

echo "== nix"
nix-instantiate --parse flake.nix > /dev/null
nix-instantiate --parse deploy/nix/module.nix > /dev/null
pins=$(nix-instantiate --eval --strict --json -E '
  let m = builtins.fromJSON (builtins.readFile ./assets/models.json);
  in builtins.concatMap (x: map (f: "${x.name}/${f.name}=${f.sha256}") x.files)
       (builtins.filter (x: x.embedded == "default") m.models)')
expected=$(python3 -c '
import json
m = json.load(open("assets/models.json"))
pins = [x["name"] + "/" + f["name"] + "=" + f["sha256"] for x in m["models"] if x["embedded"] == "default" for f in x["files"]]
print(json.dumps(pins, separators=(",", ":")))')
echo "flake fetches: $pins"
[ "$pins" = "$expected" ] || { echo "Nix and Python disagree on the pinned files: $expected" >&2; exit 1; }
echo "$pins" | grep -qE '=[0-9a-f]{64}"' || { echo "a default model file has no sha256 pin" >&2; exit 1; }

echo "== kubernetes"
python3 -c 'import yaml' 2>/dev/null || { echo "deploy/check.sh: python3 lacks PyYAML (apt-get install python3-yaml, or pip install pyyaml)" >&2; exit 1; }
python3 - deploy/kubernetes/*.yaml <<'PY'
import sys, yaml
kinds = []
for path in sys.argv[1:]:
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            kinds.append(doc["kind"])
            if doc["kind"] == "Deployment":
                container = doc["spec"]["template"]["spec"]["containers"][0]
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert container[probe]["httpGet"]["path"] == "/health", probe
                assert container["resources"]["requests"]["memory"], "no memory request"
print("kinds:", ", ".join(kinds))
for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "Kustomization"):
    assert kind in kinds, f"no {kind}"
PY
echo "deploy/check.sh: OK"
